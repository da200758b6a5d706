"""Incremental detokenization with stop-string detection and leak-free streaming deltas."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

REPLACEMENT_CHAR = "\ufffd"
METASPACE = "\u2581"
# How many trailing prompt tokens prime the decoder (enough context for spacing and merges).
PROMPT_CONTEXT_TOKENS = 6
PROMPT_CONTEXT_MAX = 24


class _TextDecoder(Protocol):
    """Turns appended token ids into newly completed text."""

    def step(self, token_ids: Sequence[int]) -> str: ...


def _backend_of(tokenizer: Any) -> Tokenizer | None:
    """The `tokenizers.Tokenizer` behind a tokenizer, or None for a slow (pure Python) one."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend if isinstance(backend, Tokenizer) else None


def _prompt_context(
    decode: Callable[[list[int]], str], prompt_token_ids: Sequence[int]
) -> list[int]:
    """The shortest useful prompt suffix whose decode is clean (no partial characters)."""
    n = len(prompt_token_ids)
    for size in range(min(PROMPT_CONTEXT_TOKENS, n), min(PROMPT_CONTEXT_MAX, n) + 1):
        suffix = list(prompt_token_ids[n - size :])
        if REPLACEMENT_CHAR not in decode(suffix):
            return suffix
    return []


@dataclass(slots=True)
class _StreamDecoder:
    """Fast path: `tokenizers.decoders.DecodeStream`, a constant-size window per step."""

    backend: Tokenizer
    skip_special_tokens: bool
    stream: DecodeStream = field(init=False)

    def __post_init__(self) -> None:
        self.stream = DecodeStream(skip_special_tokens=self.skip_special_tokens)

    def prime(self, prompt_token_ids: Sequence[int]) -> None:
        """Feed trailing prompt tokens so the first output token decodes in context."""
        decode = partial(self.backend.decode, skip_special_tokens=self.skip_special_tokens)
        for token_id in _prompt_context(decode, prompt_token_ids):
            self._step_one(token_id)

    def step(self, token_ids: Sequence[int]) -> str:
        """Append ids and return the text they complete."""
        chunks = [self._step_one(token_id) for token_id in token_ids]
        return "".join(chunk for chunk in chunks if chunk)

    def _step_one(self, token_id: int) -> str | None:
        """One `DecodeStream.step`, restarting the stream if its prefix went inconsistent."""
        try:
            return self.stream.step(self.backend, token_id)
        except Exception as exc:  # tokenizers raises a plain Exception for this case
            if "invalid prefix" not in str(exc).lower():
                raise
            self.stream = DecodeStream(skip_special_tokens=self.skip_special_tokens)
            return self.stream.step(self.backend, token_id)


@dataclass(slots=True)
class _OffsetDecoder:
    """Slow-tokenizer fallback: the prefix/read-offset method over token strings."""

    tokenizer: Any
    skip_special_tokens: bool
    tokens: list[str] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0

    def prime(self, prompt_token_ids: Sequence[int]) -> None:
        """Seed the token window with the prompt's tail so output spacing is right."""
        tail = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self.tokens = self._to_tokens(tail)
        self.read_offset = len(self.tokens)
        self.prefix_offset = 0

    def step(self, token_ids: Sequence[int]) -> str:
        """Append ids and return the text completed since the read offset."""
        self.tokens.extend(self._to_tokens(token_ids))
        prefix_text = self._to_text(self.tokens[self.prefix_offset : self.read_offset])
        full_text = self._to_text(self.tokens[self.prefix_offset :])
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT_CHAR):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        self._forget_consumed()
        return full_text[len(prefix_text) :]

    def _forget_consumed(self) -> None:
        """Drop tokens before the prefix offset so memory stays bounded."""
        if self.prefix_offset > 4 * PROMPT_CONTEXT_MAX:
            del self.tokens[: self.prefix_offset]
            self.read_offset -= self.prefix_offset
            self.prefix_offset = 0

    def _to_tokens(self, token_ids: Sequence[int]) -> list[str]:
        tokens = self.tokenizer.convert_ids_to_tokens(
            list(token_ids), skip_special_tokens=self.skip_special_tokens
        )
        return [token for token in tokens if token is not None]

    def _to_text(self, tokens: list[str]) -> str:
        return self.tokenizer.convert_tokens_to_string(tokens) if tokens else ""


def _make_decoder(
    tokenizer: Any, prompt_token_ids: Sequence[int], skip_special_tokens: bool
) -> _TextDecoder:
    """Pick the stream decoder for fast tokenizers, the offset decoder otherwise, and prime it."""
    backend = _backend_of(tokenizer)
    decoder: _StreamDecoder | _OffsetDecoder
    if backend is not None:
        decoder = _StreamDecoder(backend, skip_special_tokens)
    else:
        decoder = _OffsetDecoder(tokenizer, skip_special_tokens)
    decoder.prime(prompt_token_ids)
    return decoder


@dataclass(slots=True)
class _StopMatch:
    """A stop string found in the search window: which one, and where the text is cut."""

    stop: str
    chars_to_drop: int


class IncrementalDetokenizer:
    """Decodes output tokens as they arrive, cuts at stop strings, hands out safe deltas."""

    __slots__ = (
        "_decoder",
        "_stops",
        "_include_stop",
        "_holdback",
        "_sent",
        "_pending",
        "_pending_len",
        "_tail",
        "_stop_reason",
    )

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        self._decoder = _make_decoder(tokenizer, prompt_token_ids, skip_special_tokens)
        self._stops: tuple[str, ...] = tuple(s for s in stop if s)
        self._include_stop = include_stop_str_in_output
        self._holdback = max((len(s) for s in self._stops), default=1) - 1
        self._sent: list[str] = []  # text already handed out by get_delta
        self._pending: list[str] = []  # decoded text not yet handed out
        self._pending_len = 0
        self._tail = ""  # last `_holdback` chars: the only old text a new stop can touch
        self._stop_reason: str | None = None

    @property
    def output_text(self) -> str:
        """The decoded output so far (cut at the stop string once one matched)."""
        if len(self._sent) > 1:
            self._sent = ["".join(self._sent)]
        return "".join(self._sent) + "".join(self._pending)

    @property
    def stop_reason(self) -> str | None:
        """The stop string that ended the output, or None."""
        return self._stop_reason

    def update(self, new_token_ids: Sequence[int]) -> str | None:
        """Append tokens; return the matched stop string if the output must end here, else None."""
        if self._stop_reason is not None or not new_token_ids:
            return None
        new_text = self._decoder.step(new_token_ids)
        if not new_text:
            return None
        match = self._find_stop(new_text) if self._stops else None
        self._append(new_text)
        if match is None:
            return None
        self._drop_last(match.chars_to_drop)
        self._stop_reason = match.stop
        return match.stop

    def get_delta(self, finished: bool) -> str:
        """Text not yet handed out that is safe to stream; everything left once finished."""
        final = finished or self._stop_reason is not None
        ready = self._pending_len - (0 if final else self._holdback)
        if ready <= 0:
            return ""
        pending = "".join(self._pending)
        delta, rest = pending[:ready], pending[ready:]
        self._pending = [rest] if rest else []
        self._pending_len = len(rest)
        self._sent.append(delta)
        return delta

    def _find_stop(self, new_text: str) -> _StopMatch | None:
        """The stop string completing first in `tail + new_text` (ties: the earliest start)."""
        window = self._tail + new_text
        best: tuple[int, int, str] | None = None
        for stop in self._stops:
            start = window.find(stop, max(0, len(self._tail) - len(stop) + 1))
            if start < 0:
                continue
            candidate = (start + len(stop), start, stop)
            if best is None or candidate < best:
                best = candidate
        if best is None:
            return None
        end, start, stop = best
        cut = end if self._include_stop else start
        return _StopMatch(stop, len(window) - cut)

    def _append(self, text: str) -> None:
        self._pending.append(text)
        self._pending_len += len(text)
        if self._holdback:
            self._tail = (self._tail + text)[-self._holdback :]

    def _drop_last(self, count: int) -> None:
        """Remove `count` chars from the end of the pending text (always held back, never sent)."""
        while count > 0 and self._pending:
            last = self._pending.pop()
            self._pending_len -= len(last)
            if len(last) > count:
                self._append(last[: len(last) - count])
            count -= len(last)


def decode_token(tokenizer: Any, token_id: int) -> str:
    """Display string of one token: its text if it decodes to whole characters, else the token."""
    token = tokenizer.convert_ids_to_tokens(token_id)
    if token is None:
        return ""
    text = tokenizer.convert_tokens_to_string([token])
    if not text and token.startswith(METASPACE):
        text = " "
    if not text or REPLACEMENT_CHAR in text:
        return token
    if token.startswith(METASPACE) and not text.startswith(" "):
        return " " + text
    return text
