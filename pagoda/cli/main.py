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
    "run": "pagoda.cli.generate",
    "bench": "pagoda.cli.bench",
    "serve": "pagoda.cli.serve",
    "estimate": "pagoda.cli.estimate",
    "ps": "pagoda.cli.ps",
    "rm": "pagoda.cli.pull",
    "cp": "pagoda.cli.pull",
    "show": "pagoda.cli.show",
    "stop": "pagoda.cli.ps",
    "create": "pagoda.cli.create",
    "deploy": "pagoda.cli.deploy",
}

# Exit statuses of every subcommand (README, "Exit status").
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_DOES_NOT_FIT = 0, 1, 2, 3


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    from pagoda import __version__
    parser = argparse.ArgumentParser(
        prog="pagoda", description="pagoda: serve and run LLMs",
        epilog="exit status: 0 done, 1 error (one line on stderr), 2 bad command line, "
               "3 `estimate`: does not fit")
    parser.add_argument("--version", action="version", version=f"pagoda {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    for module_name in dict.fromkeys(SUBCOMMANDS.values()):
        if wanted and SUBCOMMANDS[wanted] != module_name:
            continue  # import only what this invocation needs; keeps `pagoda pull` fast
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def dashed(argv: list[str]) -> list[str]:
    """vLLM also accepts flags spelt with underscores (--max_model_len): so does pagoda."""
    out = []
    for arg in argv:
        if arg.startswith("--") and "_" in arg.split("=", 1)[0]:
            name, sep, value = arg.partition("=")
            arg = name.replace("_", "-") + sep + value
        out.append(arg)
    return out


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse; an unknown flag is reported by its subcommand's parser (with that usage line)."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        sub = _subparsers(parser).get(getattr(args, "command", None), parser)
        sub.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse; `serve --config` naming a YAML of flags (vLLM's --config) adds its flags."""
    args = parse(parser, argv)
    if getattr(args, "command", None) == "serve" and args.config:
        from pagoda.cli.flag_file import apply_flag_file
        args = apply_flag_file(_subparsers(parser)["serve"], argv, args,
                               lambda again: parse(parser, again))
    return args


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse has no public accessor for its subparsers
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def main(argv: list[str] | None = None) -> int:
    argv = dashed(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    from pagoda.errors import PagodaError
    try:
        args = parse_command_line(parser, argv)
    except PagodaError as exc:
        print(f"pagoda {argv[0]}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Run the subcommand; an error pagoda raises on purpose is one line on stderr, status 1."""
    from pagoda.errors import PagodaError
    try:
        return int(args.func(args) or 0)
    except PagodaError as exc:
        print(f"pagoda {args.command}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
