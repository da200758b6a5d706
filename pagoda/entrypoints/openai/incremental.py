"""The machinery the streaming tool-call and reasoning parsers share: text arrives in deltas,
a state machine consumes it, and a marker split across deltas is held back until the next
delta (or the end) settles it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

E = TypeVar("E")
Handler = Callable[[str, int, bool], "int | None"]


def partial_marker_len(text: str, start: int, marker: str) -> int:
    """Length of the longest tail of ``text[start:]`` that is a proper prefix of ``marker``."""
    for size in range(min(len(marker) - 1, len(text) - start), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0


class IncrementalParser(Generic[E]):
    """``feed()`` each delta, then ``finish()`` once; both return the events made certain.

    A state is a handler ``(text, start, final)`` that consumes ``text[start:]`` and returns
    where to continue, or ``None`` once it has used all of it or kept a possible partial
    marker in ``_carry`` for the next delta. Subclasses set ``_state`` and append to
    ``_events``; ``_at_end()`` runs once the output has ended.
    """

    def __init__(self, state: Handler) -> None:
        self._carry = ""
        self._events: list[E] = []
        self._state = state
        self._finished = False

    def feed(self, delta: str) -> list[E]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        text, self._carry = self._carry + delta, ""
        self._run(text, final=False)
        return self._take_events()

    def finish(self) -> list[E]:
        if self._finished:
            return []
        self._finished = True
        text, self._carry = self._carry, ""
        self._run(text, final=True)
        self._at_end()
        return self._take_events()

    def _at_end(self) -> None:
        """Release what only the end of the output settles (nothing by default)."""

    def _run(self, text: str, final: bool) -> None:
        start: int | None = 0
        while start is not None:
            start = self._state(text, start, final)

    def _take_events(self) -> list[E]:
        events, self._events = self._events, []
        return events
