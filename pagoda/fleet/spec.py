"""What the operator asks for: the models one server hosts and their options, from the
command line (`pagoda serve A B ...`) or a YAML file (`pagoda serve --config models.yaml`).

YAML layout::

    memory_limit: 20GiB        # optional: the device budget (default: 90% of the device)
    keep_alive: -1             # default for every model: duration, 0 or -1 (forever)
    defaults: {max_model_len: 4096}
    models:
      - model: smollm2         # pulled name, checkpoint directory or .gguf
        name: smol             # the served name (default: the model spec)
        aliases: [gpt-4o-mini]
        pinned: true           # always loaded, never evicted
        keep_alive: 5m
        priority: 10           # higher: evicted later
        replicas: 2            # engine replicas behind this name
        devices: [cuda:0, cuda:1]
        max_model_len: 2048    # any engine option: dtype, max_num_seqs, enforce_eager, ...
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pagoda.config import parse_bytes
from pagoda.errors import ConfigError

FOREVER = -1.0
_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
# engine options a model entry may set (EngineConfig / engine_config keyword names)
ENGINE_KEYS = {"max_model_len", "dtype", "load_format", "quantization", "tokenizer", "seed",
               "block_size", "enable_prefix_caching", "max_num_batched_tokens", "max_num_seqs",
               "enforce_eager", "attention_backend", "async_scheduling", "prefill_first",
               "enable_lora", "max_loras", "max_lora_rank", "max_cpu_loras", "lora_dtype",
               "kv_cache_dtype"}
_MODEL_KEYS = ENGINE_KEYS | {"model", "name", "aliases", "pinned", "keep_alive", "priority",
                             "replicas", "devices", "chat_template", "preload", "system",
                             "parameters", "template", "lora_modules"}
# Modelfile-style default sampling parameters a model entry may set (Ollama's names):
# name -> (type, low, high); the request's own values win.
MODEL_PARAMETERS: dict[str, tuple[type, float, float]] = {
    "temperature": (float, 0.0, 2.0), "top_p": (float, 0.0, 1.0), "top_k": (int, -1, 1 << 30),
    "min_p": (float, 0.0, 1.0), "num_predict": (int, -2, 1 << 30),
    "seed": (int, -(1 << 63), (1 << 64) - 1), "repeat_penalty": (float, 0.0, 100.0),
    "presence_penalty": (float, -2.0, 2.0), "frequency_penalty": (float, -2.0, 2.0),
    "stop": (list, 0, 16)}
MAX_SYSTEM_CHARS = 1 << 16
_FILE_KEYS = {"models", "defaults", "memory_limit", "keep_alive"}


def parse_keep_alive(value: Any) -> float:
    """Ollama's keep_alive: a duration ("5m", "30s", "1h", 90), 0 (unload when idle) or a
    negative value (keep forever). Returns seconds, FOREVER for negative values."""
    if isinstance(value, bool) or value is None:
        raise ConfigError(f"keep_alive {value!r}: use a duration like 5m, 0 or -1")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if match is None:
            raise ConfigError(f"keep_alive {value!r}: use a duration like 30s, 5m, 1h, 0 or -1")
        seconds = float(match.group(1)) * _SECONDS[match.group(2)]
    return FOREVER if seconds < 0 else seconds


def parse_memory(value: Any) -> int:
    """Bytes from 1234, "20GiB", "512MB", "1.5G"."""
    try:
        return parse_bytes(str(value))
    except ValueError as exc:
        raise ConfigError(f"{value!r} is not a byte size (e.g. 20GiB): {exc}") from None


@dataclass(slots=True)
class ModelSpec:
    """One hosted model and its options."""

    model: str
    name: str
    aliases: list[str] = field(default_factory=list)
    pinned: bool = False
    keep_alive: float | None = None  # seconds; None: the server default
    priority: int = 0
    replicas: int = 1
    devices: list[str] = field(default_factory=list)  # one per replica; empty: the default
    chat_template: str | None = None
    preload: bool = True  # load at startup if it fits without evicting anyone
    engine: dict[str, Any] = field(default_factory=dict)  # engine_config keyword arguments
    system: str | None = None  # Modelfile-style default system prompt
    parameters: dict[str, Any] = field(default_factory=dict)  # default sampling (Ollama names)
    lora_modules: dict[str, str] = field(default_factory=dict)  # adapter name -> directory

    def __post_init__(self) -> None:
        if self.lora_modules and not self.engine.get("enable_lora"):
            raise ConfigError(f"model {self.name!r}: lora_modules need enable_lora: true")
        if self.replicas < 1:
            raise ConfigError(f"model {self.name!r}: replicas must be at least 1")
        if self.devices and len(self.devices) != self.replicas:
            raise ConfigError(f"model {self.name!r}: {len(self.devices)} devices for "
                              f"{self.replicas} replicas")

    @property
    def names(self) -> list[str]:
        """The names that reach the model: its own, aliases, and its adapters'."""
        return [self.name, *self.aliases, *self.lora_modules]

    def device_of(self, replica: int) -> str | None:
        return self.devices[replica] if self.devices else None


@dataclass(slots=True)
class FleetSpec:
    """Every model of one server, plus server-wide memory and keep-alive settings."""

    models: list[ModelSpec]
    memory_limit: int | None = None
    keep_alive: float = FOREVER

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError("no model to serve")
        seen: dict[str, str] = {}
        for spec in self.models:
            for name in spec.names:
                if name in seen:
                    raise ConfigError(f"served name {name!r} is used by both {seen[name]!r} "
                                      f"and {spec.model!r}")
                seen[name] = spec.model


def fleet_from_args(models: list[str], engine_kwargs: dict[str, Any],
                    served_names: list[str] | None = None, keep_alive: Any = FOREVER,
                    memory_limit: int | None = None, replicas: int = 1,
                    devices: list[str] | None = None) -> FleetSpec:
    """`pagoda serve A B ...`: every model gets the command line's engine options;
    --served-model-name, if given, names them in order (one name each). `replicas` engines
    of each (--data-parallel-size), on `devices` (one each) if given."""
    if served_names and len(served_names) != len(models):
        raise ConfigError(f"--served-model-name gives {len(served_names)} names for "
                          f"{len(models)} models")
    names = served_names or models
    specs = [ModelSpec(model=m, name=n, engine=dict(engine_kwargs), replicas=replicas,
                       devices=list(devices or []))
             for m, n in zip(models, names, strict=True)]
    return FleetSpec(specs, memory_limit, parse_keep_alive(keep_alive))


def fleet_from_yaml(path: str | Path) -> FleetSpec:
    """Read a models file. Its engine options override the command line's."""
    import yaml
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise ConfigError(f"{path}: expected a mapping with a 'models' list")
    _check_keys(data, _FILE_KEYS, str(path))
    defaults = dict(data.get("defaults") or {})
    _check_keys(defaults, ENGINE_KEYS | {"keep_alive"}, f"{path}: defaults")
    keep_alive = parse_keep_alive(data.get("keep_alive", defaults.pop("keep_alive", FOREVER)))
    memory = data.get("memory_limit")
    specs = [_model_entry(entry, defaults, f"{path}: models[{i}]")
             for i, entry in enumerate(data["models"])]
    return FleetSpec(specs, parse_memory(memory) if memory is not None else None, keep_alive)


def _model_entry(entry: Any, defaults: dict[str, Any], where: str) -> ModelSpec:
    if isinstance(entry, str):
        entry = {"model": entry}
    if not isinstance(entry, dict) or "model" not in entry:
        raise ConfigError(f"{where}: each model needs at least 'model: NAME_OR_PATH'")
    _check_keys(entry, _MODEL_KEYS, where)
    engine = {**defaults, **{k: v for k, v in entry.items() if k in ENGINE_KEYS}}
    aliases = entry.get("aliases") or []
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise ConfigError(f"{where}: aliases must be a list of names")
    keep_alive = entry.get("keep_alive")
    return ModelSpec(
        model=str(entry["model"]), name=str(entry.get("name") or entry["model"]),
        aliases=aliases, pinned=bool(entry.get("pinned", False)),
        keep_alive=None if keep_alive is None else parse_keep_alive(keep_alive),
        priority=int(entry.get("priority", 0)), replicas=int(entry.get("replicas", 1)),
        devices=[str(d) for d in entry.get("devices") or []],
        chat_template=_template_of(entry, where), preload=bool(entry.get("preload", True)),
        engine=engine, system=_system_of(entry, where),
        parameters=check_parameters(entry.get("parameters") or {}, where),
        lora_modules=_lora_modules(entry.get("lora_modules"), where))


def _template_of(entry: dict[str, Any], where: str) -> str | None:
    """`chat_template` (Jinja text or file) or `template` (Jinja, or a Go template in
    Ollama's style, translated); not both."""
    if entry.get("template") is None:
        return entry.get("chat_template")
    if entry.get("chat_template") is not None:
        raise ConfigError(f"{where}: give chat_template or template, not both")
    from pagoda.tokenizer.go_template import to_jinja
    try:
        return to_jinja(str(entry["template"]))
    except ValueError as exc:
        raise ConfigError(f"{where}: template: {exc}") from None


def _system_of(entry: dict[str, Any], where: str) -> str | None:
    system = entry.get("system")
    if system is not None and (not isinstance(system, str) or len(system) > MAX_SYSTEM_CHARS):
        raise ConfigError(f"{where}: system must be text of at most {MAX_SYSTEM_CHARS} "
                          f"characters")
    return system


def check_parameters(parameters: Any, where: str) -> dict[str, Any]:
    """Default sampling parameters of a model entry, each known and within its bounds."""
    if not isinstance(parameters, dict):
        raise ConfigError(f"{where}: parameters must be a mapping")
    checked = {}
    for name, value in parameters.items():
        if name not in MODEL_PARAMETERS:
            raise ConfigError(f"{where}: unknown parameter {name!r}; known: "
                              f"{', '.join(sorted(MODEL_PARAMETERS))}")
        checked[name] = _parameter_value(name, value, where)
    return checked


def _parameter_value(name: str, value: Any, where: str) -> Any:
    kind, low, high = MODEL_PARAMETERS[name]
    if kind is list:
        value = [value] if isinstance(value, str) else value
        if (not isinstance(value, list) or not low <= len(value) <= high
                or not all(isinstance(v, str) and 0 < len(v) <= 256 for v in value)):
            raise ConfigError(f"{where}: parameter stop must be up to {int(high)} strings")
        return value
    ok_type = (isinstance(value, (int, float)) and not isinstance(value, bool)
               and (kind is float or float(value).is_integer()))
    if not ok_type or not low <= value <= high:
        raise ConfigError(f"{where}: parameter {name} must be a number in [{low}, {high}]")
    return kind(value)


def _lora_modules(value: Any, where: str) -> dict[str, str]:
    """`lora_modules:` as a list of name=path strings or {name, path} mappings."""
    modules: dict[str, str] = {}
    for item in value or []:
        if isinstance(item, str) and "=" in item:
            name, _, path = item.partition("=")
        elif isinstance(item, dict) and isinstance(item.get("name"), str) \
                and isinstance(item.get("path"), str):
            name, path = item["name"], item["path"]
        else:
            raise ConfigError(f"{where}: lora_modules entries are name=path or {{name, path}}")
        modules[name] = str(Path(path).expanduser())
    return modules


def _check_keys(mapping: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {', '.join(unknown)}; "
                          f"allowed: {', '.join(sorted(allowed))}")
