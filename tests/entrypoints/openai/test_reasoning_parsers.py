"""Reasoning parsers: where reasoning ends, content kept whole after it, markers split across
deltas, bounded time, and streaming that reassembles to exactly what ``parse()`` returns."""

from __future__ import annotations

import random
import time

import pytest

from pagoda.entrypoints.openai.reasoning_parsers import (
    REASONING_PARSERS,
    DeepSeekR1ReasoningParser,
    Qwen3ReasoningParser,
    ReasoningDelta,
    ReasoningParser,
    detect_reasoning_parser,
)

TIME_LIMIT_S = 2.0
MB = 1 << 20

R1_RECORDED = (
    "<think>\nOkay, the user is asking for 17 * 23. Let me break it down: 17 * 20 = 340 and "
    "17 * 3 = 51, so 340 + 51 = 391.\n</think>\n\n17 × 23 = **391**."
)
QWEN3_RECORDED = (
    "<think>\nThe user wants the capital of France. That's Paris.\n</think>\n\n"
    "The capital of France is Paris."
)

DEEPSEEK_CASES = [
    ("recorded", R1_RECORDED,
     ("\nOkay, the user is asking for 17 * 23. Let me break it down: 17 * 20 = 340 and "
      "17 * 3 = 51, so 340 + 51 = 391.\n"), "\n\n17 × 23 = **391**."),
    ("opening_in_prompt", "Okay, 2 + 2.\n</think>\n\n4", "Okay, 2 + 2.\n", "\n\n4"),
    ("unterminated", "<think>still thinking", "still thinking", None),
    ("no_markers", "just reasoning", "just reasoning", None),
    ("empty_reasoning", "<think></think>Answer", None, "Answer"),
    ("close_only", "</think>Answer", None, "Answer"),
    ("newline_kept", "r</think>\nA", "r", "\nA"),
    ("both_newlines_kept", "r</think>\n\nA", "r", "\n\nA"),
    ("no_newline", "r</think>A\n", "r", "A\n"),
    ("space_not_stripped", "r</think> A", "r", " A"),
    ("space_before_open", "\n\n<think>r</think>a", "r", "a"),
    ("space_without_open", "  r</think>a", "  r", "a"),
    ("second_close_is_content", "r</think>a</think>b", "r", "a</think>b"),
    ("open_inside_reasoning", "<think>a<think>b</think>c", "a<think>b", "c"),
    ("partial_markers_are_text", "a </thin b <thi", "a </thin b <thi", None),
    ("ends_with_partial_close", "abc</thi", "abc</thi", None),
    ("empty", "", None, None),
    ("close_and_newline", "</think>\n", None, "\n"),
    ("unicode", "<think>思考 😀</think>\n答案", "思考 😀", "\n答案"),
]

QWEN3_CASES = [
    ("recorded", QWEN3_RECORDED, "\nThe user wants the capital of France. That's Paris.\n",
     "\n\nThe capital of France is Paris."),
    ("thinking_disabled", "The capital of France is Paris.", None,
     "The capital of France is Paris."),
    ("unterminated", "<think>reasoning...", "reasoning...", None),
    ("close_without_open_is_content", "a</think>b", None, "a</think>b"),
    ("open_not_at_start", "Hi <think>x</think>y", None, "Hi <think>x</think>y"),
    ("space_before_open", "\n<think>r</think>\na", "r", "\na"),
    ("leading_space_content", "  hello", None, "  hello"),
    ("empty_reasoning", "<think></think>\n\nA", None, "\n\nA"),
    ("partial_open", "<thin", None, "<thin"),
    ("open_only", "<think>", None, None),
    ("empty", "", None, None),
    ("whitespace_only", " \n", None, " \n"),
    ("second_close_is_content", "<think>r</think>a</think>b", "r", "a</think>b"),
]

CASES = {"deepseek_r1": DEEPSEEK_CASES, "qwen3": QWEN3_CASES}


def parse(name: str, text: str) -> tuple[str | None, str | None]:
    return REASONING_PARSERS[name]().parse(text)


def stream(name: str, pieces: list[str]) -> tuple[str | None, str | None]:
    streamer = REASONING_PARSERS[name]().streamer()
    events = []
    for piece in pieces:
        events += streamer.feed(piece)
    events += streamer.finish()
    for event in events:
        assert isinstance(event, ReasoningDelta)
        assert (event.reasoning is None) != (event.content is None)
        assert event.reasoning or event.content
    reasoning = "".join(event.reasoning for event in events if event.reasoning is not None)
    content = "".join(event.content for event in events if event.content is not None)
    return reasoning or None, content or None


def random_pieces(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    longest = rng.choice([2, 3, 5, 16])
    pieces, pos = [], 0
    while pos < len(text):
        size = rng.randint(0, longest)
        pieces.append(text[pos:pos + size])
        pos += size
    return pieces


def timed(fn, *args):
    started = time.perf_counter()
    result = fn(*args)
    elapsed = time.perf_counter() - started
    assert elapsed < TIME_LIMIT_S, f"took {elapsed:.2f}s"
    return result


def _case_params() -> list:
    return [pytest.param(name, text, reasoning, content, id=f"{name}-{case_id}")
            for name, cases in CASES.items() for case_id, text, reasoning, content in cases]


def _all_texts() -> list:
    return [pytest.param(text, id=f"{name}-{case_id}")
            for name, cases in CASES.items() for case_id, text, _, _ in cases]


@pytest.mark.parametrize(("name", "text", "reasoning", "content"), _case_params())
def test_parse(name: str, text: str, reasoning: str | None, content: str | None) -> None:
    assert parse(name, text) == (reasoning, content)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("text", _all_texts())
def test_streaming_matches_parse_for_any_split(name: str, text: str) -> None:
    expected = parse(name, text)
    assert stream(name, [text]) == expected
    assert stream(name, list(text)) == expected
    for seed in range(20):
        pieces = random_pieces(text, seed)
        assert stream(name, pieces) == expected, pieces


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("cut", range(len(R1_RECORDED) + 1))
def test_every_two_way_split(name: str, cut: int) -> None:
    pieces = [R1_RECORDED[:cut], R1_RECORDED[cut:]]
    assert stream(name, pieces) == parse(name, R1_RECORDED)


def test_close_marker_split_across_deltas() -> None:
    streamer = DeepSeekR1ReasoningParser().streamer()
    assert streamer.feed("abc</thi") == [ReasoningDelta(reasoning="abc")]
    assert streamer.feed("nk>") == []
    assert streamer.feed("\n") == [ReasoningDelta(content="\n")]  # kept, as vLLM keeps it
    assert streamer.feed("\nX") == [ReasoningDelta(content="\nX")]
    assert streamer.finish() == []


def test_held_back_partial_marker_is_released_at_the_end() -> None:
    streamer = DeepSeekR1ReasoningParser().streamer()
    assert streamer.feed("abc</thi") == [ReasoningDelta(reasoning="abc")]
    assert streamer.finish() == [ReasoningDelta(reasoning="</thi")]


def test_deepseek_streams_implicit_reasoning_at_once() -> None:
    streamer = DeepSeekR1ReasoningParser().streamer()
    assert streamer.feed("Okay") == [ReasoningDelta(reasoning="Okay")]
    assert streamer.feed("<") == []  # could still be "</think>"
    assert streamer.feed("x") == [ReasoningDelta(reasoning="<x")]


def test_qwen3_waits_only_for_the_opening_marker() -> None:
    streamer = Qwen3ReasoningParser().streamer()
    assert streamer.feed(" <thi") == []
    assert streamer.feed("nk>r") == [ReasoningDelta(reasoning="r")]
    streamer = Qwen3ReasoningParser().streamer()
    assert streamer.feed("Hello") == [ReasoningDelta(content="Hello")]
    assert streamer.feed("</think>") == [ReasoningDelta(content="</think>")]


def test_feed_after_finish_is_an_error() -> None:
    streamer = Qwen3ReasoningParser().streamer()
    assert streamer.finish() == []
    with pytest.raises(RuntimeError):
        streamer.feed("x")


def _hostile_cases() -> list[tuple[str, dict[str, tuple[str | None, str | None]]]]:
    """(text, expected split per parser) for outputs of about a megabyte."""
    x, partials, opens, closes = "x" * MB, "</thin" * (MB // 6), MB // 7, MB // 8
    spaces = " " * MB + "<thi"
    return [
        (x, {"deepseek_r1": (x, None), "qwen3": (None, x)}),
        ("<think>" + x, {"deepseek_r1": (x, None), "qwen3": (x, None)}),
        ("<think>" + partials, {"deepseek_r1": (partials, None), "qwen3": (partials, None)}),
        ("<think>" * opens, {"deepseek_r1": ("<think>" * (opens - 1), None),
                             "qwen3": ("<think>" * (opens - 1), None)}),
        ("</think>" * closes, {"deepseek_r1": (None, "</think>" * (closes - 1)),
                               "qwen3": (None, "</think>" * closes)}),
        (spaces, {"deepseek_r1": (spaces, None), "qwen3": (None, spaces)}),
        ("<think>" + "<" * MB + "</think>\n" + "y" * MB,
         {"deepseek_r1": ("<" * MB, "\n" + "y" * MB), "qwen3": ("<" * MB, "\n" + "y" * MB)}),
    ]


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("number", range(7))
def test_huge_outputs_in_bounded_time(name: str, number: int) -> None:
    text, expected = _hostile_cases()[number]
    assert timed(parse, name, text) == expected[name]
    pieces = [text[i:i + 61] for i in range(0, len(text), 61)]
    assert timed(stream, name, pieces) == expected[name]


QWEN3_TEMPLATE = (
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
)
R1_TEMPLATE = (
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
)
CHATML_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\\n{{ m.content }}{% endfor %}"


@pytest.mark.parametrize(("template", "expected"), [
    (QWEN3_TEMPLATE, "qwen3"),
    (R1_TEMPLATE, "deepseek_r1"),
    (CHATML_TEMPLATE, None),
    ("{% if enable_thinking %}{% endif %}", None),
    ("", None),
    (None, None),
])
def test_detect_reasoning_parser(template: str | None, expected: str | None) -> None:
    assert detect_reasoning_parser(template) == expected


def test_registry() -> None:
    assert set(REASONING_PARSERS) == {"deepseek_r1", "qwen3"}
    for name, parser in REASONING_PARSERS.items():
        assert issubclass(parser, ReasoningParser) and parser.name == name
