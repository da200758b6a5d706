"""Overload and faults on a real server (tiny random-weight model): admission by work decided
before a response starts (streams included), the engine heartbeat behind /health, /live and
/ready, the drain's 503, and the engine's CPU thread count."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import openai
import pytest

from tests.utils import RemoteServer, tiny_chat_model

LIMITS = ("--max-pending-requests", "3", "--max-pending-sequences", "4",
          "--max-pending-tokens", "1500", "--engine-stall-timeout", "2")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm2_dir):
    return str(tiny_chat_model(tmp_path_factory.mktemp("tiny"), smollm2_dir))


def start(model: str, *args: str) -> RemoteServer:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return RemoteServer(model, "--served-model-name", "tiny", "--kv-cache-memory", "16MiB",
                        *args, env=env)


@pytest.fixture(scope="module")
def server(tiny_model):
    srv = start(tiny_model, *LIMITS)
    yield srv
    assert srv.stop() == 0


@contextmanager
def frozen_engine(srv: RemoteServer) -> Iterator[int]:
    """SIGSTOP the engine process for the block: what was admitted stays in flight."""
    pid = srv.engine_pids()[0]
    os.kill(pid, signal.SIGSTOP)
    try:
        yield pid
    finally:
        os.kill(pid, signal.SIGCONT)


def held_request(srv: RemoteServer, **body) -> threading.Thread:
    """A request that runs in the background (its response is read and dropped)."""
    payload = {"model": "tiny", "prompt": "hi", "max_tokens": 900, "ignore_eos": True, **body}
    thread = threading.Thread(target=lambda: httpx.post(f"{srv.url}/v1/completions",
                                                        json=payload, timeout=120))
    thread.start()
    return thread


def wait_in_flight(srv: RemoteServer, count: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = httpx.get(f"{srv.url}/pagoda/ps", timeout=5).json()["models"]
        if rows[0]["in_flight"] >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"fewer than {count} requests in flight")


def assert_shed(error: openai.APIStatusError, reason: str) -> None:
    assert error.status_code == 503
    assert int(error.response.headers["retry-after"]) >= 1
    body = error.response.json()["error"]
    assert body["code"] == "server_is_overloaded"
    assert reason in body["message"] and "Retry after" in body["message"]


def test_streaming_request_refused_with_503_before_the_stream_starts(server):
    client = server.client()
    threads = [held_request(server, max_tokens=50) for _ in range(3)]
    with frozen_engine(server):
        wait_in_flight(server, 3)
        with pytest.raises(openai.APIStatusError) as info:
            client.completions.create(model="tiny", prompt="hi", max_tokens=5, stream=True)
        assert_shed(info.value, "requests in flight")
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model="tiny", max_tokens=5, stream=True,
                                           messages=[{"role": "user", "content": "hi"}])
        assert_shed(info.value, "requests in flight")
        assert httpx.get(f"{server.url}/ready").status_code == 503  # no room
    for thread in threads:
        thread.join(60)
    stream = client.completions.create(model="tiny", prompt="hi", max_tokens=5, stream=True)
    assert sum(1 for _ in stream) >= 1


def test_admission_counts_sequences_and_tokens_owed(server):
    client = server.client()
    first = held_request(server, n=3, max_tokens=300)
    with frozen_engine(server):
        wait_in_flight(server, 1)
        with pytest.raises(openai.APIStatusError) as info:  # 3 + 2 sequences > 4
            client.completions.create(model="tiny", prompt="hi", max_tokens=5, n=2)
        assert_shed(info.value, "sequences")
        with pytest.raises(openai.APIStatusError) as info:  # ~900 + ~601 tokens > 1500
            client.completions.create(model="tiny", prompt="hi", max_tokens=600, stream=True)
        assert_shed(info.value, "tokens")
        second = held_request(server, max_tokens=100)  # 4 sequences, ~1200 tokens: fits
        wait_in_flight(server, 2)
    first.join(60)
    second.join(60)
    response = client.completions.create(model="tiny", prompt="hi", max_tokens=900, n=8,
                                         extra_body={"ignore_eos": True})
    assert len(response.choices) == 8  # an idle engine admits any one request


def test_stalled_engine_turns_health_and_liveness_503(server):
    url = server.url
    held = held_request(server, max_tokens=400)
    wait_in_flight(server, 1)
    with frozen_engine(server):
        stopped = time.monotonic()
        statuses = []
        while time.monotonic() - stopped < 6 and 503 not in statuses:
            statuses.append(httpx.get(f"{url}/health", timeout=5).status_code)
            time.sleep(0.1)
        unhealthy_after = time.monotonic() - stopped
        assert statuses[-1] == 503 and 1.5 <= unhealthy_after < 5, (statuses, unhealthy_after)
        assert httpx.get(f"{url}/live").status_code == 503
        assert httpx.get(f"{url}/ready").status_code == 503
    held.join(60)
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/live").status_code == 200
    with frozen_engine(server):  # idle: the heartbeat stops too
        time.sleep(3.5)
        assert httpx.get(f"{url}/health").status_code == 503
    deadline = time.monotonic() + 5
    while httpx.get(f"{url}/health").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(f"{url}/ready").status_code == 200


def test_engine_threads_come_from_the_usable_cores(server):
    row = httpx.get(f"{server.url}/pagoda/ps").json()["models"][0]
    cores = len(os.sched_getaffinity(0))
    assert row["cpu_threads"] == max(1, cores - 1)
    server.log.flush()
    log = open(server.log.name).read()
    assert f"engine CPU threads: {row['cpu_threads']} (" in log


def test_drain_refuses_with_shutting_down(tiny_model):
    srv = start(tiny_model, "--shutdown-timeout", "20")
    held = held_request(srv, max_tokens=900)
    wait_in_flight(srv, 1)
    with frozen_engine(srv):
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": "tiny", "prompt": "hi",
                                                          "max_tokens": 2, "stream": True})
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "server_shutting_down"
        assert "shutting down" in r.json()["error"]["message"]
        assert httpx.get(f"{srv.url}/ready").status_code == 503
        assert httpx.get(f"{srv.url}/health").status_code == 503
        assert httpx.get(f"{srv.url}/live").status_code == 200  # draining is alive
    held.join(60)
    assert srv.proc.wait(30) == 0
    srv.stop()
