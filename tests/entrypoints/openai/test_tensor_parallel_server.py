"""The real server on two tensor-parallel ranks (two gloo worker processes under the engine
process), through the official openai client: its completions equal one device's; then a
worker killed mid-request fails that request with an error, /health turns 503 and the server
exits non-zero (the last test: it ends the shared server)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from pagoda import LLM, SamplingParams
from pagoda.cli.ps import format_rows
from tests.utils import RemoteServer, tiny_chat_model

PROMPT = [5, 17, 300, 4000, 12]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm2_dir):
    return str(tiny_chat_model(tmp_path_factory.mktemp("tiny"), smollm2_dir))


@pytest.fixture(scope="module")
def server(tiny_model):
    srv = RemoteServer(tiny_model, "--served-model-name", "tiny", "--kv-cache-memory", "16MiB",
                       "--max-model-len", "1024", "--tensor-parallel-size", "2")
    yield srv
    srv.stop()


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def worker_pids(srv: RemoteServer) -> list[int]:
    """The engine's worker processes: the children of its fork server."""
    engine = srv.engine_pids()[0]
    return [pid for helper in children(engine) for pid in children(helper)]


def test_openai_client_on_two_ranks_gets_one_devices_tokens(server, tiny_model):
    expected = LLM(tiny_model, max_model_len=1024).generate(
        [{"prompt_token_ids": PROMPT}], SamplingParams(max_tokens=8, temperature=0,
                                                       ignore_eos=True))[0].outputs[0]
    client = server.client()
    completion = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8,
                                           temperature=0, extra_body={"ignore_eos": True})
    assert completion.choices[0].text == expected.text
    assert completion.usage.completion_tokens == 8
    chat = client.chat.completions.create(model="tiny", max_tokens=4, temperature=0,
                                          messages=[{"role": "user", "content": "hello"}])
    assert chat.choices[0].finish_reason == "length"
    assert len(worker_pids(server)) == 2
    assert "2 worker process(es)" in server.output()
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'tensor_parallel_size="2"' in metrics and "pagoda:parallel_config_info" in metrics
    row = httpx.get(f"{server.url}/pagoda/ps").json()["models"][0]
    assert (row["tensor_parallel_size"], row["pipeline_parallel_size"]) == (2, 1)
    assert "(tp 2 x pp 1, per rank)" in format_rows([row])


def test_a_killed_worker_fails_the_request_and_the_server_exits_nonzero(server):
    events: list[str] = []

    def stream():
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 1000, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
            events.extend(line for line in r.iter_lines() if line.startswith("data: "))

    reader = threading.Thread(target=stream)
    reader.start()
    deadline = time.monotonic() + 10
    while not events and time.monotonic() < deadline:  # the request is running
        time.sleep(0.05)
    os.kill(worker_pids(server)[1], signal.SIGKILL)
    reader.join(30)
    assert not reader.is_alive(), "the stream hung after the worker died"
    last = json.loads(events[-1][6:]) if events[-1] != "data: [DONE]" else None
    assert last is not None and "error" in last, events[-3:]
    health = None
    while server.proc.poll() is None:
        try:
            health = httpx.get(f"{server.url}/health", timeout=1).status_code
        except httpx.HTTPError:
            break
        time.sleep(0.05)
    assert health in (None, 503)
    assert server.proc.wait(30) != 0
    server.log.seek(0)
    assert "worker process rank 1" in server.log.read().split("killed by signal 9")[0]
