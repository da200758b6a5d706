"""Logging setup: one 'pagoda' logger tree, configured once by entry points."""

from __future__ import annotations

import logging
import os
import sys


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name if name.startswith("pagoda") else f"pagoda.{name}")


def configure_logging(level: str | None = None) -> None:
    """Send pagoda's logs to stderr at PAGODA_LOG_LEVEL (default INFO)."""
    root = logging.getLogger("pagoda")
    if root.handlers:
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                           "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level or os.environ.get("PAGODA_LOG_LEVEL", "INFO"))
    root.propagate = False


class _StderrHandler(logging.StreamHandler):
    """A handler writing to whatever sys.stderr is when a record comes, not the stream it was
    at configuration (a later redirection, such as a test's capture, sees the lines)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass
