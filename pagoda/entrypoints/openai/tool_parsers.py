"""Tool-call parsers: split a model's raw output into content and OpenAI tool calls.

One parser per output format (``TOOL_PARSERS``). Every parser is incremental: its streamer
takes text deltas and returns content and tool-call events, and ``parse()`` runs that same
streamer over the whole text, so streaming and non-streaming always agree, however the text is
split into deltas.

Rules shared by all formats:

* Fail soft. A call block that is malformed (bad JSON, an unterminated marker, JSON nested
  deeper than ``MAX_JSON_DEPTH``, a name that is not a non-empty string, arguments that are not
  a JSON object) stays in the content verbatim; well-formed blocks around it are still calls.
  Formats where the whole output is the call list (``llama3_json``, ``pythonic``) keep
  everything from the first malformed part on as content.
* At most ``MAX_TOOL_CALLS`` calls; text beyond that stays content.
* ``arguments`` is canonical JSON: ``json.dumps(args, ensure_ascii=False)`` of an object.
* Content is the text outside calls, concatenated verbatim; when calls were found and that text
  is only whitespace (the newlines between blocks), content is ``None``.
* Bounded work: markers are found with ``str.find``, JSON extents with a linear bracket scanner
  that also enforces the depth limit before ``json`` decodes anything, so any input costs time
  linear in its length (streamed or not); ``ast`` only sees pythonic output up to
  ``MAX_PYTHONIC_CHARS`` and ``MAX_JSON_DEPTH`` deep.
"""

from __future__ import annotations

import ast
import json
import re
import secrets
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import accumulate, repeat
from typing import Any, ClassVar

from pagoda.entrypoints.openai.incremental import (
    Handler,
    IncrementalParser,
    partial_marker_len,
)

MAX_TOOL_CALLS = 128
MAX_JSON_DEPTH = 64
MAX_PYTHONIC_CHARS = 64 * 1024  # ast parsing of the largest list stays well under a second
MAX_FUNCTION_NAME_CHARS = 64

_ID_ALPHABET = string.ascii_letters + string.digits
_SPACE = re.compile(r"\s*")
_BRACKET_DEPTH = {"[": 1, "{": 1, "]": -1, "}": -1}
_FIRST_SCAN_BLOCK = 32
_SCAN_BLOCK = 4096
_SIMPLE_STRING = re.compile(r'"[^"\\]*"')
_BRACKET = re.compile(r"[\[\]{}]")
_PYTHON_START = "<|python_start|>"
_PYTHON_END = "<|python_end|>"
_PYTHONIC_EXAMPLE = re.compile(r"\[[A-Za-z_]\w*\([A-Za-z_]\w*=")  # "[func_name1(param_name1="


@dataclass(frozen=True, slots=True)
class ParsedToolCall:
    name: str
    arguments: str  # a JSON object, as text


@dataclass(frozen=True, slots=True)
class ToolParseResult:
    content: str | None
    tool_calls: list[ParsedToolCall]


@dataclass(frozen=True, slots=True)
class ContentDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """One piece of a streamed call, like OpenAI's ``delta.tool_calls[i]``.

    A call's first delta carries ``id`` and ``name`` with ``arguments=""``; later deltas carry
    only ``index`` and a fragment of ``arguments``.
    """

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


StreamEvent = ContentDelta | ToolCallDelta


def make_tool_call_id() -> str:
    """A fresh OpenAI-style call id: ``call_`` and 24 random letters and digits."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


# --- small text helpers ---------------------------------------------------------------------

_MATCH, _MAYBE, _MISMATCH = "match", "maybe", "mismatch"


def _match_marker(text: str, start: int, marker: str, final: bool) -> str:
    """Whether ``text[start:]`` begins with ``marker``, or may once more text arrives."""
    if text.startswith(marker, start):
        return _MATCH
    rest = len(text) - start
    if not final and rest < len(marker) and marker.startswith(text[start:]):
        return _MAYBE
    return _MISMATCH


class _JsonExtentScanner:
    """Finds where a JSON array or object ends, fed piece by piece, in linear time.

    It tracks strings and bracket depth only; validity is left to ``json``. Scanning stops
    early (``too_deep``) once nesting passes ``MAX_JSON_DEPTH``. Runs of text between strings
    are followed a block at a time with C-level ``accumulate``, so even a megabyte of brackets
    costs milliseconds.
    """

    def __init__(self) -> None:
        self.depth = 0
        self.too_deep = False
        self._in_string = False
        self._escaped = False

    def feed(self, text: str, start: int) -> int | None:
        """Index just past the value's end (or past the too-deep bracket), else ``None``."""
        pos = start
        while pos < len(text):
            if self._in_string:
                pos = self._skip_string(text, pos)
                continue
            window_end = min(len(text), pos + _SCAN_BLOCK)
            quote = text.find('"', pos, window_end)
            stop = window_end if quote < 0 else quote
            if _BRACKET.search(text, pos, stop) is not None:
                end = self._follow_brackets(text, pos, stop)
                if end is not None:
                    return end
            if quote < 0:
                pos = stop
            elif (simple := _SIMPLE_STRING.match(text, quote)) is not None:
                pos = simple.end()
            else:
                self._in_string = True
                pos = quote + 1
        return None

    def _follow_brackets(self, text: str, start: int, stop: int) -> int | None:
        """Depth over quote-free ``text[start:stop]``; index past the closing or too-deep
        bracket, else ``None``. Blocks grow from small, so work stays linear in what is used."""
        block_start, block_size = start, _FIRST_SCAN_BLOCK
        while block_start < stop:
            block_end = min(stop, block_start + block_size)
            offsets = list(accumulate(map(_BRACKET_DEPTH.get, text[block_start:block_end],
                                          repeat(0))))
            if self.depth + min(offsets) > 0 and self.depth + max(offsets) <= MAX_JSON_DEPTH:
                self.depth += offsets[-1]
                block_start, block_size = block_end, min(2 * block_size, _SCAN_BLOCK)
                continue
            for index, offset in enumerate(offsets):
                level = self.depth + offset
                if level > MAX_JSON_DEPTH or level <= 0:
                    self.too_deep = level > MAX_JSON_DEPTH
                    self.depth = level
                    return block_start + index + 1
        return None

    def _skip_string(self, text: str, pos: int) -> int:
        """Index past the string's closing quote, or ``len(text)`` if it goes on."""
        if self._escaped:
            self._escaped = False
            pos += 1
        while True:
            quote = text.find('"', pos)
            end = len(text) if quote < 0 else quote
            segment = text[pos:end]
            odd_backslashes = (len(segment) - len(segment.rstrip("\\"))) % 2 == 1
            if quote < 0:
                self._escaped = odd_backslashes
                return len(text)
            if not odd_backslashes:
                self._in_string = False
                return quote + 1
            pos = quote + 1


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_JSON_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_INVALID = object()


def _load_json(text: str) -> Any:
    """The decoded value, or ``_INVALID``."""
    try:
        return _JSON_DECODER.decode(text)
    except (ValueError, RecursionError):
        return _INVALID


def _canonical_arguments(arguments: Any) -> str | None:
    """``arguments`` as canonical JSON if it is an object of finite values, else ``None``."""
    if not isinstance(arguments, dict):
        return None
    try:
        return json.dumps(arguments, ensure_ascii=False, allow_nan=False)
    except (ValueError, TypeError, RecursionError):
        return None


def _call_from_object(value: Any, argument_keys: tuple[str, ...]) -> tuple[str, str] | None:
    """(name, arguments JSON) from ``{"name": ..., <argument key>: {...}}``, else ``None``."""
    if not isinstance(value, dict):
        return None
    name = value.get("name")
    key = next((k for k in argument_keys if k in value), None)
    if not isinstance(name, str) or not name or key is None:
        return None
    arguments = _canonical_arguments(value[key])
    return None if arguments is None else (name, arguments)


# --- streaming machinery ---------------------------------------------------------------------

class StreamingToolParser(IncrementalParser[StreamEvent]):
    """Parses one output incrementally (see IncrementalParser). Subclasses are small state
    machines. Text that may still turn out to be a call (a partial marker in ``_carry``, a
    block in progress in ``_held``) waits; a failed block's held text becomes content.
    """

    def __init__(self) -> None:
        super().__init__(self._passthrough)
        self._held: list[str] = []
        self._held_chars = 0
        self._num_calls = 0
        self._pending_space: list[str] = []
        self._has_text = False
        self._scanner = _JsonExtentScanner()
        self._json_start = self._json_end = 0  # the JSON value's slice of ``_held``
        self._fallback: Handler = self._passthrough  # the state a failed block returns to

    def _at_end(self) -> None:
        if self._pending_space and not self._num_calls:
            self._events.append(ContentDelta("".join(self._pending_space)))
        self._pending_space.clear()

    # emitting

    def _emit_content(self, text: str) -> None:
        """Content, with whitespace held until it is known not to be just a gap between calls."""
        if not text:
            return
        if self._has_text:
            self._events.append(ContentDelta(text))
        elif text.isspace():
            self._pending_space.append(text)
        else:
            self._has_text = True
            self._events.append(ContentDelta("".join(self._pending_space) + text))
            self._pending_space.clear()

    def _emit_call(self, name: str, arguments: str) -> None:
        index = self._num_calls
        self._num_calls += 1
        self._events.append(ToolCallDelta(index, "", id=make_tool_call_id(), name=name))
        self._events.append(ToolCallDelta(index, arguments))
        self._release_held()

    def _calls_left(self) -> int:
        return MAX_TOOL_CALLS - self._num_calls

    # holding

    def _hold(self, text: str) -> None:
        if text:
            self._held.append(text)
            self._held_chars += len(text)

    def _release_held(self) -> str:
        held = "".join(self._held)
        self._held.clear()
        self._held_chars = 0
        return held

    def _hold_space(self, text: str, start: int) -> int:
        end = _SPACE.match(text, start).end()
        self._hold(text[start:end])
        return end

    def _fail(self, resume: int) -> int:
        """The block in progress is not a call: its text is content; go on at ``resume``."""
        self._emit_content(self._release_held())
        self._state = self._fallback
        return resume

    # shared states

    def _passthrough(self, text: str, start: int, final: bool) -> int | None:
        self._emit_content(text[start:])
        return None

    def _find_marker(self, text: str, start: int, final: bool, marker: str,
                     after_marker: Handler) -> int | None:
        """Content up to ``marker``; then hold the marker and switch to ``after_marker``."""
        if self._calls_left() <= 0:
            return self._passthrough(text, start, final)
        found = text.find(marker, start)
        if found < 0:
            end = len(text) - (0 if final else partial_marker_len(text, start, marker))
            self._emit_content(text[start:end])
            self._carry = text[end:]
            return None
        self._emit_content(text[start:found])
        self._hold(marker)
        self._state = after_marker
        return found + len(marker)

    def _begin_json(self, start: int) -> int:
        self._scanner = _JsonExtentScanner()
        self._json_start = len(self._held)
        self._state = self._in_json
        return start

    def _in_json(self, text: str, start: int, final: bool) -> int | None:
        end = self._scanner.feed(text, start)
        if end is None:
            self._hold(text[start:])
            return self._fail(len(text)) if final else None
        self._hold(text[start:end])
        if self._scanner.too_deep:
            return self._fail(end)
        self._json_end = len(self._held)
        return self._json_done(end)

    def _held_json(self) -> Any:
        return _load_json("".join(self._held[self._json_start:self._json_end]))

    def _json_done(self, end: int) -> int | None:
        """Called when the JSON value begun by ``_begin_json`` is complete (held)."""
        raise NotImplementedError


class _HermesStreamer(StreamingToolParser):
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks among content."""

    OPEN = "<tool_call>"
    CLOSE = "</tool_call>"

    def __init__(self) -> None:
        super().__init__()
        self._state = self._fallback = self._in_content

    def _in_content(self, text: str, start: int, final: bool) -> int | None:
        return self._find_marker(text, start, final, self.OPEN, self._after_open)

    def _after_open(self, text: str, start: int, final: bool) -> int | None:
        pos = self._hold_space(text, start)
        if pos == len(text):
            return self._fail(pos) if final else None
        return self._begin_json(pos) if text[pos] == "{" else self._fail(pos)

    def _json_done(self, end: int) -> int | None:
        self._state = self._before_close
        return end

    def _before_close(self, text: str, start: int, final: bool) -> int | None:
        pos = self._hold_space(text, start)
        match = _match_marker(text, pos, self.CLOSE, final)
        if match == _MAYBE:
            self._carry = text[pos:]
            return None
        if match == _MISMATCH:
            return self._fail(pos)
        end = pos + len(self.CLOSE)
        self._hold(self.CLOSE)
        call = _call_from_object(self._held_json(), ("arguments",))
        if call is None:
            return self._fail(end)
        self._emit_call(*call)
        self._state = self._in_content
        return end


class _Llama3JsonStreamer(StreamingToolParser):
    """``[<|python_tag|>]{"name": ..., "parameters": {...}}`` objects joined by ``;``."""

    PYTHON_TAG = "<|python_tag|>"

    def __init__(self) -> None:
        super().__init__()
        self._state = self._at_start

    def _at_start(self, text: str, start: int, final: bool) -> int | None:
        pos = self._hold_space(text, start)
        if pos == len(text):
            return self._fail(pos) if final else None
        match = _match_marker(text, pos, self.PYTHON_TAG, final)
        if match == _MAYBE:
            self._carry = text[pos:]
            return None
        if match == _MATCH:
            self._hold(self.PYTHON_TAG)
            self._state = self._expect_object
            return pos + len(self.PYTHON_TAG)
        if text[pos] != "{":
            return self._fail(pos)
        self._state = self._expect_object
        return pos

    def _expect_object(self, text: str, start: int, final: bool) -> int | None:
        if self._calls_left() <= 0:
            return self._fail(start)
        pos = self._hold_space(text, start)
        if pos == len(text):
            return self._fail(pos) if final else None
        return self._begin_json(pos) if text[pos] == "{" else self._fail(pos)

    def _json_done(self, end: int) -> int | None:
        call = _call_from_object(self._held_json(), ("parameters", "arguments"))
        if call is None:
            return self._fail(end)
        self._emit_call(*call)
        self._state = self._after_call
        return end

    def _after_call(self, text: str, start: int, final: bool) -> int | None:
        return self._after_separator(text, start, final, ";", self._after_semicolon)

    def _after_semicolon(self, text: str, start: int, final: bool) -> int | None:
        return self._after_separator(text, start, final, "{", self._expect_object)

    def _after_separator(self, text: str, start: int, final: bool, expected: str,
                         then: Handler) -> int | None:
        """Whitespace, then ``expected``; a trailing ``;`` and whitespace are dropped."""
        pos = self._hold_space(text, start)
        if pos == len(text):
            if final:
                self._release_held()
            return None
        if text[pos] != expected:
            return self._fail(pos)
        self._state = then
        if expected == "{":
            return pos
        self._hold(expected)
        return pos + 1


class _MistralStreamer(StreamingToolParser):
    """``[TOOL_CALLS][{...}, ...]`` (JSON array) or ``[TOOL_CALLS]name[ARGS]{...}`` blocks."""

    MARKER = "[TOOL_CALLS]"
    ARGS = "[ARGS]"
    _NAME_CHARS = re.compile(r"[\w.\-]*")

    def __init__(self) -> None:
        super().__init__()
        self._state = self._fallback = self._in_content
        self._name: list[str] = []
        self._name_chars = 0
        self._json_is_array = False

    def _in_content(self, text: str, start: int, final: bool) -> int | None:
        return self._find_marker(text, start, final, self.MARKER, self._after_marker)

    def _after_marker(self, text: str, start: int, final: bool) -> int | None:
        pos = self._hold_space(text, start)
        if pos == len(text):
            return self._fail(pos) if final else None
        if text[pos] == "[":
            self._json_is_array = True
            return self._begin_json(pos)
        self._name.clear()
        self._name_chars = 0
        self._state = self._in_name
        return pos

    def _in_name(self, text: str, start: int, final: bool) -> int | None:
        room = MAX_FUNCTION_NAME_CHARS + 1 - self._name_chars
        end = self._NAME_CHARS.match(text, start, min(len(text), start + room)).end()
        self._hold(text[start:end])
        self._name.append(text[start:end])
        self._name_chars += end - start
        if self._name_chars > MAX_FUNCTION_NAME_CHARS:
            return self._fail(end)
        if end == len(text):
            return self._fail(end) if final else None
        match = _match_marker(text, end, self.ARGS, final)
        if match == _MAYBE:
            self._carry = text[end:]
            return None
        if match == _MISMATCH or not self._name_chars:
            return self._fail(end)
        self._hold(self.ARGS)
        self._state = self._after_args
        return end + len(self.ARGS)

    def _after_args(self, text: str, start: int, final: bool) -> int | None:
        pos = self._hold_space(text, start)
        if pos == len(text):
            return self._fail(pos) if final else None
        if text[pos] != "{":
            return self._fail(pos)
        self._json_is_array = False
        return self._begin_json(pos)

    def _json_done(self, end: int) -> int | None:
        value = self._held_json()
        if self._json_is_array:
            calls = _calls_from_array(value, self._calls_left())
        else:
            arguments = _canonical_arguments(value)
            calls = None if arguments is None else [("".join(self._name), arguments)]
        if calls is None:
            return self._fail(end)
        for call in calls:
            self._emit_call(*call)
        self._state = self._in_content
        return end


def _calls_from_array(value: Any, limit: int) -> list[tuple[str, str]] | None:
    """Every element of a JSON array as a call, or ``None`` if any is not one."""
    if not isinstance(value, list) or not 1 <= len(value) <= limit:
        return None
    calls = [_call_from_object(item, ("arguments",)) for item in value]
    return None if None in calls else calls


class _PythonicStreamer(StreamingToolParser):
    """The whole output is ``[f(a=1), g(b="x")]``, optionally in ``<|python_start|>...``.

    The list is held until the output ends; text that cannot start a call list (its first
    characters are not ``[name(``) is released as content at once.
    """

    def __init__(self) -> None:
        super().__init__()
        self._state = self._at_start

    def _run(self, text: str, final: bool) -> None:
        super()._run(text, final)
        if self._held_chars > MAX_PYTHONIC_CHARS:
            self._fail(0)

    def _at_start(self, text: str, start: int, final: bool) -> int | None:
        pos = self._hold_space(text, start)
        if pos == len(text):
            return self._fail(pos) if final else None
        match = _match_marker(text, pos, _PYTHON_START, final)
        if match == _MAYBE:
            self._carry = text[pos:]
            return None
        if match == _MATCH:
            self._hold(_PYTHON_START)
            self._state = self._expect_list
            return pos + len(_PYTHON_START)
        return self._expect_list(text, pos, final)

    def _expect_list(self, text: str, start: int, final: bool) -> int | None:
        return self._expect(text, start, final, lambda char: char == "[", self._expect_name)

    def _expect_name(self, text: str, start: int, final: bool) -> int | None:
        return self._expect(text, start, final, _starts_identifier, self._in_name, consume=False)

    def _in_name(self, text: str, start: int, final: bool) -> int | None:
        end = _IDENTIFIER_REST.match(text, start).end()
        self._hold(text[start:end])
        if end == len(text):
            return self._fail(end) if final else None
        self._state = self._expect_paren
        return end

    def _expect_paren(self, text: str, start: int, final: bool) -> int | None:
        return self._expect(text, start, final, lambda char: char == "(", self._in_body)

    def _expect(self, text: str, start: int, final: bool, accepts: Callable[[str], bool],
                then: Handler, consume: bool = True) -> int | None:
        """Whitespace, then a character ``accepts`` allows; otherwise this is content."""
        pos = self._hold_space(text, start)
        if pos == len(text):
            return self._fail(pos) if final else None
        if not accepts(text[pos]):
            return self._fail(pos)
        self._state = then
        if not consume:
            return pos
        self._hold(text[pos])
        return pos + 1

    def _in_body(self, text: str, start: int, final: bool) -> int | None:
        self._hold(text[start:])
        if not final:
            return None
        calls = parse_pythonic_calls("".join(self._held), self._calls_left())
        if calls is None:
            return self._fail(len(text))
        for call in calls:
            self._emit_call(*call)
        return None


# --- pythonic calls ---------------------------------------------------------------------------

_IDENTIFIER_REST = re.compile(r"\w*")
_PYTHON_STRUCTURAL = re.compile(r"[\[\](){}'\"#]")
_PYTHON_STRING_STOP = {"'": re.compile(r"[\\']"), '"': re.compile(r'[\\"]')}


def _starts_identifier(char: str) -> bool:
    return char == "_" or char.isalpha()


def _python_nesting_depth(source: str) -> int:
    """Deepest bracket nesting outside string literals and comments, in linear time."""
    depth = deepest = 0
    pos = 0
    while (found := _PYTHON_STRUCTURAL.search(source, pos)) is not None:
        char, pos = found.group(), found.end()
        if char in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in ")]}":
            depth -= 1
        elif char == "#":
            newline = source.find("\n", pos)
            pos = len(source) if newline < 0 else newline + 1
        else:
            pos = _skip_python_string(source, found.start())
    return deepest


def _skip_python_string(source: str, start: int) -> int:
    """Index just past the string literal opening at ``start`` (or the end if unterminated)."""
    quote = source[start]
    delimiter = quote * 3 if source.startswith(quote * 3, start) else quote
    pos = start + len(delimiter)
    stop = _PYTHON_STRING_STOP[quote]
    while (found := stop.search(source, pos)) is not None:
        if found.group() == "\\":
            pos = found.end() + 1
        elif source.startswith(delimiter, found.start()):
            return found.start() + len(delimiter)
        else:
            pos = found.end()
    return len(source)


def parse_pythonic_calls(source: str, limit: int = MAX_TOOL_CALLS,
                         ) -> list[tuple[str, str]] | None:
    """(name, arguments JSON) of each call in ``[f(a=1), ...]``, or ``None`` if not exactly that.

    Only keyword arguments with literal values are allowed; the text is read with ``ast`` and
    ``ast.literal_eval``, never evaluated. Inputs over ``MAX_PYTHONIC_CHARS`` or nested deeper
    than ``MAX_JSON_DEPTH`` are refused before parsing.
    """
    if len(source) > MAX_PYTHONIC_CHARS:
        return None
    body = source.strip().removeprefix(_PYTHON_START).removesuffix(_PYTHON_END)
    if _python_nesting_depth(body) > MAX_JSON_DEPTH:
        return None
    try:
        tree = ast.parse(body.strip(), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    if not isinstance(tree.body, ast.List) or not 1 <= len(tree.body.elts) <= limit:
        return None
    calls = [_pythonic_call(node) for node in tree.body.elts]
    return None if None in calls else calls


def _pythonic_call(node: ast.expr) -> tuple[str, str] | None:
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
        return None
    arguments: dict[str, Any] = {}
    for keyword in node.keywords:
        if keyword.arg is None or keyword.arg in arguments:
            return None
        try:
            arguments[keyword.arg] = _json_value(ast.literal_eval(keyword.value))
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return None
    encoded = _canonical_arguments(arguments)
    return None if encoded is None else (node.func.id, encoded)


def _json_value(value: Any) -> Any:
    """A Python literal as a JSON value (tuples become lists); ``ValueError`` if it has none."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value  # non-finite floats are refused when the arguments are encoded
    if isinstance(value, (list, tuple)):
        return [_json_value(item) for item in value]
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return {key: _json_value(item) for key, item in value.items()}
    raise ValueError(f"{type(value).__name__} is not a JSON value")


# --- parsers and registry ---------------------------------------------------------------------


class ToolParser:
    """A tool-call format: ``parse()`` a whole output, or ``streamer()`` for deltas."""

    name: ClassVar[str]
    _streamer_class: ClassVar[type[StreamingToolParser]]

    def streamer(self) -> StreamingToolParser:
        return self._streamer_class()

    def parse(self, text: str) -> ToolParseResult:
        streamer = self.streamer()
        return _collect(streamer.feed(text) + streamer.finish())


def _collect(events: Iterable[StreamEvent]) -> ToolParseResult:
    content: list[str] = []
    names: list[str] = []
    arguments: list[list[str]] = []
    for event in events:
        if isinstance(event, ContentDelta):
            content.append(event.text)
        elif event.name is not None:
            names.append(event.name)
            arguments.append([event.arguments])
        else:
            arguments[event.index].append(event.arguments)
    calls = [ParsedToolCall(name, "".join(parts))
             for name, parts in zip(names, arguments, strict=True)]
    return ToolParseResult("".join(content) or None, calls)


class HermesToolParser(ToolParser):
    """Hermes / Qwen2.5 / Qwen3: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``.

    Any number of blocks; the text around them is content.
    """

    name = "hermes"
    _streamer_class = _HermesStreamer


class Llama3JsonToolParser(ToolParser):
    """Llama 3.1 / 3.2 JSON calls: ``{"name": ..., "parameters": {...}}`` (or ``"arguments"``).

    The output must start, after whitespace, with ``{`` or ``<|python_tag|>``, otherwise it is
    all content. Several calls are separated by ``;`` (a trailing one is dropped); from the
    first part that is not a call on, the text is content.
    """

    name = "llama3_json"
    _streamer_class = _Llama3JsonStreamer


class MistralToolParser(ToolParser):
    """Mistral: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` or, in newer
    tokenizers, ``[TOOL_CALLS]name[ARGS]{...}`` with one marker per call.

    Text before and between blocks is content. An array block is all calls or, if any element
    is malformed, all content.
    """

    name = "mistral"
    _streamer_class = _MistralStreamer


class PythonicToolParser(ToolParser):
    """Llama 3.2 / 4 pythonic calls: the whole output is ``[f(a=1), g(b="x")]``.

    Keyword arguments with literal values only (strings, numbers, booleans, ``None``, lists,
    dicts); Llama 4's ``<|python_start|>``/``<|python_end|>`` wrapper is accepted. Anything
    else, including text around the list, is all content.
    """

    name = "pythonic"
    _streamer_class = _PythonicStreamer


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser
    for parser in (HermesToolParser, Llama3JsonToolParser, MistralToolParser, PythonicToolParser)
}


def detect_tool_parser(chat_template: str | None) -> str | None:
    """The tool parser a chat template implies, by the first rule that matches:

    1. ``<tool_call>`` in the template: ``"hermes"`` (Hermes, Qwen2.5, Qwen3);
    2. ``[TOOL_CALLS]``: ``"mistral"``;
    3. ``<|python_tag|>``, or both ``"parameters"`` (quoted) and ``ipython``: ``"llama3_json"``;
    4. an example call list such as ``[func_name1(param_name1=value1, ...)]`` (how pythonic
       templates, vLLM's for Llama 3.2 and Gemma 3 and pagoda's Gemma 3 default, describe the
       format): ``"pythonic"``;
    5. otherwise ``None``.
    """
    if not chat_template:
        return None
    if "<tool_call>" in chat_template:
        return "hermes"
    if "[TOOL_CALLS]" in chat_template:
        return "mistral"
    if "<|python_tag|>" in chat_template or (
            '"parameters"' in chat_template and "ipython" in chat_template):
        return "llama3_json"
    if _PYTHONIC_EXAMPLE.search(chat_template):
        return "pythonic"
    return None
