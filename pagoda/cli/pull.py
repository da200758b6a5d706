"""`pagoda pull`, `list`, `rm` and `cp`: fetch built-in models, show, delete and copy what is
on disk."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pagoda.errors import PagodaError
from pagoda.models import store


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the `pull`, `list`, `rm` and `cp` subcommands."""
    names = ", ".join(model.name for model in store.BUILTIN_MODELS)
    pull = subparsers.add_parser(
        "pull", help="download a built-in model into pagoda's model directory")
    pull.add_argument("name", help=f"model to pull: {names} (or an alias)")
    pull.add_argument("--force", action="store_true",
                      help="download and convert again even if pulled")
    pull.set_defaults(func=run_pull)
    listing = subparsers.add_parser(
        "list", help="list pulled models and the built-in models pagoda can pull")
    listing.set_defaults(func=run_list)
    rm = subparsers.add_parser("rm", help="delete a pulled model from pagoda's model directory")
    rm.add_argument("name", nargs="+", help="pulled model name(s) (see `pagoda list`)")
    rm.set_defaults(func=run_rm)
    cp = subparsers.add_parser("cp", help="copy a pulled model under a new name")
    cp.add_argument("source", help="a pulled model (see `pagoda list`)")
    cp.add_argument("destination", help="the new name")
    cp.set_defaults(func=run_cp)


def run_cp(args: argparse.Namespace) -> int:
    """Copy a pulled model (its files hard-linked where the disk allows)."""
    path = store.copy(args.source, args.destination)
    print(f"copied {args.source} to {args.destination} ({path})")
    return 0


def run_rm(args: argparse.Namespace) -> int:
    """Delete each named pulled model; an unknown name is an error (status 1)."""
    for name in args.name:
        path = store.remove(name)
        print(f"deleted {name} ({path})")
    return 0


def run_pull(args: argparse.Namespace) -> int:
    """Pull one model; print its directory on success."""
    try:
        path = store.pull(args.name, force=args.force)
    except PagodaError as exc:
        print(f"pagoda pull: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def run_list(args: argparse.Namespace) -> int:
    """Print every built-in and pulled model with its state."""
    rows = _rows()
    if sys.stdout.isatty():
        _print_table(rows)
    else:
        _print_plain(rows)
    return 0


def _rows() -> list[tuple[str, str, str, str]]:
    """(name, state, size, path or description) for built-in models, then other pulled ones."""
    rows = []
    for model, path in store.iter_builtin():
        state = "pulled" if path is not None else "not pulled"
        size = _size(path / model.gguf_name) if path is not None else ""
        rows.append((model.name, state, size, str(path) if path is not None else model.description))
    builtin = {model.name for model in store.BUILTIN_MODELS}
    for path, manifest in store.list_pulled():
        if manifest.name not in builtin:
            rows.append((manifest.name, "pulled", _size(path / manifest.gguf), str(path)))
    return rows


def _size(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.0f} MB"


def _print_table(rows: list[tuple[str, str, str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"models in {store.models_dir()}")
    for column in ("NAME", "STATE", "SIZE", "PATH / DESCRIPTION"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def _print_plain(rows: list[tuple[str, str, str, str]]) -> None:
    widths = [max((len(row[i]) for row in rows), default=0) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)), row[3], sep="  ")
