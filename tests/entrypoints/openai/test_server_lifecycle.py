"""Server lifecycle on a tiny random-weight model: auth, body limit, queue bound,
engine death, SIGTERM drain, and no orphaned children."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

import httpx
import openai
import pytest

from tests.utils import RemoteServer, tiny_chat_model

CHAT = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm2_dir):
    return str(tiny_chat_model(tmp_path_factory.mktemp("tiny"), smollm2_dir))


def start(model: str, *args: str, **kwargs) -> RemoteServer:
    return RemoteServer(model, "--served-model-name", "tiny", "--kv-cache-memory", "16MiB",
                        *args, **kwargs)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = open(f"/proc/{pid}/status").read()
    return "State:\tZ" not in status


def test_api_keys_guard_every_route_but_health(tiny_model):
    srv = start(tiny_model, "--api-key", "key-one", "--api-key", "key-two")
    try:
        assert httpx.get(f"{srv.url}/health").status_code == 200
        for path in ("/v1/models", "/metrics", "/version"):
            r = httpx.get(f"{srv.url}{path}")
            assert r.status_code == 401, path
            assert r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.get(f"{srv.url}/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        for key in ("key-one", "key-two"):
            client = srv.client(api_key=key)
            assert client.models.list().data[0].id == "tiny"
        with pytest.raises(openai.AuthenticationError):
            srv.client(api_key="nope").chat.completions.create(model="tiny", messages=CHAT)
    finally:
        assert srv.stop() == 0


def test_body_limit_and_queue_bound(tiny_model):
    srv = start(tiny_model, "--max-request-body", "4KiB", "--max-pending-requests", "2")
    try:
        big = {"model": "tiny", "prompt": "x" * 10000}
        assert httpx.post(f"{srv.url}/v1/completions", json=big).status_code == 413

        def chunks():
            yield b'{"model": "tiny", "prompt": "'
            for _ in range(20):
                yield b"y" * 1000
            yield b'"}'
        r = httpx.post(f"{srv.url}/v1/completions", content=chunks(),
                       headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        async def flood():
            async with httpx.AsyncClient(timeout=60) as http:
                body = {"model": "tiny", "prompt": "hi", "max_tokens": 200, "ignore_eos": True}
                return await asyncio.gather(*[http.post(f"{srv.url}/v1/completions", json=body)
                                              for _ in range(8)])
        responses = asyncio.run(flood())
        codes = sorted(r.status_code for r in responses)
        assert codes.count(200) >= 2 and 503 in codes
        rejected = next(r for r in responses if r.status_code == 503)
        assert int(rejected.headers["retry-after"]) >= 1
        assert rejected.json()["error"]["code"] == "server_is_overloaded"
        assert httpx.post(
            f"{srv.url}/v1/completions",
            json={"model": "tiny", "prompt": "hi", "max_tokens": 2}).status_code == 200
    finally:
        assert srv.stop() == 0


def test_engine_death_fails_requests_and_exits_nonzero(tiny_model):
    srv = start(tiny_model)
    engine_pid = srv.engine_pids()[0]
    events: list[str] = []

    def stream():
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 100000 // 100, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=30) as r:
            events.extend(line for line in r.iter_lines() if line.startswith("data: "))

    reader = threading.Thread(target=stream)
    reader.start()
    time.sleep(0.5)
    os.kill(engine_pid, signal.SIGKILL)
    reader.join(30)
    assert events, "the stream produced nothing"
    last = json.loads(events[-1][6:]) if events[-1] != "data: [DONE]" else None
    assert last is not None and "error" in last, events[-3:]
    assert last["error"]["type"] == "service_unavailable_error"
    deadline = time.monotonic() + 15
    health = None
    while time.monotonic() < deadline and srv.proc.poll() is None:
        try:
            health = httpx.get(f"{srv.url}/health", timeout=1).status_code
        except httpx.HTTPError:
            break
        time.sleep(0.05)
    assert health in (None, 503)
    assert srv.proc.wait(30) != 0


def test_sigterm_drains_then_aborts(tiny_model):
    """SIGTERM once both streams have begun: the short one ends ("length"), the long one is
    aborted when the 0.3 s drain ends (its 900 tokens would need 3,000 a second; the tiny
    model streamed over 600 a second here, enough to finish in a 1 s drain after 0.5 s).
    The signal waits for both first chunks: a request still on its way when the server
    stops taking new ones is refused, not drained."""
    srv = start(tiny_model, "--shutdown-timeout", "0.3")
    engine_pid = srv.engine_pids()[0]
    finishes: list[str | None] = []
    begun = {5: threading.Event(), 900: threading.Event()}

    def stream(max_tokens):
        body = {"model": "tiny", "prompt": "hi", "max_tokens": max_tokens, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    begun[max_tokens].set()
                    reason = json.loads(line[6:])["choices"][0]["finish_reason"]
                    if reason:
                        finishes.append(reason)

    readers = [threading.Thread(target=stream, args=(n,)) for n in begun]
    for reader in readers:
        reader.start()
    assert all(event.wait(30) for event in begun.values())
    srv.proc.send_signal(signal.SIGTERM)
    for reader in readers:
        reader.join(30)
    assert sorted(finishes) == ["abort", "length"]
    assert srv.proc.wait(30) == 0
    deadline = time.monotonic() + 10
    while alive(engine_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(engine_pid), "the engine process outlived the server"


def test_engine_dies_with_a_killed_server(tiny_model):
    srv = start(tiny_model)
    engine_pid = srv.engine_pids()[0]
    srv.proc.kill()
    srv.proc.wait(10)
    deadline = time.monotonic() + 10
    while alive(engine_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(engine_pid)
    srv.stop()


def test_health_is_503_while_the_model_loads(tiny_model):
    import subprocess
    import sys

    from tests.utils import free_port
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "pagoda.cli.main", "serve", tiny_model,
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PAGODA_TEST_STARTUP_DELAY_S": "4"})
    statuses, early_completion = [], None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and 200 not in statuses:
            try:
                statuses.append(httpx.get(f"{url}/health", timeout=1).status_code)
                if statuses[-1] == 503 and early_completion is None:
                    early_completion = httpx.post(f"{url}/v1/completions",
                                                  json={"prompt": "hi", "max_tokens": 2})
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert 503 in statuses and statuses[-1] == 200
    assert statuses.index(200) > statuses.index(503)
    assert early_completion is not None and early_completion.status_code == 503
    assert int(early_completion.headers["retry-after"]) >= 1
    assert early_completion.json()["error"]["code"] == "server_is_overloaded"
