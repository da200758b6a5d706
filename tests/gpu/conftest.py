"""Skips tests/gpu/ without CUDA (visibly) and prints the rows GPU tests record as a table."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).resolve().parent
_ROWS = pytest.StashKey[list]()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="tests/gpu needs a CUDA device (torch.cuda.is_available() "
                                   "is False)")
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(skip)


@pytest.fixture
def gpu_report(request):
    """Call with a dict (one table row): columns are the union of keys, in first-seen order."""
    rows = request.config.stash.setdefault(_ROWS, [])

    def record(**row) -> None:
        rows.append({"test": request.node.name, **row})
    return record


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = config.stash.get(_ROWS, [])
    if not rows:
        return
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    cells = [[_fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    terminalreporter.section(f"GPU summary ({torch.cuda.get_device_name()})")
    terminalreporter.write_line("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in cells:
        terminalreporter.write_line("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.2e}" if value and abs(value) < 1e-2 else f"{value:.3g}"
    return str(value)
