"""The server on the real Gemma 3 270M (a base model whose GGUF has no chat template: it chats
through pagoda's Gemma template and calls tools in its pythonic format), driven by the
official openai client. Forced tool calls are grammar-enforced, so their arguments validate
even on this tiny base model; `auto` parses pythonic calls the output is steered into."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from tests.utils import RemoteServer

pytestmark = pytest.mark.slow

MODEL = "gemma3-270m"
ASK = [{"role": "system", "content": "Answer briefly."},
       {"role": "user", "content": "What is the capital of France?"}]
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 99}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
TOOL_ASK = [{"role": "user", "content": "What is the weather in Paris, and what is 2 + 3?"}]
# a conversation in which the assistant already called a tool and got its result
ROUND_TRIP = [*TOOL_ASK,
              {"role": "assistant", "content": None, "tool_calls": [{
                  "id": "call_weather", "type": "function", "function": {
                      "name": "get_weather",
                      "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
              {"role": "tool", "tool_call_id": "call_weather", "content": "18 degrees, cloudy"}]
PYTHONIC_ADD = r"\[add\(a=[1-9], b=[1-9]\)\]"


@pytest.fixture(scope="module")
def server(gemma3_270m_dir):
    # no prefix caching: a repeated request then computes exactly as the first did
    srv = RemoteServer(str(gemma3_270m_dir), "--served-model-name", MODEL, "--max-model-len",
                       "1024", "--kv-cache-memory", "64MiB", "--no-enable-prefix-caching")
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def chat(client, **kwargs):
    return client.chat.completions.create(
        model=MODEL, **{"messages": ASK, "max_tokens": 16, "temperature": 0.0, **kwargs})


def test_chat_renders_the_gemma_template_and_streams_the_same_text(server, client):
    tokens = httpx.post(f"{server.url}/tokenize", json={
        "model": MODEL, "messages": ASK, "return_token_strs": True}).json()
    assert tokens["token_strs"][:4] == ["<bos>", "<start_of_turn>", "user", "\n"]
    assert tokens["token_strs"][-3:] == ["<start_of_turn>", "model", "\n"]
    whole = chat(client)
    choice = whole.choices[0]
    assert whole.usage.prompt_tokens == tokens["count"]
    assert choice.message.content and choice.finish_reason in ("stop", "length")
    assert choice.message.tool_calls is None
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        choice.message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_required_tool_call_satisfies_its_schema(client):
    out = chat(client, messages=TOOL_ASK, tools=TOOLS, tool_choice="required",
               parallel_tool_calls=False, max_tokens=48).choices[0]
    assert out.finish_reason == "tool_calls" and out.message.content is None
    (call,) = out.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_named_tool_choice_after_a_tool_round_trip(client):
    out = chat(client, messages=ROUND_TRIP, tools=TOOLS, max_tokens=32,
               tool_choice={"type": "function", "function": {"name": "add"}}).choices[0]
    assert out.finish_reason == "stop"  # as OpenAI answers a forced function
    (call,) = out.message.tool_calls
    assert call.function.name == "add"
    jsonschema.validate(json.loads(call.function.arguments), ADD)


def test_auto_parses_pythonic_calls_whole_and_streamed(client):
    """The model's output is steered into the pythonic format its template asks for."""
    kwargs = {"messages": ROUND_TRIP, "tools": TOOLS, "tool_choice": "auto", "max_tokens": 24,
              "extra_body": {"structured_outputs": {"regex": PYTHONIC_ADD}}}
    out = chat(client, **kwargs).choices[0]
    assert out.finish_reason == "tool_calls" and out.message.content is None
    (call,) = out.message.tool_calls
    assert call.function.name == "add"
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, ADD)
    names, streamed_arguments, content = "", "", ""
    for chunk in chat(client, stream=True, **kwargs):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for piece in choice.delta.tool_calls or []:
                names += piece.function.name or ""
                streamed_arguments += piece.function.arguments or ""
    assert (names, json.loads(streamed_arguments), content) == ("add", arguments, "")
