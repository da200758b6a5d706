"""pagoda's Gemma 3 chat template (the default for Gemma checkpoints without one): Gemma's
turns, tools described in the first user turn, pythonic calls that the pythonic parser reads
back, tool results in a user turn; the same text in pagoda's sandbox as in transformers."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from pagoda.entrypoints.openai.output_parsers import OutputParsers
from pagoda.entrypoints.openai.protocol import ChatCompletionRequest
from pagoda.entrypoints.openai.reasoning_parsers import detect_reasoning_parser
from pagoda.entrypoints.openai.tool_parsers import (
    PythonicToolParser,
    detect_tool_parser,
)
from pagoda.errors import InvalidRequestError
from pagoda.models.arch.gemma3 import GEMMA3
from pagoda.tokenizer.chat_template import render_chat
from pagoda.tokenizer.default_templates import read_default_template

TEMPLATE = read_default_template("gemma3.jinja")
GEMMA = SimpleNamespace(chat_template=TEMPLATE,
                        special_tokens_map={"bos_token": "<bos>", "eos_token": "<eos>"})
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city (°C)",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
ARGUMENTS = {"city": "Zürich", "days": 3, "hourly": True, "units": None, "ratio": 0.5,
             "tags": ["a \"b\"", "c\\d\n"], "window": {"from": 1, "to": [False]}}


def gemma_chat(messages, **kwargs) -> str:
    return render_chat(GEMMA, messages, **kwargs)


def test_the_architecture_declares_it_and_it_ships_with_pagoda():
    assert GEMMA3.default_chat_template == "gemma3.jinja"
    assert TEMPLATE.startswith("{#- pagoda's chat template for Gemma 3")


@pytest.mark.parametrize("messages, expected", [
    ([{"role": "user", "content": "  Hi!\n"}],
     "<bos><start_of_turn>user\nHi!<end_of_turn>\n<start_of_turn>model\n"),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Peru?"},
      {"role": "assistant", "content": "Lima."}, {"role": "user", "content": "And Chile?"}],
     ("<bos><start_of_turn>user\nBe brief.\n\nCapital of Peru?<end_of_turn>\n"
      "<start_of_turn>model\nLima.<end_of_turn>\n<start_of_turn>user\nAnd Chile?<end_of_turn>\n"
      "<start_of_turn>model\n")),
    ([{"role": "developer", "content": [{"type": "text", "text": "Rules."}]},
      {"role": "user", "content": [{"type": "text", "text": "a "}, {"type": "text", "text": "b"}]}],
     "<bos><start_of_turn>user\nRules.\n\nab<end_of_turn>\n<start_of_turn>model\n"),
])
def test_gemma_turns(messages, expected):
    assert gemma_chat(messages) == expected
    assert gemma_chat(messages, add_generation_prompt=False) == \
        expected.removesuffix("<start_of_turn>model\n")


@pytest.mark.parametrize("messages", [
    [{"role": "assistant", "content": "first"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}],
])
def test_turns_must_alternate_from_a_user_turn(messages):
    with pytest.raises(InvalidRequestError) as info:
        gemma_chat(messages)
    assert info.value.param == "messages"


def tool_conversation() -> list[dict]:
    """A request's messages as the server hands them to the template (arguments parsed)."""
    body = ChatCompletionRequest(messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Zürich, and the time?"},
        {"role": "assistant", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": json.dumps(ARGUMENTS)}},
            {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 °C, sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": " 12:00 "},
    ])
    return body.conversation()


def test_tools_calls_and_results():
    text = gemma_chat(tool_conversation(), tools=TOOLS)
    first_turn, call_turn, results_turn, prompt = text.split("<end_of_turn>\n")
    assert first_turn.startswith("<bos><start_of_turn>user\nBe brief.\n\nYou can call functions.")
    assert "[func_name1(param_name1=value1, param_name2=value2), func_name2(param=value)]" \
        in first_turn
    listed = first_turn[first_turn.index("The functions, in JSON:\n") + 24:]
    assert json.loads(listed.removesuffix("Weather in Zürich, and the time?")) == TOOLS
    assert results_turn == ("<start_of_turn>user\n<tool_response>\n21 °C, sunny\n</tool_response>"
                            "\n<tool_response>\n12:00\n</tool_response>")
    assert prompt == "<start_of_turn>model\n"
    # the model turn is what the pythonic parser reads back as the same calls
    call_list = call_turn.removeprefix("<start_of_turn>model\n")
    parsed = PythonicToolParser().parse(call_list)
    assert parsed.content is None
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == \
        [("get_weather", ARGUMENTS), ("now", {})]
    assert "You can call functions" not in gemma_chat(tool_conversation())  # tools: none


def test_assistant_text_before_its_calls_and_arguments_that_are_not_an_object():
    text = gemma_chat([{"role": "user", "content": "x"},
                       {"role": "assistant", "content": "Let me check.",
                        "tool_calls": [{"function": {"name": "f", "arguments": "raw"}}]},
                       {"role": "tool", "content": "ok"}])
    assert "<start_of_turn>model\nLet me check.\n[f(raw)]<end_of_turn>\n" in text


@pytest.mark.parametrize("tools", [TOOLS, None])
def test_same_text_as_transformers(smollm2_tokenizer, tools):
    messages = tool_conversation()
    theirs = smollm2_tokenizer.apply_chat_template(messages, tools=tools, chat_template=TEMPLATE,
                                                   tokenize=False, add_generation_prompt=True)
    ours = render_chat(smollm2_tokenizer, messages, TEMPLATE, tools=tools)
    assert ours == theirs and ours.startswith(smollm2_tokenizer.bos_token)


def test_continue_final_message():
    messages = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi, I"}]
    ours = render_chat(GEMMA, messages, continue_final_message=True)
    assert ours == "<bos><start_of_turn>user\nSay hi<end_of_turn>\n<start_of_turn>model\nHi, I"


def test_the_template_implies_the_pythonic_parser_and_no_reasoning():
    assert detect_tool_parser(TEMPLATE) == "pythonic"
    vllm_style = ("Respond in the format [func_name1(params_name1=params_value1, "
                  "params_name2=params_value2...), func_name2(params)]")
    assert detect_tool_parser(vllm_style) == "pythonic"
    assert detect_reasoning_parser(TEMPLATE) is None
    parsers = OutputParsers.resolve(None, None, TEMPLATE)
    assert isinstance(parsers.tools, PythonicToolParser) and parsers.reasoning is None
