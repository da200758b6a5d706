"""`pagoda serve --config FILE`: pagoda's models file, or vLLM's `--config`, a YAML of flags.

vLLM's `serve --config config.yaml` reads a mapping of flag names to values
(`port: 8000`, `max-model-len: 4096`, `model: ...`) as if they were on the command line,
before the flags actually given there (which win). pagoda's `--config` names a models file,
told apart by its `models:` list. A file that is neither is refused, naming the keys that are
not `pagoda serve` flags.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pagoda.errors import ConfigError

_NOT_FROM_A_FILE = {"config", "help"}  # flags a flag file may not carry


def read_yaml(path: str) -> Any:
    """The YAML document in `path`, or ConfigError saying why it cannot be read."""
    import yaml
    try:
        return yaml.safe_load(Path(path).expanduser().read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc}") from None


def is_models_file(data: Any) -> bool:
    return isinstance(data, dict) and "models" in data


def flag_args(data: Any, parser: argparse.ArgumentParser, path: str) -> list[str]:
    """The command-line arguments a vLLM-style flag file stands for."""
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"--config {path}: neither a models file (a mapping with a 'models' "
                          f"list) nor a YAML mapping of `pagoda serve` flags (vLLM's --config)")
    options = parser._option_string_actions  # argparse has no public view of its options
    unknown = [str(key) for key in data if _option(key) not in options
               or str(key).replace("_", "-") in _NOT_FROM_A_FILE]
    if unknown:
        raise ConfigError(f"--config {path}: neither a models file (it has no 'models' list) "
                          f"nor a YAML of `pagoda serve` flags (vLLM's --config): not a flag: "
                          f"{', '.join(unknown)}")
    args: list[str] = []
    for key, value in data.items():
        args += _flag(_option(key), value, options[_option(key)])
    return args


def apply_flag_file(serve: argparse.ArgumentParser, argv: list[str], args: argparse.Namespace,
                    reparse: Callable[[list[str]], argparse.Namespace]) -> argparse.Namespace:
    """`args` of `pagoda serve` (parsed from `argv` by `reparse`), with the flags of a
    vLLM-style --config file as defaults (the command line wins); unchanged when --config
    names a models file."""
    data = read_yaml(args.config)
    if is_models_file(data):
        return args
    from_file = vars(reparse(["serve", *flag_args(data, serve, args.config)]))
    serve.set_defaults(**{dest: value for dest, value in from_file.items()
                          if dest not in ("command", "func")
                          and value != serve.get_default(dest)})
    args = reparse(argv)
    args.config = None
    return args


def _option(key: Any) -> str:
    return "--" + str(key).replace("_", "-")


def _flag(option: str, value: Any, action: argparse.Action) -> list[str]:
    """One key of the file as command-line arguments."""
    if value is None:
        return []
    if isinstance(value, bool):
        if value:
            return [option]
        negated = "--no-" + option[2:]
        return [negated] if negated in action.option_strings else []
    if isinstance(value, list):
        if isinstance(action, argparse._AppendAction):
            return [part for item in value for part in (option, _text(item))]
        return [option, *map(_text, value)]
    return [option, _text(value)]


def _text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)
