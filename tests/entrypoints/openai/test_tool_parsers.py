"""Tool-call parsers: every format, fail-soft on malformed output, bounded time on hostile
output, and streaming that reassembles to exactly what ``parse()`` returns."""

from __future__ import annotations

import json
import random
import re
import time
from typing import Any

import pytest

from pagoda.entrypoints.openai.tool_parsers import (
    MAX_PYTHONIC_CHARS,
    MAX_TOOL_CALLS,
    TOOL_PARSERS,
    ContentDelta,
    HermesToolParser,
    Llama3JsonToolParser,
    MistralToolParser,
    ParsedToolCall,
    PythonicToolParser,
    ToolCallDelta,
    ToolParser,
    ToolParseResult,
    detect_tool_parser,
    make_tool_call_id,
    parse_pythonic_calls,
)

CALL_ID = re.compile(r"call_[A-Za-z0-9]{24}")
TIME_LIMIT_S = 2.0
MB = 1 << 20


def call(name: str, **arguments: Any) -> ParsedToolCall:
    return ParsedToolCall(name, json.dumps(arguments, ensure_ascii=False))


def parse(fmt: str, text: str) -> ToolParseResult:
    return TOOL_PARSERS[fmt]().parse(text)


def assemble(events: list) -> ToolParseResult:
    """Rebuilds a result from stream events, checking they are shaped like OpenAI deltas."""
    content: list[str] = []
    names: list[str] = []
    arguments: list[list[str]] = []
    for event in events:
        if isinstance(event, ContentDelta):
            assert event.text
            content.append(event.text)
            continue
        assert isinstance(event, ToolCallDelta)
        if event.index == len(names):
            assert CALL_ID.fullmatch(event.id), event.id
            assert event.name and event.arguments == ""
            names.append(event.name)
            arguments.append([])
        else:
            assert event.index < len(names)
            assert event.id is None and event.name is None
            arguments[event.index].append(event.arguments)
    calls = [ParsedToolCall(name, "".join(parts))
             for name, parts in zip(names, arguments, strict=True)]
    return ToolParseResult("".join(content) or None, calls)


def stream(fmt: str, pieces: list[str]) -> ToolParseResult:
    streamer = TOOL_PARSERS[fmt]().streamer()
    events = []
    for piece in pieces:
        events += streamer.feed(piece)
    return assemble(events + streamer.finish())


def random_pieces(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    longest = rng.choice([2, 4, 8, 32])
    pieces, pos = [], 0
    while pos < len(text):
        size = rng.randint(0, longest)  # empty deltas happen too
        pieces.append(text[pos:pos + size])
        pos += size
    return pieces


def splits(text: str) -> list[list[str]]:
    return [[text], list(text), *(random_pieces(text, seed) for seed in range(12))]


def timed(fn, *args):
    started = time.perf_counter()
    result = fn(*args)
    elapsed = time.perf_counter() - started
    assert elapsed < TIME_LIMIT_S, f"took {elapsed:.2f}s"
    return result


# --- cases: (id, text, content, calls) ----------------------------------------------------------

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
SEARCH_ARGS = {"query": 'café "best" croissant', "filters": {"open_now": True, "price": [1, 2]},
               "limit": 5, "ratio": 0.5, "note": None}
SEARCH = json.dumps({"name": "web_search", "arguments": SEARCH_ARGS}, ensure_ascii=False)
WEATHER_CALL = call("get_weather", city="Paris", unit="celsius")
SEARCH_CALL = call("web_search", **SEARCH_ARGS)

HERMES_CASES = [
    ("single", f"<tool_call>\n{WEATHER}\n</tool_call>", None, [WEATHER_CALL]),
    ("compact", '<tool_call>{"name":"f","arguments":{"a":1}}</tool_call>', None,
     [call("f", a=1)]),
    ("several", f"<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n{SEARCH}\n</tool_call>",
     None, [WEATHER_CALL, SEARCH_CALL]),
    ("content_before",
     f"I'll look up the weather in Paris for you.\n\n<tool_call>\n{WEATHER}\n</tool_call>",
     "I'll look up the weather in Paris for you.\n\n", [WEATHER_CALL]),
    ("qwen3_recorded",
     ("<tool_call>\n"
      '{"name": "get_current_temperature", "arguments": {"location": "San Francisco, CA, USA"}}'
      "\n</tool_call>\n<tool_call>\n"
      '{"name": "get_temperature_date", "arguments": {"location": "San Francisco, CA, USA", '
      '"date": "2024-10-01"}}\n</tool_call>'),
     None, [call("get_current_temperature", location="San Francisco, CA, USA"),
            call("get_temperature_date", location="San Francisco, CA, USA",
                 date="2024-10-01")]),
    ("content_after", f"<tool_call>{WEATHER}</tool_call>\nDone.", "\nDone.", [WEATHER_CALL]),
    ("markers_inside_strings",
     ('<tool_call>{"name": "echo", "arguments": {"s": "</tool_call><tool_call>\\"}"}}'
      "</tool_call>"), None, [call("echo", s='</tool_call><tool_call>"}')]),
    ("unicode", ('<tool_call>{"name": "translate", "arguments": '
                 '{"text": "Zürich \\u00e9 😀"}}</tool_call>'), None,
     [call("translate", text="Zürich é 😀")]),
    ("plain", "The weather in Paris is sunny, 21°C.", "The weather in Paris is sunny, 21°C.",
     []),
    ("only_whitespace", "\n\n", "\n\n", []),
    ("whitespace_around_calls", f"\n<tool_call>{WEATHER}</tool_call>\n", None, [WEATHER_CALL]),
    ("angle_brackets", "if a < b and c <tool> d <tool_call", "if a < b and c <tool> d <tool_call",
     []),
]

HERMES_MALFORMED = [
    '<tool_call>\n{"name": "f", "arguments": {"x": }\n</tool_call>',
    '<tool_call>\n{"name": "f", "arguments": {"x": 1}}',
    'Sure! <tool_call>\n{"name": "f", "arguments": {"x": 1',
    "<tool_call>",
    "<tool_call></tool_call>",
    "<tool_call>not json</tool_call>",
    '<tool_call>{"name": "f", "arguments": [1, 2]}</tool_call>',
    '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>',
    '<tool_call>{"name": "f", "arguments": 3}</tool_call>',
    '<tool_call>{"name": "f", "arguments": null}</tool_call>',
    '<tool_call>{"name": "f"}</tool_call>',
    '<tool_call>{"name": "", "arguments": {}}</tool_call>',
    '<tool_call>{"name": 7, "arguments": {}}</tool_call>',
    '<tool_call>{"arguments": {}}</tool_call>',
    '<tool_call>["f", {}]</tool_call>',
    '<tool_call>{"name": "f", "arguments": {}} trailing</tool_call>',
    '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>',
    '<tool_call>{"name": "f", "arguments": {"x": 1e999}}</tool_call>',
    '<tool_call>{"name": "f", "arguments": {"x": 1}]</tool_call>',
    '<tool_call>{"name": "f", "arguments": {}}</tool_cal',
]

LLAMA_CALL = '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}'
LLAMA3_CASES = [
    ("single", LLAMA_CALL, None, [WEATHER_CALL]),
    ("python_tag", "<|python_tag|>" + LLAMA_CALL, None, [WEATHER_CALL]),
    ("several", LLAMA_CALL + "; " + SEARCH, None, [WEATHER_CALL, SEARCH_CALL]),
    ("several_tagged", "<|python_tag|>" + LLAMA_CALL + ";" + LLAMA_CALL, None,
     [WEATHER_CALL, WEATHER_CALL]),
    ("leading_space", "\n\n  " + LLAMA_CALL + "\n", None, [WEATHER_CALL]),
    ("trailing_semicolon", LLAMA_CALL + "; ", None, [WEATHER_CALL]),
    ("llama32_recorded",
     ('{"type": "function", "name": "get_current_conditions", "parameters": '
      '{"location": "San Francisco, CA", "unit": "Fahrenheit"}}'), None,
     [call("get_current_conditions", location="San Francisco, CA", unit="Fahrenheit")]),
    ("text_after_call", LLAMA_CALL + " Hope that helps!", " Hope that helps!", [WEATHER_CALL]),
    ("second_not_a_call", LLAMA_CALL + '; {"name": 2}', '; {"name": 2}', [WEATHER_CALL]),
    ("plain", "The answer is 42.", "The answer is 42.", []),
    ("json_after_text", "Here: " + LLAMA_CALL, "Here: " + LLAMA_CALL, []),
]

LLAMA3_MALFORMED = [
    '{"city": "Paris", "temperature": 21}',
    '{"name": "f", "parameters": {"x": 1}',
    '{"name": "f", "parameters": "x=1"}',
    '{"name": "f", "parameters": [1]}',
    '{"name": "", "parameters": {}}',
    '{"name": "f"}',
    '{"name": "f", "parameters": {}',
    "{not json}",
    "<|python_tag|>",
    '<|python_tag|>brave_search.call(query="weather in Paris")',
    "<|python_tag|> print(1)",
    "<|python_ta",
    "  {",
]

MISTRAL_CASES = [
    ("array_single", ('[TOOL_CALLS] [{"name": "get_weather", "arguments": '
                      '{"city": "Paris", "unit": "celsius"}}]'), None, [WEATHER_CALL]),
    ("array_several", f"[TOOL_CALLS][{WEATHER}, {SEARCH}]", None, [WEATHER_CALL, SEARCH_CALL]),
    ("args_single", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}', None,
     [WEATHER_CALL]),
    ("args_several", ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}'
                      f"[TOOL_CALLS]web_search[ARGS]{json.dumps(SEARCH_ARGS)}"), None,
     [WEATHER_CALL, SEARCH_CALL]),
    ("content_before", 'Let me check that.[TOOL_CALLS]get_time[ARGS]{}', "Let me check that.",
     [call("get_time")]),
    ("mistral_small_recorded",
     ('[TOOL_CALLS][{"name": "get_current_weather", "arguments": {"location": "Paris, France", '
      '"format": "celsius"}}]'), None,
     [call("get_current_weather", location="Paris, France", format="celsius")]),
    ("name_chars", "[TOOL_CALLS]my-tool.v2_x[ARGS]{}", None, [call("my-tool.v2_x")]),
    ("longest_name", f"[TOOL_CALLS]{'n' * 64}[ARGS]{{}}", None, [call("n" * 64)]),
    ("valid_then_invalid", '[TOOL_CALLS]a[ARGS]{}[TOOL_CALLS]b[ARGS]"x"',
     '[TOOL_CALLS]b[ARGS]"x"', [call("a")]),
    ("text_after", "[TOOL_CALLS]a[ARGS]{} ok", " ok", [call("a")]),
    ("plain", "Paris is the capital of France [1].", "Paris is the capital of France [1].", []),
]

MISTRAL_MALFORMED = [
    "[TOOL_CALLS]",
    "[TOOL_CALLS][]",
    '[TOOL_CALLS][{"name": "f", "arguments": {}}, {"name": "g"}]',
    '[TOOL_CALLS][{"name": "f", "arguments": [1]}]',
    '[TOOL_CALLS][{"name": "f", "arguments": {}}',
    '[TOOL_CALLS]{"name": "f", "arguments": {}}',
    "[TOOL_CALLS]f[ARGS][1, 2]",
    '[TOOL_CALLS]f[ARGS]"x"',
    '[TOOL_CALLS]get_weather {"city": "Paris"}',
    "[TOOL_CALLS][ARGS]{}",
    f"[TOOL_CALLS]{'n' * 65}[ARGS]{{}}",
    '[TOOL_CALLS]f[ARGS]{"a": "b',
    "[TOOL_CALLS]f[ARG",
    "[TOOL_CALLS]f [ARGS]{}",
    '[TOOL_CALLS][{"name": "f", "arguments": {"x": NaN}}]',
]

PYTHONIC_CASES = [
    ("single", '[get_weather(city="Paris", unit="celsius")]', None, [WEATHER_CALL]),
    ("several", '[get_weather(city="Paris", unit="celsius"), get_time(tz=\'Europe/Paris\')]',
     None, [WEATHER_CALL, call("get_time", tz="Europe/Paris")]),
    ("literals", ("[f(s='x', i=-3, fl=2.5, b=True, n=None, l=[1, 'a'], t=(1, 2), "
                  "d={'k': {'n': [False]}})]"), None,
     [call("f", s="x", i=-3, fl=2.5, b=True, n=None, l=[1, "a"], t=[1, 2],
           d={"k": {"n": [False]}})]),
    ("no_arguments", "[get_time()]", None, [call("get_time")]),
    ("llama4_wrapper", "<|python_start|>[f(x=1)]<|python_end|>", None, [call("f", x=1)]),
    ("whitespace", "  \n[ f (x=1) ,\n  g(y='z') ]\n", None, [call("f", x=1), call("g", y="z")]),
    ("unicode", '[translate(text="Zürich 😀")]', None, [call("translate", text="Zürich 😀")]),
    ("llama32_recorded",
     ('[get_user_info(user_id=7890, special="black"), get_weather(city="San Francisco", '
      'metric="celsius")]'), None,
     [call("get_user_info", user_id=7890, special="black"),
      call("get_weather", city="San Francisco", metric="celsius")]),
    ("plain", "The weather is nice.", "The weather is nice.", []),
]

PYTHONIC_MALFORMED = [
    "[docs](https://example.com)",
    "[1] Smith et al.",
    "[]",
    "[f(1)]",
    '[f(x=open("/etc/passwd"))]',
    "[f(x=__import__('os').system('ls'))]",
    '[os.system(x="ls")]',
    "[f(**{'a': 1})]",
    "[f(a=1, a=2)]",
    "[f(x=1)] done",
    "f(x=1)",
    "(f(x=1))",
    "[f(x=1), 3]",
    "[f(x={1, 2})]",
    "[f(x=b'bytes')]",
    "[f(x=1j)]",
    "[f(x={1: 2})]",
    "[f(x=1e999)]",
    "[f(x=1",
    "[f(x=1)",
    "[get_",
    "<|python_start|>",
    "[f(x=lambda: 1)]",
    "[f(x=[i for i in range(9)])]",
]

CASES = {"hermes": HERMES_CASES, "llama3_json": LLAMA3_CASES, "mistral": MISTRAL_CASES,
         "pythonic": PYTHONIC_CASES}
MALFORMED = {"hermes": HERMES_MALFORMED, "llama3_json": LLAMA3_MALFORMED,
             "mistral": MISTRAL_MALFORMED, "pythonic": PYTHONIC_MALFORMED}
FORMATS = list(CASES)


def _case_params():
    for fmt, cases in CASES.items():
        for case_id, text, content, calls in cases:
            yield pytest.param(fmt, text, content, calls, id=f"{fmt}-{case_id}")


def _malformed_params():
    for fmt, texts in MALFORMED.items():
        for number, text in enumerate(texts):
            yield pytest.param(fmt, text, id=f"{fmt}-{number}")


def _all_texts():
    for fmt in FORMATS:
        texts = [text for _, text, _, _ in CASES[fmt]] + MALFORMED[fmt]
        for number, text in enumerate(texts):
            yield pytest.param(text, id=f"{fmt}-text{number}")


# --- parse ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), list(_case_params()))
def test_parse(fmt: str, text: str, content: str | None, calls: list[ParsedToolCall]) -> None:
    assert parse(fmt, text) == ToolParseResult(content, calls)


@pytest.mark.parametrize(("fmt", "text"), list(_malformed_params()))
def test_malformed_output_stays_content(fmt: str, text: str) -> None:
    assert parse(fmt, text) == ToolParseResult(text, [])


def test_arguments_are_canonical_json() -> None:
    text = '<tool_call>{"name": "f", "arguments": {"b" : 1,\n "a":"é"}}</tool_call>'
    assert parse("hermes", text).tool_calls == [ParsedToolCall("f", '{"b": 1, "a": "é"}')]
    pythonic = parse("pythonic", "[f(b=1, a='é', c=(1,))]").tool_calls
    assert pythonic == [ParsedToolCall("f", '{"b": 1, "a": "é", "c": [1]}')]


def test_llama3_accepts_arguments_key() -> None:
    text = '{"name": "f", "arguments": {"x": 1}}'
    assert parse("llama3_json", text).tool_calls == [call("f", x=1)]


def test_hermes_keeps_a_malformed_block_between_good_ones() -> None:
    bad = '<tool_call>{"name": 1, "arguments": {}}</tool_call>'
    text = f"<tool_call>{WEATHER}</tool_call>{bad}<tool_call>{SEARCH}</tool_call>"
    assert parse("hermes", text) == ToolParseResult(bad, [WEATHER_CALL, SEARCH_CALL])


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_output(fmt: str) -> None:
    assert parse(fmt, "") == ToolParseResult(None, [])


# --- the call limit ---------------------------------------------------------------------------

MANY = MAX_TOOL_CALLS + 72


def test_hermes_calls_beyond_limit_stay_content() -> None:
    block = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    result = parse("hermes", block * MANY)
    assert result.tool_calls == [call("f")] * MAX_TOOL_CALLS
    assert result.content == block * (MANY - MAX_TOOL_CALLS)


def test_llama3_calls_beyond_limit_stay_content() -> None:
    calls = [json.dumps({"name": "f", "parameters": {"i": i}}) for i in range(MANY)]
    result = parse("llama3_json", "; ".join(calls))
    assert result.tool_calls == [call("f", i=i) for i in range(MAX_TOOL_CALLS)]
    assert result.content == "; " + "; ".join(calls[MAX_TOOL_CALLS:])


def test_mistral_calls_beyond_limit_stay_content() -> None:
    block = "[TOOL_CALLS]f[ARGS]{}"
    result = parse("mistral", block * MANY)
    assert result.tool_calls == [call("f")] * MAX_TOOL_CALLS
    assert result.content == block * (MANY - MAX_TOOL_CALLS)
    array = "[TOOL_CALLS]" + json.dumps([{"name": "f", "arguments": {}}] * MANY)
    assert parse("mistral", array) == ToolParseResult(array, [])


def test_pythonic_over_limit_is_content() -> None:
    text = "[" + ", ".join(["f(x=1)"] * MANY) + "]"
    assert parse("pythonic", text) == ToolParseResult(text, [])
    text = "[" + ", ".join(["f(x=1)"] * MAX_TOOL_CALLS) + "]"
    assert parse("pythonic", text).tool_calls == [call("f", x=1)] * MAX_TOOL_CALLS


# --- streaming --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("text", list(_all_texts()))
def test_streaming_matches_parse_for_any_split(fmt: str, text: str) -> None:
    expected = parse(fmt, text)
    for pieces in splits(text):
        assert stream(fmt, pieces) == expected, pieces


@pytest.mark.parametrize("fmt", FORMATS)
def test_streaming_matches_parse_on_long_mixed_output(fmt: str) -> None:
    rng = random.Random(7)
    pool = [text for _, text, _, _ in CASES[fmt]] + MALFORMED[fmt] + ["\n", " words ", "<", "["]
    text = "".join(rng.choice(pool) for _ in range(300))
    expected = parse(fmt, text)
    assert "".join(pieces := random_pieces(text, 3)) == text
    assert stream(fmt, pieces) == expected
    assert stream(fmt, list(text)) == expected


def test_hermes_holds_back_a_possible_marker() -> None:
    streamer = HermesToolParser().streamer()
    assert streamer.feed("Hello <tool_") == [ContentDelta("Hello ")]
    assert streamer.finish() == [ContentDelta("<tool_")]

    streamer = HermesToolParser().streamer()
    assert streamer.feed("1 <") == [ContentDelta("1 ")]
    assert streamer.feed(" 2") == [ContentDelta("< 2")]

    streamer = HermesToolParser().streamer()
    assert streamer.feed("Hello <tool_") == [ContentDelta("Hello ")]
    assert streamer.feed('call>{"name": "f", "arguments": {"a": 1}}') == []
    events = streamer.feed("</tool_call>")
    assert [(e.index, e.name, e.arguments) for e in events] == [(0, "f", ""), (0, None, '{"a": 1}')]
    assert streamer.finish() == []


def test_hermes_streams_content_and_calls_as_soon_as_known() -> None:
    streamer = HermesToolParser().streamer()
    assert streamer.feed("Checking.") == [ContentDelta("Checking.")]
    assert len(streamer.feed(f"\n<tool_call>\n{WEATHER}\n</tool_call>")) == 3  # "\n" + 2 deltas
    assert streamer.feed(" more") == [ContentDelta(" more")]


def test_whitespace_between_calls_is_held_until_known_to_be_content() -> None:
    streamer = HermesToolParser().streamer()
    assert streamer.feed("\n") == []
    assert streamer.finish() == [ContentDelta("\n")]  # no calls: the output is its content

    streamer = HermesToolParser().streamer()
    assert streamer.feed("\n") == []
    assert streamer.feed("Hi") == [ContentDelta("\nHi")]


def test_llama3_streaming_decides_at_the_first_character() -> None:
    streamer = Llama3JsonToolParser().streamer()
    assert streamer.feed("Hi") == [ContentDelta("Hi")]
    streamer = Llama3JsonToolParser().streamer()
    assert streamer.feed("  <|python") == []
    assert streamer.feed("_tag|>") == []
    events = streamer.feed(LLAMA_CALL)
    assert [e.name for e in events] == ["get_weather", None]
    assert streamer.finish() == []


def test_mistral_holds_back_a_possible_marker() -> None:
    streamer = MistralToolParser().streamer()
    assert streamer.feed("See [TOOL_") == [ContentDelta("See ")]
    assert streamer.feed("CALLS]f[AR") == []
    assert [e.name for e in streamer.feed('GS]{"a": 1}')] == ["f", None]
    assert streamer.feed(" done") == [ContentDelta(" done")]


def test_pythonic_releases_non_calls_early_and_holds_call_lists() -> None:
    streamer = PythonicToolParser().streamer()
    assert "".join(event.text for event in streamer.feed("[1] is")) == "[1] is"
    streamer = PythonicToolParser().streamer()
    assert streamer.feed("[get_") == []
    assert streamer.feed('weather(city="Paris", unit="celsius")]') == []
    assert assemble(streamer.finish()) == ToolParseResult(None, [WEATHER_CALL])


def test_feed_after_finish_is_an_error() -> None:
    streamer = HermesToolParser().streamer()
    streamer.finish()
    with pytest.raises(RuntimeError):
        streamer.feed("x")
    assert streamer.finish() == []


# --- bounded time on hostile output -----------------------------------------------------------

FILLER = "lorem ipsum dolor sit amet " * (MB // 27)
OPEN_CALL = {
    "hermes": '<tool_call>\n{"name": "write_file", "arguments": {"content": "',
    "llama3_json": '{"name": "write_file", "parameters": {"content": "',
    "mistral": '[TOOL_CALLS]write_file[ARGS]{"content": "',
    "pythonic": '[write_file(content="',
}
MARKER = {"hermes": "<tool_call>", "llama3_json": "<|python_tag|>", "mistral": "[TOOL_CALLS]",
          "pythonic": "<|python_start|>"}


def hostile_texts(fmt: str) -> list[str]:
    marker, open_call = MARKER[fmt], OPEN_CALL[fmt]
    return [
        FILLER,
        open_call + "x" * MB,
        open_call + '\\"' * (MB // 2),
        open_call + '", "a": ' + "[]" * (MB // 2),
        open_call + '", "a": ' + '"",' * (MB // 3),
        marker + "{" + "[" * 100_000,
        open_call + '", "a": ' + "[" * 100_000,
        "[" * 100_000,
        "{" * 100_000,
        marker * 50_000,
        (marker + "{") * 20_000,
        (marker + '{"name": "f", "arguments": {}') * 5_000,
        (marker + "f[ARGS]{") * 20_000,
        (marker + "[") * 50_000,
    ]


def _hostile_params():
    for fmt in FORMATS:
        for number in range(len(hostile_texts(fmt))):
            yield pytest.param(fmt, number, id=f"{fmt}-{number}")


@pytest.mark.parametrize(("fmt", "number"), list(_hostile_params()))
def test_hostile_output_is_content_in_bounded_time(fmt: str, number: int) -> None:
    text = hostile_texts(fmt)[number]
    assert timed(parse, fmt, text) == ToolParseResult(text, [])
    pieces = [text[i:i + 61] for i in range(0, len(text), 61)]
    assert timed(stream, fmt, pieces) == ToolParseResult(text, [])


def test_thousands_of_valid_blocks_are_capped_quickly() -> None:
    block = '<tool_call>{"name": "f", "arguments": {"i": 1}}</tool_call>'
    result = timed(parse, "hermes", block * 20_000)
    assert len(result.tool_calls) == MAX_TOOL_CALLS
    assert result.content == block * (20_000 - MAX_TOOL_CALLS)


def test_huge_valid_arguments_parse_quickly() -> None:
    payload = "é\\\"x" * (MB // 4)
    text = f'<tool_call>{{"name": "write", "arguments": {{"data": "{payload}"}}}}</tool_call>'
    result = timed(parse, "hermes", text)
    assert result.content is None
    assert json.loads(result.tool_calls[0].arguments) == {"data": 'é"x' * (MB // 4)}
    pieces = [text[i:i + 13] for i in range(0, len(text), 13)]
    assert timed(stream, "hermes", pieces) == result


@pytest.mark.parametrize("depth", [63, 64, 65, 100_000])
def test_json_nesting_limit(depth: int) -> None:
    arguments = '{"a": ' + "[" * (depth - 2) + "]" * (depth - 2) + "}"
    text = f'<tool_call>{{"name": "f", "arguments": {arguments}}}</tool_call>'
    result = timed(parse, "hermes", text)
    if depth <= 64:
        assert result.tool_calls == [ParsedToolCall("f", json.dumps(json.loads(arguments)))]
    else:
        assert result == ToolParseResult(text, [])


PYTHONIC_HOSTILE = [
    "[f(x=" + "[" * 100_000 + "]" * 100_000 + ")]",
    "[f(x=" + "(" * 100_000,
    "[" + "f(" * 100_000,
    "[f(x=" + "1+" * 100_000 + "1)]",
    "[f(x=" + "-" * 100_000 + "1)]",
    "[f(x=" + "not " * 50_000 + "1)]",
    "[f(x=" + "a." * 100_000 + "b)]",
    "[f(x=" + "{'a': " * 50_000 + "1" + "}" * 50_000 + ")]",
    "[f(x='" + "a" * MB + "')]",
    "[" + "a" * MB + "(x=1)]",
    "[" + " " * MB + "f(x=1)]",
    "[f(x=" + "9" * 5000 + ")]",
    "[" + ", ".join(["f(x=1)"] * 20_000) + "]",
    "[f(x='''" + "'" * 100_000 + ")]",
]


@pytest.mark.parametrize("number", range(len(PYTHONIC_HOSTILE)))
def test_pythonic_hostile_input_is_content_in_bounded_time(number: int) -> None:
    text = PYTHONIC_HOSTILE[number]
    assert timed(parse, "pythonic", text) == ToolParseResult(text, [])
    pieces = [text[i:i + 509] for i in range(0, len(text), 509)]
    assert timed(stream, "pythonic", pieces) == ToolParseResult(text, [])


def test_largest_pythonic_call_parses_in_bounded_time() -> None:
    text = "[f(x=[" + "[1]," * 15_000 + "])]"
    assert len(text) < MAX_PYTHONIC_CHARS
    result = timed(parse, "pythonic", text)
    assert result == ToolParseResult(None, [call("f", x=[[1]] * 15_000)])


def test_pythonic_over_the_size_cap_is_released_before_the_end() -> None:
    streamer = PythonicToolParser().streamer()
    head = "[f(x='" + "a" * MAX_PYTHONIC_CHARS
    assert "".join(event.text for event in streamer.feed(head)) == head
    assert streamer.feed("')]") == [ContentDelta("')]")]
    assert parse_pythonic_calls(head + "')]") is None
    small = "[f(x='" + "a" * 1000 + "')]"
    assert parse_pythonic_calls(small) == [("f", json.dumps({"x": "a" * 1000}))]


def test_pythonic_nesting_limit() -> None:
    # the list and the call's parentheses are two of the 64 levels
    assert parse("pythonic", "[f(x=" + "[" * 62 + "]" * 62 + ")]").tool_calls
    text = "[f(x=" + "[" * 63 + "]" * 63 + ")]"
    assert parse("pythonic", text) == ToolParseResult(text, [])
    nested_in_string = "[f(x='" + "[" * 1000 + "')]"
    assert parse("pythonic", nested_in_string).tool_calls == [call("f", x="[" * 1000)]


# --- detection, ids, registry -----------------------------------------------------------------

QWEN_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}# Tools\\n\\nYou may call one or more functions"
    "...<tools>{%- for tool in tools %}{{- tool | tojson }}{%- endfor %}</tools>\\n\\nFor each "
    "function call, return a json object with function name and arguments within <tool_call>"
    "</tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n{%- endif %}"
)
MISTRAL_TEMPLATE = (
    "{%- elif message.tool_calls is defined %}{{- '[TOOL_CALLS][' }}{%- for tool_call in "
    "message.tool_calls %}{{- tool_call.function | tojson }}{%- endfor %}{{- ']' + eos_token }}"
)
LLAMA31_TEMPLATE = (
    "{%- if builtin_tools is defined %}{{- '<|python_tag|>' + tool_call.name }}{%- else %}"
    "{{- '{\"name\": \"' + tool_call.name + '\", ' }}{{- '\"parameters\": ' }}{%- endif %}"
    "{%- elif message.role == \"tool\" or message.role == \"ipython\" %}"
)
LLAMA32_TEMPLATE = (
    "Respond in the format {\"name\": function name, \"parameters\": dictionary of argument "
    "name and its value}. {%- if message.role == \"ipython\" %}<|start_header_id|>ipython"
)
CHATML_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\\n{{ m.content }}{% endfor %}"


@pytest.mark.parametrize(("template", "expected"), [
    (QWEN_TEMPLATE, "hermes"),
    (MISTRAL_TEMPLATE, "mistral"),
    (LLAMA31_TEMPLATE, "llama3_json"),
    (LLAMA32_TEMPLATE, "llama3_json"),
    (CHATML_TEMPLATE, None),
    ('{"parameters": {}}', None),
    ("", None),
    (None, None),
])
def test_detect_tool_parser(template: str | None, expected: str | None) -> None:
    assert detect_tool_parser(template) == expected


def test_make_tool_call_id() -> None:
    ids = {make_tool_call_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(CALL_ID.fullmatch(call_id) for call_id in ids)


def test_registry() -> None:
    assert set(TOOL_PARSERS) == {"hermes", "llama3_json", "mistral", "pythonic"}
    for name, parser in TOOL_PARSERS.items():
        assert issubclass(parser, ToolParser) and parser.name == name
    assert detect_tool_parser(QWEN_TEMPLATE) in TOOL_PARSERS
