"""Reasoning parsers: split a model's output into ``<think>`` reasoning and the answer.

Each parser is incremental: its streamer takes text deltas and returns reasoning and content
pieces, and ``parse()`` runs that same streamer over the whole text, so both modes agree for
any split of the text, markers split across deltas included.

Shared rules:

* Whitespace before an opening ``<think>`` at the start of the output is dropped with it.
* Reasoning ends at the first ``</think>``; the content is everything after it, as the model
  wrote it (``</think>\\n\\nHi`` gives ``"\\n\\nHi"``, as vLLM returns it).
* Empty reasoning or content is ``None``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from pagoda.entrypoints.openai.incremental import IncrementalParser, partial_marker_len

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

_SPACE = re.compile(r"\s*")


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """One streamed piece: exactly one of the two fields is set."""

    reasoning: str | None = None
    content: str | None = None


class StreamingReasoningParser(IncrementalParser[ReasoningDelta]):
    """Splits one output incrementally (see IncrementalParser).

    ``implicit_reasoning`` says what an output without a leading ``<think>`` is: reasoning
    (the template opened the block in the prompt) or plain content.
    """

    def __init__(self, implicit_reasoning: bool) -> None:
        super().__init__(self._at_start)
        self._implicit_reasoning = implicit_reasoning
        self._leading_space: list[str] = []

    def _emit(self, text: str, reasoning: bool) -> None:
        if text:
            self._events.append(ReasoningDelta(reasoning=text) if reasoning
                                else ReasoningDelta(content=text))

    def _at_start(self, text: str, start: int, final: bool) -> int | None:
        """Leading whitespace, then ``<think>`` or not."""
        pos = _SPACE.match(text, start).end()
        if pos > start:
            self._leading_space.append(text[start:pos])
        if text.startswith(THINK_OPEN, pos):
            self._leading_space.clear()
            self._state = self._in_reasoning
            return pos + len(THINK_OPEN)
        rest = text[pos:]
        if not final and len(rest) < len(THINK_OPEN) and THINK_OPEN.startswith(rest):
            self._carry = rest
            return None
        self._emit("".join(self._leading_space), self._implicit_reasoning)
        self._leading_space.clear()
        self._state = self._in_reasoning if self._implicit_reasoning else self._in_content
        return pos

    def _in_reasoning(self, text: str, start: int, final: bool) -> int | None:
        found = text.find(THINK_CLOSE, start)
        if found < 0:
            end = len(text) - (0 if final else partial_marker_len(text, start, THINK_CLOSE))
            self._emit(text[start:end], reasoning=True)
            self._carry = text[end:]
            return None
        self._emit(text[start:found], reasoning=True)
        self._state = self._in_content
        return found + len(THINK_CLOSE)

    def _in_content(self, text: str, start: int, final: bool) -> int | None:
        self._emit(text[start:], reasoning=False)
        return None


class ReasoningParser:
    """A reasoning format: ``parse()`` a whole output, or ``streamer()`` for deltas."""

    name: ClassVar[str]
    implicit_reasoning: ClassVar[bool]

    def streamer(self) -> StreamingReasoningParser:
        return StreamingReasoningParser(self.implicit_reasoning)

    def parse(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning, content) of a whole output."""
        streamer = self.streamer()
        return _collect(streamer.feed(text) + streamer.finish())


def _collect(events: list[ReasoningDelta]) -> tuple[str | None, str | None]:
    reasoning = "".join(event.reasoning for event in events if event.reasoning)
    content = "".join(event.content for event in events if event.content)
    return reasoning or None, content or None


class DeepSeekR1ReasoningParser(ReasoningParser):
    """DeepSeek-R1: reasoning until ``</think>``; the opening ``<think>`` is optional (the
    template may have put it in the prompt), and without ``</think>`` all is reasoning."""

    name = "deepseek_r1"
    implicit_reasoning = True


class Qwen3ReasoningParser(ReasoningParser):
    """Qwen3: reasoning only when the output starts with ``<think>``; it runs to ``</think>``
    or, unterminated, to the end. Without a leading ``<think>`` all is content (a later
    ``</think>`` included)."""

    name = "qwen3"
    implicit_reasoning = False


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    parser.name: parser for parser in (DeepSeekR1ReasoningParser, Qwen3ReasoningParser)
}


def detect_reasoning_parser(chat_template: str | None) -> str | None:
    """The reasoning parser a chat template implies: one that mentions ``<think>`` gets
    ``"qwen3"`` if it also mentions ``enable_thinking`` (Qwen3's switch), else
    ``"deepseek_r1"``; any other template gets ``None``."""
    if not chat_template or THINK_OPEN not in chat_template:
        return None
    return "qwen3" if "enable_thinking" in chat_template else "deepseek_r1"
