"""The OpenAI-compatible server on SmolLM2, driven by the official openai client."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import openai
import pytest

from pagoda import SamplingParams
from tests.utils import RemoteServer

MODEL = "smollm2"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(smollm2_dir):
    # float32 weights, as the offline smollm2_llm its answers are compared with
    srv = RemoteServer(str(smollm2_dir), "--served-model-name", MODEL, "--max-model-len", "2048",
                       "--kv-cache-memory", "256MiB", "--max-num-seqs", "64",
                       "--quantization", "none")
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def test_models_health_version(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/version").json()["version"]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_greedy_equals_offline(client, smollm2_llm):
    response = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24,
                                              temperature=0)
    offline = smollm2_llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=24))[0]
    choice = response.choices[0]
    assert choice.message.content == offline.outputs[0].text
    assert choice.finish_reason == offline.outputs[0].finish_reason
    assert response.usage.prompt_tokens == len(offline.prompt_token_ids)
    assert response.usage.completion_tokens == len(offline.outputs[0].token_ids)
    assert response.usage.total_tokens == response.usage.prompt_tokens + \
        response.usage.completion_tokens
    assert response.id.startswith("chatcmpl-") and response.object == "chat.completion"


def test_completion_greedy_equals_offline(client, smollm2_llm):
    prompt = "The three primary colours are"
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16,
                                         temperature=0)
    offline = smollm2_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16))[0]
    assert response.choices[0].text == offline.outputs[0].text
    assert response.usage.prompt_tokens == len(offline.prompt_token_ids)
    assert response.usage.completion_tokens == len(offline.outputs[0].token_ids)


def test_prompt_forms_and_echo(client, smollm2_tokenizer):
    ids = smollm2_tokenizer("Once upon a time").input_ids
    by_text = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6,
                                        temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert by_text.choices[0].text == by_ids.choices[0].text
    batch = client.completions.create(model=MODEL, prompt=["Once upon a time", "Hello"],
                                      max_tokens=6, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == by_text.choices[0].text
    echoed = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6,
                                       temperature=0, echo=True)
    assert echoed.choices[0].text == "Once upon a time" + by_text.choices[0].text


def test_seeded_sampling_repeats_and_n(client):
    kwargs = dict(model=MODEL, messages=CHAT, max_tokens=16, temperature=1.0, seed=42)
    first = client.chat.completions.create(**kwargs)
    second = client.chat.completions.create(**kwargs)
    assert first.choices[0].message.content == second.choices[0].message.content
    many = client.chat.completions.create(**{**kwargs, "n": 3})
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert len({c.message.content for c in many.choices}) > 1


def test_logprobs_shapes(client):
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == max(t.logprob for t in entry.top_logprobs)  # greedy
        assert bytes(entry.bytes).decode() == entry.token
    text = client.completions.create(model=MODEL, prompt="Hello, my name is", max_tokens=5,
                                     temperature=0, logprobs=2)
    lp = text.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == text.choices[0].text
    assert all(len(top) == 2 for top in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset)


def test_streamed_text_equals_non_streamed(client):
    kwargs = dict(model=MODEL, messages=CHAT, max_tokens=20, temperature=0)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices
                and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        full.usage.completion_tokens
    prompt_kwargs = dict(model=MODEL, prompt="Roses are red,", max_tokens=12, temperature=0)
    whole = client.completions.create(**prompt_kwargs).choices[0].text
    streamed = "".join(c.choices[0].text for c in
                       client.completions.create(**prompt_kwargs, stream=True))
    assert streamed == whole


def test_raw_sse_is_well_formed(server):
    body = {"model": MODEL, "prompt": "Count: 1, 2,", "max_tokens": 8, "temperature": 0,
            "stream": True, "n": 2}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-request-id"]
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    finished = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(finished) == [0, 1]


def test_request_id_header_is_echoed(server):
    r = httpx.get(f"{server.url}/v1/models", headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"


def test_a_template_that_drops_tools_is_warned_about_at_startup_and_in_responses(server,
                                                                                   client):
    """SmolLM2's own template renders no tools: the log says so once the model is loaded,
    and a response to a request with tools carries a header that says so."""
    from pagoda.entrypoints.openai.output_parsers import (
        TOOLS_WARNING,
        TOOLS_WARNING_HEADER,
    )
    assert "the chat template does not render tools" in Path(server.log.name).read_text()
    tools = [{"type": "function", "function": {"name": "now", "parameters": {}}}]
    asked = {"model": MODEL, "messages": CHAT, "max_tokens": 1}
    for stream in (False, True):
        raw = client.chat.completions.with_raw_response.create(**asked, tools=tools,
                                                               stream=stream)
        assert raw.headers.get(TOOLS_WARNING_HEADER) == TOOLS_WARNING
    plain = client.chat.completions.with_raw_response.create(**asked)
    assert TOOLS_WARNING_HEADER not in plain.headers and plain.parse().choices


def test_tokenize_detokenize(server, smollm2_tokenizer):
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": "héllo wörld"}).json()
    assert r["tokens"] == smollm2_tokenizer("héllo wörld").input_ids
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == 2048
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": r["tokens"]}).json()
    assert back["prompt"] == "héllo wörld"
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": CHAT}).json()
    assert chat["count"] > r["count"]


BAD_REQUESTS = [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 100000}, 400, "max_tokens",
     "context_length_exceeded"),
    ("/v1/completions", {"prompt": [7] * 2048, "max_tokens": 1}, 400, "prompt",
     "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": [], "max_tokens": 5}, 400, "messages", None),
    ("/v1/completions", {"prompt": "hi", "n": 1000}, 400, "n", None),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs", None),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 99}, 400,
     "top_logprobs", None),
    ("/v1/completions", {"prompt": "hi", "stop": ["x"] * 500}, 400, "stop", None),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {str(i): 1 for i in range(5000)}}, 400,
     "logit_bias", None),
    ("/v1/completions", {"prompt": [1, 99999999]}, 400, "prompt", None),
    ("/v1/completions", {"prompt": [-1]}, 400, "prompt", None),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", None),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature", None),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p", None),
    ("/v1/completions", {"prompt": "hi", "suffix": "end"}, 400, "suffix", None),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-9"}, 404, "model", "model_not_found"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, None, None),
    ("/v1/chat/completions", {"messages": CHAT, "chat_template": "{{ 'x' }}"}, 400,
     "chat_template", None),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function", "function": {
        "name": f"f{i}", "parameters": {}}} for i in range(500)]}, 400, "tools", None),
]


@pytest.mark.parametrize("path, body, status, param, code", BAD_REQUESTS)
def test_bad_input_gets_4xx_envelope(server, path, body, status, param, code):
    r = httpx.post(f"{server.url}{path}", json={"model": MODEL, **body}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert "/" not in error["message"].replace(" / ", "") or status == 404
    assert "Traceback" not in error["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2, 3]", b"", b'"just a string"'])
def test_malformed_bodies_get_400(server, raw):
    r = httpx.post(f"{server.url}/v1/completions", content=raw,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded",
                                          "text/plain"])
def test_a_json_body_without_a_json_content_type_is_read_as_json(server, content_type):
    body = json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 2}).encode()
    headers = {"content-type": content_type} if content_type else {}
    with httpx.Client() as http:  # (curl -d sends the form type)
        request = http.build_request("POST", f"{server.url}/v1/completions", content=body,
                                     headers=headers)
        assert request.headers.get("content-type") == content_type
        r = http.send(request)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


def test_bad_input_does_not_disturb_a_concurrent_request(server):
    async def run():
        aclient = server.async_client()
        good = asyncio.create_task(aclient.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=24, temperature=0))
        async with httpx.AsyncClient(timeout=30) as http:
            bad = await asyncio.gather(*[
                http.post(f"{server.url}{path}", json={"model": MODEL, **body})
                for path, body, *_ in BAD_REQUESTS])
        assert all(400 <= r.status_code < 500 for r in bad)
        return await good
    result = asyncio.run(run())
    assert "Paris" in result.choices[0].message.content
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=10**6)
    assert info.value.code == "context_length_exceeded"
    assert "maximum context length is 2048 tokens" in info.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=CHAT)


def metric_value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_64_concurrent_streams_and_metrics_agree(server):
    before = httpx.get(f"{server.url}/metrics").text

    async def one(aclient, i):
        stream = await aclient.completions.create(
            model=MODEL, prompt=f"Request {i}: the weather today is", max_tokens=8 + i % 5,
            temperature=0.8, seed=i, stream=True, stream_options={"include_usage": True})
        terminal, usage, text = 0, None, ""
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                terminal += chunk.choices[0].finish_reason is not None
            else:
                usage = chunk.usage
        return terminal, usage

    async def run():
        aclient = server.async_client()
        return await asyncio.gather(*[one(aclient, i) for i in range(64)])

    results = asyncio.run(run())
    assert all(terminal == 1 for terminal, _ in results)
    completion_tokens = sum(u.completion_tokens for _, u in results)
    prompt_tokens = sum(u.prompt_tokens for _, u in results)
    after = httpx.get(f"{server.url}/metrics").text

    def delta(name, **labels):
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    assert delta("vllm:generation_tokens_total") == completion_tokens
    assert delta("vllm:prompt_tokens_total") == prompt_tokens
    assert delta("vllm:request_success_total") == 64
    assert delta("vllm:time_to_first_token_seconds_count") == 64
    assert delta("vllm:e2e_request_latency_seconds_count") == 64
    assert metric_value(after, "vllm:num_requests_running") == 0
    assert 'model_name="smollm2"' in after


def test_disconnect_mid_stream_frees_blocks(server):
    body = {"model": MODEL, "prompt": "Tell me a very long story.", "max_tokens": 1500,
            "temperature": 0.7, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 6:
                break  # leaving the block closes the connection mid-stream
    import time
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{server.url}/metrics").text
        if metric_value(metrics, "vllm:num_requests_running") == 0 and \
                metric_value(metrics, "vllm:kv_cache_usage_perc") == 0:
            break
        time.sleep(0.1)
    assert metric_value(metrics, "vllm:num_requests_running") == 0
    assert metric_value(metrics, "vllm:kv_cache_usage_perc") == 0
    assert metric_value(metrics, "vllm:request_success_total", finished_reason="abort") >= 1


def test_non_streaming_disconnect_aborts_and_frees_blocks(server):
    import time
    before = metric_value(httpx.get(f"{server.url}/metrics").text, "vllm:request_success_total",
                          finished_reason="abort")
    body = {"model": MODEL, "prompt": "Write a very long essay.", "max_tokens": 1500,
            "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):  # the client gives up and closes the socket
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=1.5)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{server.url}/metrics").text
        aborted = metric_value(metrics, "vllm:request_success_total", finished_reason="abort")
        if aborted > before and metric_value(metrics, "vllm:kv_cache_usage_perc") == 0:
            break
        time.sleep(0.1)
    assert aborted == before + 1
    assert metric_value(metrics, "vllm:num_requests_running") == 0
    assert metric_value(metrics, "vllm:kv_cache_usage_perc") == 0
