"""`pagoda bench serve` under real server faults: it counts each failure with its error and
always stops by itself."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time

import httpx
import pytest

from pagoda.bench.serve.client import RequestSettings
from pagoda.bench.serve.datasets import random_dataset
from pagoda.bench.serve.runner import RunSettings, run_benchmark
from pagoda.engine.core_proc import FAIL_AT_STEP_ENV
from tests.utils import RemoteServer, tiny_chat_model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm2_dir):
    return str(tiny_chat_model(tmp_path_factory.mktemp("tiny"), smollm2_dir))


def start(model: str, extra: tuple[str, ...] = (), **kwargs) -> RemoteServer:
    return RemoteServer(model, "--served-model-name", "tiny", "--kv-cache-memory", "16MiB",
                        *extra, **kwargs)


def run(server: RemoteServer, tokenizer, num: int, output_len: int, *, rate: float,
        concurrency: int | None = None, stall_s: float = 60.0, timeout_s: float = 60.0):
    requests = random_dataset(tokenizer, num, input_len=16, output_len=output_len, seed=1)
    settings = RequestSettings(url=f"{server.url}/v1/completions", model="tiny", chat=False,
                               ignore_eos=True, stall_timeout_s=stall_s,
                               request_timeout_s=timeout_s)
    return asyncio.run(run_benchmark(settings, RunSettings(
        request_rate=rate, max_concurrency=concurrency, show_progress=False), requests))


def successes(server: RemoteServer) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    return sum(float(v) for v in re.findall(
        r'^vllm:request_success_total\{finished_reason="length"[^}]*\} (\S+)$', text, re.MULTILINE))


def when(condition, action, timeout: float = 60.0) -> threading.Thread:
    """Run `action` in the background once `condition()` holds."""
    def watch():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not condition():
            time.sleep(0.02)
        action()
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_engine_death_mid_run(tiny_model, smollm2_tokenizer):
    server = start(tiny_model, env={FAIL_AT_STEP_ENV: "40"})
    try:
        result = run(server, smollm2_tokenizer, 10, 16, rate=float("inf"), concurrency=2)
    finally:
        server.stop()
    m = result.metrics
    assert m["completed"] >= 1 and m["failed"] >= 1 and m["completed"] + m["failed"] == 10
    errors = [r.error for r in result.records if not r.success]
    assert any(e.startswith("error event") for e in errors), errors  # cut off mid-stream
    assert all(r.output_tokens == 16 for r in result.records if r.success)


def resume(pid: int) -> bool:
    """SIGCONT to a stopped process; False if it no longer exists."""
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        return False
    return True


def test_a_stalled_server_fails_requests_by_timeout(tiny_model, smollm2_tokenizer):
    server = start(tiny_model)
    engine = server.engine_pids()[0]
    stopper = when(lambda: successes(server) >= 3, lambda: os.kill(engine, signal.SIGSTOP))
    began = time.monotonic()
    try:
        result = run(server, smollm2_tokenizer, 16, 24, rate=8.0, stall_s=1.5, timeout_s=6)
    finally:
        stopper.join()
        resumed = resume(engine)
        log = server.output()
        server.stop()
    # (a stopped process exits only when killed: the server's log says what it saw; this
    # failed once in seven make test runs, its cause not yet found)
    assert resumed, f"the engine process was gone when it was to be resumed:\n{log}"
    assert time.monotonic() - began < 45
    m = result.metrics
    assert m["completed"] >= 1 and m["failed"] >= 1 and m["completed"] + m["failed"] == 16
    for r in result.records:  # cut mid-stream: a stall; never started: the request timeout
        if not r.success:
            assert r.error == ("stalled: no data for 1.5 s after its first token"
                               if r.ttft_s is not None else
                               "timed out after 6 s (no first token yet: queued)"), r.error


def test_queued_requests_are_measured_not_failed_as_stalls(tiny_model, smollm2_tokenizer):
    """One sequence at a time, 12 requests at once (the server admits them all): most wait
    far longer than the stall timeout for their first token, and all of them complete.
    The last waits for 11 x 96 decode steps, several stall timeouts on any machine (and on a
    busy one past the default 10 s the admission sheds at: the limit is lifted)."""
    stall_s = 0.4
    server = start(tiny_model, extra=("--max-num-seqs", "1", "--max-pending-sequences", "16",
                                      "--max-queue-wait", "600"))
    try:
        result = run(server, smollm2_tokenizer, 12, 96, rate=float("inf"), stall_s=stall_s)
    finally:
        server.stop()
    assert result.metrics["completed"] == 12, [r.error for r in result.records]
    assert max(r.ttft_s for r in result.records) > stall_s  # they really were queued


def test_a_dropped_connection_fails_the_requests_in_flight(tiny_model, smollm2_tokenizer):
    server = start(tiny_model)
    killer = when(lambda: successes(server) >= 3, lambda: server.proc.send_signal(signal.SIGKILL))
    try:
        result = run(server, smollm2_tokenizer, 12, 24, rate=8.0)
    finally:
        killer.join()
        server.stop()
    m = result.metrics
    assert m["completed"] >= 1 and m["failed"] >= 1 and m["completed"] + m["failed"] == 12
    assert all(not r.success or r.output_tokens == 24 for r in result.records)
    errors = {r.error.split(":")[0] for r in result.records if not r.success}
    assert errors <= {"RemoteProtocolError", "ReadError", "ConnectError"}, errors
