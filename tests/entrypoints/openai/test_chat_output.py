"""A chat choice's text into reasoning, content and tool calls: forced-call streams, the
auto parser, reasoning under a grammar, and streamed pieces equal to the whole message."""

from __future__ import annotations

import json
import random

import pytest

from pagoda.entrypoints.openai.chat_output import (
    ChoiceMessage,
    ChoiceStream,
    ToolSetup,
    forced_tool_constraint,
    whole_message,
)
from pagoda.entrypoints.openai.protocol import ChatCompletionRequest
from pagoda.entrypoints.openai.reasoning_parsers import DeepSeekR1ReasoningParser
from pagoda.entrypoints.openai.tool_parsers import HermesToolParser

TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}},
         {"type": "function", "function": {"name": "now"}}]


def request(**kwargs) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], tools=TOOLS,
                                 **kwargs)


def streamed(stream: ChoiceStream, text: str, seed: int) -> ChoiceMessage:
    """Feed `text` in random pieces; the message the deltas add up to."""
    rng = random.Random(seed)
    message, pos = ChoiceMessage(), 0
    while pos < len(text):
        step = rng.randint(1, 7)
        for delta in stream.feed(text[pos:pos + step]):
            message.add(delta)
        pos += step
    for delta in stream.finish():
        message.add(delta)
    return message


def calls(message: ChoiceMessage) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]


REQUIRED = '[{"name": "add", "parameters": {"a": 1}}, {"name": "now", "parameters": {}}]'
CASES = [
    (ToolSetup("required"), None, REQUIRED, [("add", {"a": 1}), ("now", {})], ""),
    (ToolSetup("named", "add"), None, '{"a": 7}', [("add", {"a": 7})], ""),
    (ToolSetup("auto", parser=HermesToolParser()), None,
     'Sure.<tool_call>\n{"name": "add", "arguments": {"a": 2}}\n</tool_call>',
     [("add", {"a": 2})], "Sure."),
    (ToolSetup("auto", parser=HermesToolParser()), DeepSeekR1ReasoningParser(),
     'let me add</think>\n<tool_call>{"name": "add", "arguments": {"a": 3}}</tool_call>',
     [("add", {"a": 3})], ""),
    (ToolSetup(), DeepSeekR1ReasoningParser(), "hmm</think>\nhello", [], "\nhello"),
    # `required` cut off by max_tokens before its first call is whole: the partial call is
    # the content, streamed as well as whole
    (ToolSetup("required"), None, '[{"name": "add", "param', [], '[{"name": "add", "param'),
    (ToolSetup("required"), None, REQUIRED[:-9], [("add", {"a": 1})], ""),
]


@pytest.mark.parametrize("setup, reasoning, text, expected_calls, content", CASES)
def test_streams_add_up_to_the_whole_message(setup, reasoning, text, expected_calls, content):
    whole = whole_message(ChoiceStream(reasoning, setup), text)
    assert calls(whole) == expected_calls and whole.content == content
    for seed in range(20):
        pieces = streamed(ChoiceStream(reasoning, setup), text, seed)
        assert calls(pieces) == expected_calls
        assert (pieces.content, pieces.reasoning) == (whole.content, whole.reasoning)
        ids = [c.id for c in pieces.tool_calls]
        assert len(set(ids)) == len(ids) and all(i.startswith("call_") for i in ids)


def test_finish_reasons_follow_openai():
    for mode, expected in (("required", "tool_calls"), ("named", "stop")):
        stream = ChoiceStream(None, ToolSetup(mode, "add" if mode == "named" else None))
        whole_message(stream, REQUIRED if mode == "required" else "{}")
        assert stream.finish_reason("stop") == expected
        assert stream.finish_reason("length") == "length"
    plain = ChoiceStream(None, ToolSetup())
    whole_message(plain, "hello")
    assert plain.finish_reason("stop") == "stop"


def test_under_a_grammar_reasoning_needs_a_leading_think():
    r1 = DeepSeekR1ReasoningParser()
    free = whole_message(ChoiceStream(r1, ToolSetup()), '{"a": 1}')
    assert free.reasoning == '{"a": 1}' and free.content == ""  # R1: unterminated = reasoning
    constrained = whole_message(ChoiceStream(r1, ToolSetup(), constrained=True), '{"a": 1}')
    assert constrained.content == '{"a": 1}' and constrained.reasoning == ""


def test_forced_constraints():
    named = forced_tool_constraint(request(tool_choice={"type": "function",
                                                        "function": {"name": "now"}}),
                                   ToolSetup("named", "now"))
    assert json.loads(named.json) == {"type": "object"}  # a function without parameters
    one = forced_tool_constraint(request(tool_choice="required", parallel_tool_calls=False),
                                 ToolSetup("required"))
    schema = json.loads(one.json)
    assert schema["maxItems"] == 1 and schema["minItems"] == 1
    assert [item["properties"]["name"]["enum"] for item in schema["items"]["anyOf"]] == \
        [["add"], ["now"]]
    assert forced_tool_constraint(request(tool_choice="auto"), ToolSetup("auto")) is None
