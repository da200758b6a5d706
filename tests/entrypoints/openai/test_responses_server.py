"""OpenAI's Responses API on a real `pagoda serve` (SmolLM2), driven by the official openai
client's `responses` methods, and LangChain's ChatOpenAI on the same server."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.utils import RemoteServer

MODEL = "smollm2"
QUESTION = "What is the capital of France?"
WEATHER_TOOL = {"type": "function", "name": "get_weather",
                "description": "Get the weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                               "required": ["city"]}}


@pytest.fixture(scope="module")
def server(smollm2_dir):
    srv = RemoteServer(str(smollm2_dir), "--served-model-name", MODEL, "--max-model-len", "2048",
                       "--kv-cache-memory", "256MiB")
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def test_plain_response_equals_chat(client):
    response = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=12,
                                       temperature=0)
    chat = client.chat.completions.create(model=MODEL, max_tokens=12, temperature=0,
                                          messages=[{"role": "user", "content": QUESTION}])
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status == "completed"
    assert response.output_text == chat.choices[0].message.content
    assert [item.type for item in response.output] == ["message"]
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens
    assert response.usage.total_tokens == chat.usage.total_tokens


def test_instructions_and_input_items(client):
    items = client.responses.create(
        model=MODEL, max_output_tokens=8, temperature=0, instructions="Answer briefly.",
        input=[{"role": "user", "content": [{"type": "input_text", "text": QUESTION}]}])
    chat = client.chat.completions.create(
        model=MODEL, max_tokens=8, temperature=0,
        messages=[{"role": "system", "content": "Answer briefly."},
                  {"role": "user", "content": QUESTION}])
    assert items.output_text == chat.choices[0].message.content
    assert items.instructions == "Answer briefly."
    short = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=2,
                                    temperature=0)
    assert short.status == "incomplete"
    assert short.incomplete_details.reason == "max_output_tokens"


def test_streamed_events(client):
    whole = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=12,
                                    temperature=0)
    events = list(client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=12,
                                          temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text == events[-1].response.output_text
    with client.responses.stream(model=MODEL, input=QUESTION, max_output_tokens=12,
                                 temperature=0) as stream:
        assert stream.get_final_response().output_text == whole.output_text


def test_forced_function_call_and_its_output(client):
    called = client.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER_TOOL],
                                     tool_choice={"type": "function", "name": "get_weather"},
                                     max_output_tokens=24, temperature=0)
    (call,) = called.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert isinstance(json.loads(call.arguments)["city"], str)
    streamed = list(client.responses.create(
        model=MODEL, input="Weather in Paris?", tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=24,
        temperature=0, stream=True))
    done = [e for e in streamed if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and done[0].arguments == call.arguments
    follow_up = client.responses.create(
        model=MODEL, tools=[WEATHER_TOOL], max_output_tokens=8, temperature=0,
        input=[{"role": "user", "content": "Weather in Paris?"},
               {"type": "function_call", "call_id": call.call_id, "name": call.name,
                "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id,
                "output": "sunny, 21 C"}])
    assert follow_up.output_text and follow_up.usage.input_tokens > called.usage.input_tokens


def test_store_is_opt_in_and_bounded_lifecycle(client):
    kept = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=6,
                                   temperature=0, store=True)
    assert client.responses.retrieve(kept.id).output_text == kept.output_text
    followed = client.responses.create(model=MODEL, input="And of Spain?", max_output_tokens=6,
                                       temperature=0, previous_response_id=kept.id)
    assert followed.previous_response_id == kept.id
    assert followed.usage.input_tokens > kept.usage.input_tokens + kept.usage.output_tokens
    client.responses.delete(kept.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(kept.id)
    not_kept = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=2,
                                       temperature=0)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(not_kept.id)
    with pytest.raises(openai.BadRequestError) as missing:
        client.responses.create(model=MODEL, input="hi", previous_response_id=not_kept.id)
    assert missing.value.body["param"] == "previous_response_id"


def test_response_store_evicts_least_recently_used():
    from pagoda.entrypoints.openai.serving_responses import ResponseStore
    store = ResponseStore(max_items=2, max_bytes=10_000)
    for i in range(3):
        store.put({"id": f"resp_{i}"}, [])
    assert store.pop("resp_0") is None and store.get("resp_2")
    store.put({"id": "big", "text": "x" * 20_000}, [])
    assert store.pop("big") is None  # larger than the whole budget: never kept


BAD_REQUESTS = [
    ({"input": []}, "input"),
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "hi", "max_output_tokens": 100000}, "max_output_tokens"),
    ({"input": "hi", "temperature": 3}, "temperature"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools"),
    ({"input": [{"type": "input_image", "image_url": "http://x"}]}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input"),
    ({"input": "hi", "tools": [WEATHER_TOOL], "tool_choice": {"type": "function",
                                                              "name": "nope"}}, "tool_choice"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x",
                                         "schema": {"type": "nonsense"}}}}, "text"),
    ({"input": "hi", "metadata": {str(i): "v" for i in range(50)}}, "metadata"),
    ({"input": "hi " * 5000}, "input"),
]


@pytest.mark.parametrize("body, param", BAD_REQUESTS)
def test_bad_input_gets_openai_error(server, body, param):
    r = httpx.post(f"{server.url}/v1/responses", json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"].startswith(param)
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_langchain_chat_openai(server, client):
    from langchain_openai import ChatOpenAI
    llm = ChatOpenAI(model=MODEL, base_url=f"{server.url}/v1", api_key="none", temperature=0,
                     max_tokens=12, max_retries=0)
    direct = client.chat.completions.create(
        model=MODEL, max_tokens=12, temperature=0,
        messages=[{"role": "user", "content": QUESTION}]).choices[0].message.content
    assert llm.invoke(QUESTION).content == direct
    assert "".join(chunk.content for chunk in llm.stream(QUESTION)) == direct
    chat_tool = {"type": "function", "function": {k: v for k, v in WEATHER_TOOL.items()
                                                  if k != "type"}}
    forced = llm.bind_tools([chat_tool], tool_choice="get_weather").invoke(
        "Weather in Paris?")
    assert forced.tool_calls and forced.tool_calls[0]["name"] == "get_weather"
    via_responses = ChatOpenAI(model=MODEL, base_url=f"{server.url}/v1", api_key="none",
                               temperature=0, max_tokens=12, max_retries=0,
                               use_responses_api=True)
    assert via_responses.invoke(QUESTION).text == direct
