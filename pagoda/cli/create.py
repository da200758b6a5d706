"""`pagoda create NAME -f Modelfile`: a model with Modelfile defaults (system prompt, sampling
parameters, template) added to a models file for `pagoda serve --config`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def default_models_file() -> Path:
    """$PAGODA_HOME/models.yaml, else ~/.cache/pagoda/models.yaml."""
    from pagoda.home import home_dir
    return home_dir() / "models.yaml"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("create", help="add a model with Modelfile defaults (FROM, "
                                             "SYSTEM, PARAMETER, TEMPLATE) to a models file")
    p.add_argument("name", help="the name the new model is served as")
    p.add_argument("-f", "--file", default="Modelfile", help="the Modelfile (default: "
                                                             "./Modelfile)")
    p.add_argument("--config", default=None, metavar="YAML",
                   help="the models file to write (default: models.yaml in pagoda's home)")
    p.set_defaults(func=run_create)


def run_create(args: argparse.Namespace) -> int:
    from pagoda.errors import ConfigError
    from pagoda.fleet.modelfile import add_to_models_file, parse_modelfile
    from pagoda.fleet.spec import fleet_from_yaml
    path = Path(args.config) if args.config else default_models_file()
    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"pagoda create: cannot read {args.file}: {exc}", file=sys.stderr)
        return 1
    try:
        entry = parse_modelfile(text, args.file)
        add_to_models_file(path, args.name, entry)
        fleet_from_yaml(path)  # the file as `pagoda serve --config` will read it
    except ConfigError as exc:
        print(f"pagoda create: {exc}", file=sys.stderr)
        return 1
    print(f"created {args.name} in {path}; serve it with: pagoda serve --config {path}")
    return 0
