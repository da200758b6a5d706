"""`pagoda` command line: each subcommand module registers its own parser."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand name -> module in pagoda.cli exposing add_parser(subparsers) and run(args) -> int
SUBCOMMANDS = {
    "pull": "pagoda.cli.pull",
    "list": "pagoda.cli.pull",
    "generate": "pagoda.cli.generate",
    "chat": "pagoda.cli.generate",
    "bench": "pagoda.cli.bench",
    "serve": "pagoda.cli.serve",
    "estimate": "pagoda.cli.estimate",
    "ps": "pagoda.cli.ps",
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagoda", description="pagoda: serve and run LLMs")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    for module_name in dict.fromkeys(SUBCOMMANDS.values()):
        if wanted and SUBCOMMANDS[wanted] != module_name:
            continue  # import only what this invocation needs; keeps `pagoda pull` fast
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
