"""pagoda's logger tree: configured once, its lines on the stderr of the moment."""

from __future__ import annotations

import io
import logging
import sys

from pagoda.logger import configure_logging, get_logger


def test_lines_go_to_whatever_stderr_is_when_they_are_logged(monkeypatch):
    root = logging.getLogger("pagoda")
    for name in ("handlers", "level", "propagate"):  # (restored after)
        monkeypatch.setattr(root, name, [] if name == "handlers" else getattr(root, name))
    configure_logging("INFO")
    configure_logging("INFO")  # once only
    assert len(root.handlers) == 1
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    get_logger("engine").info("one")
    monkeypatch.setattr(sys, "stderr", second)
    get_logger("pagoda.cli").warning("two")
    assert first.getvalue().endswith("INFO pagoda.engine: one\n")
    assert second.getvalue().endswith("WARNING pagoda.cli: two\n")
    assert "two" not in first.getvalue()
