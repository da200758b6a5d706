"""Ollama's Modelfile (FROM, SYSTEM, PARAMETER, TEMPLATE) read into a models-file entry."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pagoda.errors import ConfigError
from pagoda.fleet.spec import MODEL_PARAMETERS, check_parameters

MAX_MODELFILE_CHARS = 1 << 20
_INSTRUCTION = re.compile(r"(?is)\s*([A-Z]+)\s+(\"\"\"(.*?)\"\"\"|[^\n]*)")
_UNSUPPORTED = {"ADAPTER": "LoRA adapters are given with --lora-modules",
                "MESSAGE": "seed conversations are not supported",
                "REQUIRES": "version requirements are not supported"}
_IGNORED = {"LICENSE"}
# Ollama parameters that set an engine option instead of a sampling default
_ENGINE_PARAMETERS = {"num_ctx": "max_model_len"}


def parse_modelfile(text: str, where: str = "Modelfile") -> dict[str, Any]:
    """A models-file entry (without its name) from a Modelfile's text."""
    if len(text) > MAX_MODELFILE_CHARS:
        raise ConfigError(f"{where} is larger than {MAX_MODELFILE_CHARS} characters")
    entry: dict[str, Any] = {}
    parameters: dict[str, Any] = {}
    for line_no, keyword, value in _instructions(text, where):
        if keyword == "FROM":
            entry["model"] = value
        elif keyword == "SYSTEM":
            entry["system"] = value
        elif keyword == "TEMPLATE":
            entry["template"] = _template(value, f"{where}:{line_no}")
        elif keyword == "PARAMETER":
            _parameter(value, parameters, entry, f"{where}:{line_no}")
        elif keyword in _UNSUPPORTED:
            raise ConfigError(f"{where}:{line_no}: {keyword} is not supported: "
                              f"{_UNSUPPORTED[keyword]}")
        elif keyword not in _IGNORED:
            raise ConfigError(f"{where}:{line_no}: unknown instruction {keyword}; pagoda reads "
                              f"FROM, SYSTEM, PARAMETER and TEMPLATE")
    if "model" not in entry:
        raise ConfigError(f"{where}: no FROM line (the model to build on)")
    if parameters:
        entry["parameters"] = check_parameters(parameters, where)
    return entry


def _instructions(text: str, where: str) -> list[tuple[int, str, str]]:
    """(line number, KEYWORD, value) of each instruction; comments and blank lines skipped."""
    found = []
    pos = 0
    while pos < len(text):
        line_end = text.find("\n", pos)
        line = text[pos:line_end if line_end >= 0 else len(text)]
        line_no = text.count("\n", 0, pos) + 1
        if not line.strip() or line.lstrip().startswith("#"):
            pos = len(text) if line_end < 0 else line_end + 1
            continue
        match = _INSTRUCTION.match(text, pos)
        if match is None:
            raise ConfigError(f"{where}:{line_no}: cannot read {line.strip()[:80]!r}")
        value = match.group(3) if match.group(3) is not None else match.group(2).strip()
        found.append((line_no, match.group(1).upper(), value.strip("\n")
                      if match.group(3) is not None else _unquote(value)))
        pos = match.end()
    return found


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def _template(value: str, where: str) -> str:
    from pagoda.tokenizer.go_template import to_jinja
    try:
        to_jinja(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: TEMPLATE cannot be used: {exc}") from None
    return value


def _parameter(value: str, parameters: dict[str, Any], entry: dict[str, Any],
               where: str) -> None:
    name, _, raw = value.partition(" ")
    raw = _unquote(raw.strip())
    if not raw:
        raise ConfigError(f"{where}: PARAMETER {name} needs a value")
    if name in _ENGINE_PARAMETERS:
        entry[_ENGINE_PARAMETERS[name]] = _number(name, raw, where, int)
    elif name == "stop":
        parameters.setdefault("stop", []).append(raw)
    elif name in MODEL_PARAMETERS:
        kind = MODEL_PARAMETERS[name][0]
        parameters[name] = _number(name, raw, where, kind)
    else:
        known = ", ".join(sorted([*MODEL_PARAMETERS, *_ENGINE_PARAMETERS]))
        raise ConfigError(f"{where}: PARAMETER {name} is not supported; pagoda takes {known}")


def _number(name: str, raw: str, where: str, kind: type) -> Any:
    try:
        return kind(raw) if kind is int else float(raw)
    except ValueError:
        raise ConfigError(f"{where}: PARAMETER {name} must be a number, not {raw!r}") from None


def add_to_models_file(path: Path, name: str, entry: dict[str, Any]) -> None:
    """Put `entry` under `name` in the models file at `path` (created if missing): an entry
    of the same name is replaced; FROM naming another entry builds on that entry."""
    import yaml
    data: dict[str, Any] = {"models": []}
    if path.exists():
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {"models": []}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("models"), list):
            raise ConfigError(f"{path}: expected a mapping with a 'models' list")
    models = [m for m in data["models"] if not (isinstance(m, dict) and m.get("name") == name)]
    base = next((m for m in models if isinstance(m, dict) and m.get("name") == entry["model"]),
                None)
    if base is not None:  # built on another entry: its model, then this file's changes
        entry = {**entry, "model": base["model"]}
    merged = {"name": name, **({k: v for k, v in base.items() if k not in ("name", "aliases")}
                 if base else {}), **entry}
    if base and "parameters" in base and "parameters" in entry:
        merged["parameters"] = {**base["parameters"], **entry["parameters"]}
    data["models"] = [*models, merged]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
