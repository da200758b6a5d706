"""Anthropic's Messages API on a real `pagoda serve` (SmolLM2, an API key), driven by the
official `anthropic` client and LangChain's ChatAnthropic; the same greedy request answered
alike by every protocol the server speaks."""

from __future__ import annotations

import json

import anthropic
import httpx
import ollama
import pytest

from tests.utils import RemoteServer

MODEL = "smollm2"
KEY = "sk-test-key"
QUESTION = "What is the capital of France?"
MESSAGES = [{"role": "user", "content": QUESTION}]
GREEDY = {"temperature": 0}  # this SDK version sends sampling settings only as extra body
WEATHER_TOOL = {"name": "get_weather", "description": "Get the weather in a city",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                                 "required": ["city"]}}


@pytest.fixture(scope="module")
def server(smollm2_dir):
    srv = RemoteServer(str(smollm2_dir), "--served-model-name", MODEL, "--max-model-len", "2048",
                       "--kv-cache-memory", "256MiB", "--api-key", KEY)
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0)


def test_message_usage_and_stop_reason(client):
    message = client.messages.create(model=MODEL, max_tokens=12, messages=MESSAGES,
                                     extra_body=GREEDY)
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_") and message.model == MODEL
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text.startswith("The capital of France")
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.usage.input_tokens == client.messages.count_tokens(
        model=MODEL, messages=MESSAGES).input_tokens
    assert 0 < message.usage.output_tokens <= 12
    cut = client.messages.create(model=MODEL, max_tokens=2, messages=MESSAGES, extra_body=GREEDY)
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 2
    word = message.content[0].text.split()[2]
    stopped = client.messages.create(model=MODEL, max_tokens=12, messages=MESSAGES,
                                     stop_sequences=[word], extra_body=GREEDY)
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == word
    assert stopped.content[0].text == message.content[0].text[:message.content[0].text.index(word)]


def test_system_prompt_and_count_tokens(client, server):
    with_system = client.messages.count_tokens(model=MODEL, messages=MESSAGES,
                                               system="Answer in one word.").input_tokens
    rendered = httpx.post(f"{server.url}/tokenize", headers={"x-api-key": KEY}, json={
        "messages": [{"role": "system", "content": "Answer in one word."}, *MESSAGES]})
    assert with_system == rendered.json()["count"]
    blocks = client.messages.count_tokens(
        model=MODEL, messages=MESSAGES,
        system=[{"type": "text", "text": "Answer in one word."}]).input_tokens
    assert blocks == with_system


def test_streaming_event_sequence(client, server):
    whole = client.messages.create(model=MODEL, max_tokens=12, messages=MESSAGES,
                                   extra_body=GREEDY)
    with client.messages.stream(model=MODEL, max_tokens=12, messages=MESSAGES,
                                extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text == final.content[0].text
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens
    body = {"model": MODEL, "max_tokens": 6, "messages": MESSAGES, "stream": True, **GREEDY}
    with httpx.stream("POST", f"{server.url}/v1/messages", json=body, timeout=60,
                      headers={"x-api-key": KEY}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[7:] for line in r.iter_lines() if line.startswith("event: ")]
    kinds = [e for e in events if e != "ping"]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert set(kinds[2:-3]) == {"content_block_delta"}
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]


def test_forced_tool_call_and_tool_result_round_trip(client):
    called = client.messages.create(
        model=MODEL, max_tokens=24, messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER_TOOL], tool_choice={"type": "tool", "name": "get_weather"},
        extra_body=GREEDY)
    assert called.stop_reason == "tool_use"
    (use,) = [b for b in called.content if b.type == "tool_use"]
    assert use.name == "get_weather" and isinstance(use.input.get("city"), str)
    streamed = client.messages.create(  # `any`: a JSON array of calls, so more tokens
        model=MODEL, max_tokens=48, messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER_TOOL], tool_choice={"type": "any"}, stream=True, extra_body=GREEDY)
    events = list(streamed)
    starts = [e.content_block for e in events if e.type == "content_block_start"]
    assert [b.type for b in starts] == ["tool_use"] and starts[0].name == "get_weather"
    pieces = "".join(e.delta.partial_json for e in events if e.type == "content_block_delta")
    assert isinstance(json.loads(pieces), dict)
    answer = client.messages.create(
        model=MODEL, max_tokens=12, tools=[WEATHER_TOOL], extra_body=GREEDY,
        messages=[{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": [{"type": "tool_use", "id": use.id,
                                                     "name": use.name, "input": use.input}]},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                "content": "sunny, 21 C"}]}])
    assert answer.content and answer.usage.input_tokens > called.usage.input_tokens


def test_x_api_key_and_bearer_are_both_accepted(server):
    body = {"model": MODEL, "messages": MESSAGES}
    url = f"{server.url}/v1/messages/count_tokens"
    assert httpx.post(url, json=body, headers={"x-api-key": KEY}).status_code == 200
    assert httpx.post(url, json=body, headers={"authorization": f"Bearer {KEY}"}).status_code \
        == 200
    refused = httpx.post(url, json=body, headers={"x-api-key": "wrong"})
    assert refused.status_code == 401
    assert refused.json()["error"]["type"] == "authentication_error"
    assert refused.json()["type"] == "error"


def test_same_greedy_request_agrees_across_protocols(server, client):
    """OpenAI chat, OpenAI responses, Ollama chat and Anthropic messages: one answer."""
    openai_client = server.client(api_key=KEY)
    chat = openai_client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12,
                                                 temperature=0).choices[0].message.content
    response = openai_client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=12,
                                              temperature=0).output_text
    via_ollama = ollama.Client(host=server.url, headers={"Authorization": f"Bearer {KEY}"}).chat(
        model=MODEL, messages=MESSAGES, options={"temperature": 0, "num_predict": 12})
    message = client.messages.create(model=MODEL, max_tokens=12, messages=MESSAGES,
                                     extra_body=GREEDY)
    assert chat == response == via_ollama.message.content == message.content[0].text


BAD_REQUESTS = [
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_tokens": 100000}, 400, "max_tokens"),
    ({"max_tokens": 8, "messages": []}, 400, "messages"),
    ({"max_tokens": 8, "temperature": 1.5}, 400, "temperature"),
    ({"max_tokens": 8, "top_k": 0}, 400, "top_k"),
    ({"max_tokens": 8, "stop_sequences": ["x"] * 500}, 400, "stop_sequences"),
    ({"max_tokens": 8, "messages": [{"role": "system", "content": "x"}]}, 400, "role"),
    ({"max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "data": "AA"}}]}]}, 400, "image"),
    ({"max_tokens": 8, "tools": [WEATHER_TOOL], "tool_choice": {"type": "tool",
                                                                "name": "nope"}}, 400,
     "tool_choice"),
    ({"max_tokens": 8, "tool_choice": {"type": "any"}}, 400, "tool_choice"),
    ({"max_tokens": 8, "thinking": {"type": "enabled", "budget_tokens": 9}}, 400, "budget"),
    ({"max_tokens": 8, "model": "claude-opus-9"}, 404, "claude-opus-9"),
    ({}, 400, "max_tokens"),
]


@pytest.mark.parametrize("body, status, mention", BAD_REQUESTS)
def test_bad_input_gets_anthropic_error(server, body, status, mention):
    r = httpx.post(f"{server.url}/v1/messages", headers={"x-api-key": KEY}, timeout=60,
                   json={"model": MODEL, "messages": MESSAGES, **body})
    assert r.status_code == status, r.text
    error = r.json()
    assert error["type"] == "error" and set(error["error"]) == {"type", "message"}
    assert error["error"]["type"] == ("not_found_error" if status == 404 else
                                      "invalid_request_error")
    assert mention in error["error"]["message"]
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_client_raises_typed_errors(client):
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model=MODEL, max_tokens=0, messages=MESSAGES)
    assert bad.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="nope", max_tokens=4, messages=MESSAGES)


def test_langchain_chat_anthropic(server, client):
    from langchain_anthropic import ChatAnthropic
    llm = ChatAnthropic(model=MODEL, base_url=server.url, api_key=KEY, max_tokens=12,
                        temperature=0, max_retries=0)
    direct = client.messages.create(model=MODEL, max_tokens=12, messages=MESSAGES,
                                    extra_body=GREEDY).content[0].text
    assert llm.invoke(QUESTION).content == direct
    assert "".join(chunk.text for chunk in llm.stream(QUESTION)) == direct
    forced = llm.bind_tools([WEATHER_TOOL], tool_choice="get_weather").invoke("Weather in Paris?")
    assert forced.tool_calls and forced.tool_calls[0]["name"] == "get_weather"
