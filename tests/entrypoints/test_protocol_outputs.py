"""A reasoning model's output (Qwen3's: <think>, then Hermes tool calls) through the real
reasoning and tool-call parsers, as each protocol words it: Anthropic's content blocks and
stream events, the Responses API's output items and events, Ollama's message fields; fed in
random pieces, the result is the same as fed whole."""

from __future__ import annotations

import json
import random

import pytest

from pagoda.entrypoints.anthropic.serving import _Blocks
from pagoda.entrypoints.ollama.serving import _tool_calls
from pagoda.entrypoints.openai.chat_output import ChoiceMessage, ChoiceStream, ToolSetup
from pagoda.entrypoints.openai.reasoning_parsers import Qwen3ReasoningParser
from pagoda.entrypoints.openai.serving_responses import _Items
from pagoda.entrypoints.openai.tool_parsers import HermesToolParser

OUTPUT = ('<think>\nThe user wants the weather and a sum.\n</think>\n\nLet me check.'
          '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n'
          '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n'
          '</tool_call>')
REASONING = "\nThe user wants the weather and a sum.\n"


def deltas(seed: int | None) -> list:
    """The chat deltas of OUTPUT, fed whole (seed None) or in random pieces."""
    stream = ChoiceStream(Qwen3ReasoningParser(), ToolSetup("auto", parser=HermesToolParser()))
    if seed is None:
        return stream.feed(OUTPUT) + stream.finish()
    rng, pos, out = random.Random(seed), 0, []
    while pos < len(OUTPUT):
        step = rng.randint(1, 9)
        out += stream.feed(OUTPUT[pos:pos + step])
        pos += step
    return out + stream.finish()


def sse_events(lines: list[str]) -> list[tuple[str, dict]]:
    events = []
    for line in lines:
        kind, data = line.strip().split("\n")
        events.append((kind.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return events


@pytest.mark.parametrize("seed", [None, 1, 2, 3])
def test_anthropic_blocks_and_events(seed):
    blocks, lines = _Blocks(), []
    for delta in deltas(seed):
        lines += blocks.add(delta)
    lines += blocks.close()
    assert [b["type"] for b in blocks.content] == ["thinking", "text", "tool_use", "tool_use"]
    assert blocks.content[0]["thinking"].strip() == REASONING.strip()
    assert blocks.content[1]["text"] == "\n\nLet me check."
    assert [(b["name"], b["input"]) for b in blocks.content[2:]] == [
        ("get_weather", {"city": "Zürich"}), ("add", {"a": 2, "b": 3})]
    events = sse_events(lines)
    starts = [e for k, e in events if k == "content_block_start"]
    stops = [e["index"] for k, e in events if k == "content_block_stop"]
    assert [s["index"] for s in starts] == stops == [0, 1, 2, 3]
    for index, block in enumerate(blocks.content[2:], start=2):
        json_text = "".join(e["delta"]["partial_json"] for k, e in events
                            if k == "content_block_delta" and e["index"] == index)
        assert json.loads(json_text) == block["input"]


@pytest.mark.parametrize("seed", [None, 1, 2, 3])
def test_responses_items_and_events(seed):
    items, events = _Items(), []
    for delta in deltas(seed):
        items.add(delta)
        events += items.take()
    items.close()
    events += items.take()
    kinds = [item["type"] for item in items.output]
    assert kinds == ["reasoning", "message", "function_call", "function_call"]
    assert items.output[0]["content"][0]["text"].strip() == REASONING.strip()
    assert items.output[1]["content"][0]["text"] == "\n\nLet me check."
    assert [(i["name"], json.loads(i["arguments"])) for i in items.output[2:]] == [
        ("get_weather", {"city": "Zürich"}), ("add", {"a": 2, "b": 3})]
    assert all(item["status"] == "completed" for item in items.output)
    added = [e["output_index"] for e in events if e["type"] == "response.output_item.added"]
    done = [e["output_index"] for e in events if e["type"] == "response.output_item.done"]
    assert added == done == [0, 1, 2, 3]
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == "\n\nLet me check."


def test_ollama_tool_calls_carry_argument_objects():
    message = ChoiceMessage()
    for delta in deltas(5):
        message.add(delta)
    assert message.reasoning.strip() == REASONING.strip()
    assert _tool_calls(message) == [
        {"function": {"name": "get_weather", "arguments": {"city": "Zürich"}}},
        {"function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]
