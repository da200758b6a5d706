"""Structured output, tool calling and reasoning through a real server on SmolLM2, with the
official openai client. Tool calls are forced by grammar (required / named) so even this
tiny model returns arguments that satisfy each function's schema."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from tests.utils import RemoteServer

MODEL = "smollm2"
# SmolLM2's ChatML template, marked as one whose model thinks in <think> tags
TEMPLATE = ("{# the assistant reasons inside <think></think> first #}"
            "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
            "'<|im_end|>\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 24},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 99}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "What is the weather in Paris, and what is 2 + 3?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_dir):
    template = tmp_path_factory.mktemp("template") / "think.jinja"
    template.write_text(TEMPLATE)
    # no prefix caching: a repeated request then computes exactly as the first did, so a
    # streamed response can be compared with the same request answered whole
    srv = RemoteServer(str(smollm2_dir), "--served-model-name", MODEL, "--max-model-len",
                       "1024", "--kv-cache-memory", "64MiB", "--chat-template", str(template),
                       "--no-enable-prefix-caching", "--trust-request-chat-template")
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def chat(client, **kwargs):
    return client.chat.completions.create(model=MODEL, **{"messages": ASK, "max_tokens": 96,
                                                           "temperature": 0.0,
                                                           **kwargs})


def test_json_schema_response_format(client):
    schema = {"type": "object", "properties": {
        "answer": {"type": "string", "maxLength": 30},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "sources": {"type": "array", "items": {"type": "string", "maxLength": 10},
                    "maxItems": 2}},
        "required": ["answer", "confidence", "sources"], "additionalProperties": False}
    out = chat(client, response_format={"type": "json_schema", "json_schema": {
        "name": "answer", "schema": schema, "strict": True}}).choices[0]
    assert out.finish_reason == "stop"
    jsonschema.validate(json.loads(out.message.content), schema)
    obj = chat(client, response_format={"type": "json_object"}, max_tokens=48).choices[0]
    assert obj.message.content.startswith("{")
    if obj.finish_reason == "stop":
        assert isinstance(json.loads(obj.message.content), dict)


def test_choice_and_regex(client):
    picked = client.completions.create(model=MODEL, prompt="Capital of France:", max_tokens=8,
                                       extra_body={"structured_outputs": {
                                           "choice": ["Paris", "Lyon", "Nice"]}})
    assert picked.choices[0].text in ("Paris", "Lyon", "Nice")
    dated = chat(client, max_tokens=16, extra_body={"guided_regex": r"20\d\d-[01]\d-[0-3]\d"})
    assert re.fullmatch(r"20\d\d-[01]\d-[0-3]\d", dated.choices[0].message.content)


def test_required_tool_calls_satisfy_their_schemas(client):
    out = chat(client, tools=TOOLS, tool_choice="required").choices[0]
    # this small model keeps appending calls: the array may end at max_tokens, and then only
    # its complete calls are returned
    assert out.finish_reason in ("tool_calls", "length") and out.message.content is None
    assert out.message.tool_calls
    for call in out.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("name", ["get_weather", "add"])
def test_named_tool_choice(client, name):
    out = chat(client, tools=TOOLS, tool_choice={"type": "function",
                                                 "function": {"name": name}}).choices[0]
    assert out.finish_reason == "stop"  # as OpenAI answers a forced function
    (call,) = out.message.tool_calls
    assert call.function.name == name
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[name])


def test_tool_round_trip(client):
    forced = {"type": "function", "function": {"name": "add"}}
    call = chat(client, tools=TOOLS, tool_choice=forced).choices[0].message
    args = json.loads(call.tool_calls[0].function.arguments)
    messages = ASK + [call.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.tool_calls[0].id,
                       "content": str(args["a"] + args["b"])}]
    answer = chat(client, messages=messages, tools=TOOLS, max_tokens=24).choices[0]
    assert answer.message.role == "assistant" and answer.finish_reason in ("stop", "length")
    # (this template opens <think> in the prompt: an answer may be all reasoning, and then
    # its content is null, as OpenAI clients expect)
    assert answer.message.content or answer.message.tool_calls \
        or getattr(answer.message, "reasoning_content", None)


def test_parallel_tool_calls_false_makes_one_call(client):
    out = chat(client, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    assert out.choices[0].finish_reason == "tool_calls"
    assert len(out.choices[0].message.tool_calls) == 1


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function",
                                                      "function": {"name": "get_weather"}}])
def test_streamed_tool_calls_reassemble_to_the_whole_response(client, tool_choice):
    whole = chat(client, tools=TOOLS, tool_choice=tool_choice, max_tokens=160).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in chat(client, tools=TOOLS, tool_choice=tool_choice, stream=True,
                      max_tokens=160):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for piece in choice.delta.tool_calls or []:
                entry = calls.setdefault(piece.index, {"id": piece.id, "name": "", "args": ""})
                if piece.id:  # only a call's first piece carries its id, type and name
                    assert piece.type == "function" and piece.index == len(calls) - 1
                entry["name"] += piece.function.name or ""
                entry["args"] += piece.function.arguments or ""
    assert finish == whole.finish_reason
    assert [(c["name"], json.loads(c["args"])) for c in calls.values()] == [
        (c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls]
    assert all(c["id"].startswith("call_") for c in calls.values())


def test_auto_tool_choice_parses_the_models_format(client):
    """The model's output is steered into Hermes' format; tool_choice auto extracts it."""
    hermes = (r'<tool_call>\n\{"name": "add", "arguments": '
              r'\{"a": [1-9], "b": [1-9]\}\}\n</tool_call>')
    out = chat(client, tools=TOOLS, tool_choice="auto",
               extra_body={"structured_outputs": {"regex": hermes}}).choices[0]
    assert out.finish_reason == "tool_calls"
    (call,) = out.message.tool_calls
    assert call.function.name == "add"
    jsonschema.validate(json.loads(call.function.arguments), ADD)


def test_a_forced_call_cut_off_by_max_tokens_is_not_lost(client):
    required = chat(client, tools=TOOLS, max_tokens=5, tool_choice="required").choices[0]
    assert required.finish_reason == "length" and not required.message.tool_calls
    assert required.message.content.lstrip().startswith("[")  # the partial call, as text
    named = chat(client, tools=TOOLS, max_tokens=5, tool_choice={
        "type": "function", "function": {"name": "get_weather"}}).choices[0]
    (call,) = named.message.tool_calls  # a named function: its partial arguments
    assert named.finish_reason == "length" and call.function.name == "get_weather"
    assert call.function.arguments.startswith("{")


def test_a_streamed_forced_call_cut_off_by_max_tokens_is_not_lost(client):
    content, calls, finish = "", [], None
    for chunk in chat(client, tools=TOOLS, max_tokens=5, tool_choice="required", stream=True):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            calls += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    whole = chat(client, tools=TOOLS, max_tokens=5, tool_choice="required").choices[0]
    assert finish == "length" and not calls
    assert content == whole.message.content and content.lstrip().startswith("[")


def test_reasoning_without_an_answer_has_null_content(client):
    thought = r"<think>[a-z ]{4,30}</think>"
    out = chat(client, extra_body={"structured_outputs": {"regex": thought}}).choices[0]
    assert out.message.reasoning_content and out.message.content is None


def test_reasoning_is_split_from_the_answer(client):
    thought = r"<think>[a-z ]{4,30}</think>[A-Z][a-z ]{2,20}"
    whole = chat(client, extra_body={"structured_outputs": {"regex": thought}}).choices[0]
    raw = "<think>" + whole.message.reasoning_content + "</think>" + whole.message.content
    assert re.fullmatch(thought, raw)
    reasoning, content = "", ""
    for chunk in chat(client, stream=True, extra_body={"structured_outputs": {"regex": thought}}):
        for choice in chunk.choices:
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            content += choice.delta.content or ""
    assert (reasoning, content) == (whole.message.reasoning_content, whole.message.content)


@pytest.mark.parametrize("kwargs, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "objec"}}}}, "response_format"),
    ({"extra_body": {"guided_regex": "(unclosed"}}, "guided_regex"),
    ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["b"]}}},
     "structured_outputs"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a"}},
     "response_format"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice"),
])
def test_bad_constraints_are_400s(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, **kwargs)
    assert info.value.body["param"] == param


def test_the_tools_warning_follows_the_template_that_renders_the_request(client):
    """This server's template drops tools: responses to requests with tools say so; a
    request that brings a template which renders them gets no such header."""
    from pagoda.entrypoints.openai.output_parsers import TOOLS_WARNING_HEADER
    tool_aware = TEMPLATE.replace("{% for m in messages %}",
                                  "{% for t in tools or [] %}{{ t | tojson }}{% endfor %}"
                                  "{% for m in messages %}")
    asked = {"model": MODEL, "messages": ASK, "max_tokens": 1, "tools": TOOLS}
    dropped = client.chat.completions.with_raw_response.create(**asked)
    assert TOOLS_WARNING_HEADER in dropped.headers
    rendered = client.chat.completions.with_raw_response.create(
        **asked, extra_body={"chat_template": tool_aware})
    assert TOOLS_WARNING_HEADER not in rendered.headers
    assert rendered.parse().usage.prompt_tokens > dropped.parse().usage.prompt_tokens
