"""Engine clients: msgpack messages, the engine process over ZMQ, death, shutdown, startup."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import msgspec
import pytest

from pagoda.config import CacheConfig, EngineConfig
from pagoda.core_outputs import EngineCoreOutput, SchedulerStats
from pagoda.engine import serial
from pagoda.engine.client import (
    EngineCoreOutputs,
    EngineDeadError,
    EngineStartupError,
    InprocClient,
    MPClient,
)
from pagoda.engine.core_proc import EXIT_AT_STEP_ENV, FAIL_AT_STEP_ENV
from pagoda.engine.model_info import ModelInfo
from pagoda.request import EngineCoreRequest
from pagoda.sampling_params import SamplingParams

REPO = Path(__file__).resolve().parents[2]
PROMPTS = {"a": [5, 6, 7, 8, 9], "b": [1, 2, 3] * 7, "c": [42] * 17}


def tiny_config(model_dir: Path) -> EngineConfig:
    return EngineConfig(model=str(model_dir), load_format="dummy",
                        cache=CacheConfig(kv_cache_memory=4 << 20))


def request(request_id: str, prompt: list[int], max_tokens: int = 8,
            **params: object) -> EngineCoreRequest:
    sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **params)
    return EngineCoreRequest(request_id, prompt, sampling, eos_token_id=2)


async def collect(client, request_ids, timeout: float = 30.0):
    """Tokens, finish reasons and errors of these requests, read until all of them finished."""
    tokens = {i: [] for i in request_ids}
    finished: dict[str, str] = {}
    logprobs: dict[str, list] = {i: [] for i in request_ids}
    errors = []
    while len(finished) < len(request_ids):
        batch = await asyncio.wait_for(client.get_outputs(), timeout)
        assert isinstance(batch, EngineCoreOutputs) and isinstance(batch.stats, SchedulerStats)
        errors += batch.errors
        for out in batch.outputs:
            if out.request_id not in tokens:
                continue  # left over from an earlier test
            tokens[out.request_id] += out.new_token_ids
            if out.new_logprobs is not None:
                logprobs[out.request_id].append(out.new_logprobs)
            if out.finished:
                finished[out.request_id] = out.finish_reason
    return tokens, finished, logprobs, errors


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from transformers import LlamaConfig
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=300,
                max_position_embeddings=256).save_pretrained(path)
    return path


@pytest.fixture
def sock_root(monkeypatch) -> Iterator[Path]:
    """Socket dirs of clients made in this test go here, so leftovers can be checked (a
    short path under /tmp: a socket's path must fit in about 100 bytes, and pytest's
    temporary paths can be longer)."""
    root = Path(tempfile.mkdtemp(prefix="socks-", dir="/tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def mp_client(tiny_model):
    client = MPClient(tiny_config(tiny_model), startup_timeout=120)
    yield client
    client.shutdown()


def process_gone(pid: int) -> bool:
    """True once pid has exited (a zombie nobody reaped yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# ---- serialization ---------------------------------------------------------------------------
def _info() -> ModelInfo:
    return ModelInfo("tiny", 256, 300, 2, [7, 9], 512, 16, 8176)


INPUTS = [
    serial.AddRequest(EngineCoreRequest(
        "r1", [1, 2, 3], SamplingParams(n=1, temperature=0.7, top_p=0.9, top_k=5, seed=3,
                                        logit_bias={5: -2.5, 7: 1.0}, stop=["x", "yz"],
                                        stop_token_ids=[4], logprobs=2, prompt_logprobs=1,
                                        max_tokens=None, min_tokens=1),
        eos_token_id=2, arrival_time=12.5, priority=-1, cache_salt="salt", parent_id="p")),
    serial.AbortRequests(["r1", "r2"]),
    serial.UtilityCall(3, "stats"),
    serial.UtilityCall(4, "reset_prefix_cache", [1, 2.5, "s", True, None]),
    serial.Shutdown(),
]

OUTPUTS = [
    serial.Ready(_info()),
    serial.StartupFailed("ModelNotFoundError", "no model at /x"),
    serial.EngineCoreOutputs(
        [EngineCoreOutput("r1", [4, 5], ([[4, 1], [5, 2]], [[-0.5, -0.1], [-1.0, -0.2]], [2, 1]),
                          None, None, None, 16),
         EngineCoreOutput("r2", [9], None, ([[1]], [[-3.0]], [7]), "stop", "yz"),
         EngineCoreOutput("r3", [], finish_reason="error")],
        SchedulerStats(2, 1, 0.25, 3, 10, 4, 99), 123.5,
        [serial.RequestError("r3", "ValueError", "duplicate request id 'r3'")]),
    serial.make_result(5, SchedulerStats(1, 0, 0.5)),
    serial.make_result(6, error="boom"),
    serial.EngineDead("engine step failed: RuntimeError: x"),
]


@pytest.mark.parametrize("message", INPUTS, ids=lambda m: type(m).__name__)
def test_input_messages_round_trip(message):
    assert serial.decode_input(serial.encode(message)) == message
    with pytest.raises(msgspec.ValidationError):  # typed: an input frame is no output frame
        serial.decode_output(serial.encode(message))


@pytest.mark.parametrize("message", OUTPUTS, ids=lambda m: type(m).__name__)
def test_output_messages_round_trip(message):
    assert serial.decode_output(serial.encode(message)) == message


def test_utility_results_decode_typed():
    stats = SchedulerStats(1, 2, 0.5, 3, 4, 5, 6)
    result = serial.decode_output(serial.encode(serial.make_result(1, stats)))
    assert serial.decode_result("stats", result.result) == stats
    result = serial.decode_output(serial.encode(serial.make_result(2, True)))
    assert serial.decode_result("reset_prefix_cache", result.result) is True
    with pytest.raises(msgspec.ValidationError):
        serial.decode_result("stats", result.result)


def _add_frame(**sampling: object) -> bytes:
    params = msgspec.to_builtins(SamplingParams())
    params.update(sampling)
    return msgspec.msgpack.encode({"type": "add", "request": {
        "request_id": "bad-1", "prompt_token_ids": [1], "sampling_params": params}})


@pytest.mark.parametrize("sampling, match", [
    ({"temperature": -1.0}, "temperature must be in"),
    ({"n": 10_000}, "n must be in"),
    ({"stop": ["x"] * 1000}, "stop strings"),
    ({"top_p": "high"}, "Expected `float`"),
    ({"max_tokens": True}, "Expected `int | null`, got `bool`"),
])
def test_decoding_revalidates_sampling_params(sampling, match):
    frame = _add_frame(**sampling)
    with pytest.raises(msgspec.ValidationError, match=match):
        serial.decode_input(frame)
    assert serial.request_id_of(frame) == "bad-1"


@pytest.mark.parametrize("frame", [
    b"", b"\xc1", b"\x93garbage", msgspec.msgpack.encode([1, 2, 3]),
    msgspec.msgpack.encode({"type": "exec", "code": "import os"}),
    msgspec.msgpack.encode({"type": "add"}),
    msgspec.msgpack.encode({"type": "abort", "request_ids": [1, 2]}),
    __import__("pickle").dumps(EngineCoreRequest("x", [1], SamplingParams())),
], ids=lambda f: repr(f[:12]))
def test_garbage_is_rejected(frame):
    with pytest.raises(msgspec.MsgspecError):
        serial.decode_input(frame)
    with pytest.raises(msgspec.MsgspecError):
        serial.decode_output(frame)
    assert serial.request_id_of(frame) is None


# ---- the engine process ----------------------------------------------------------------------
def test_mp_client_matches_inproc_client(tiny_model, mp_client):
    inproc = InprocClient(tiny_config(tiny_model))
    # the engine process sets its own CPU thread count (pagoda.engine.cpu_threads)
    assert replace(mp_client.model_info, cpu_threads=0) == replace(inproc.model_info,
                                                                   cpu_threads=0)
    results = []
    for client in (inproc, mp_client):
        for rid, prompt in PROMPTS.items():
            client.add_request(request(rid, prompt, logprobs=2 if rid == "b" else None))
        results.append(asyncio.run(collect(client, list(PROMPTS))))
    (tok_in, fin_in, lp_in, err_in), (tok_mp, fin_mp, lp_mp, err_mp) = results
    assert tok_mp == tok_in and all(len(t) == 8 for t in tok_mp.values())
    assert fin_mp == fin_in == {rid: "length" for rid in PROMPTS}
    assert not err_in and not err_mp
    flat = [lp for step in lp_mp["b"] for lp in step[1]]
    assert len(flat) == 8 and all(isinstance(x, float) for row in flat for x in row)
    for step_mp, step_in in zip(lp_mp["b"], lp_in["b"], strict=True):
        assert step_mp[0] == step_in[0]
        for row_mp, row_in in zip(step_mp[1], step_in[1], strict=True):
            assert row_mp == pytest.approx(row_in, abs=1e-4)
    inproc.shutdown()
    with pytest.raises(EngineDeadError):
        inproc.add_request(request("late", [1]))


def test_inproc_client_waits_for_work_and_dies_on_a_failed_step(tiny_model, monkeypatch):
    client = InprocClient(tiny_config(tiny_model))

    async def body():
        waiter = asyncio.ensure_future(client.get_outputs())
        await asyncio.sleep(0.05)
        assert not waiter.done()  # idle: waits for a request instead of spinning
        client.add_request(request("a", [1, 2, 3], max_tokens=2))
        assert [o.request_id for o in (await asyncio.wait_for(waiter, 10)).outputs] == ["a"]
        assert isinstance(await client.call("stats"), SchedulerStats)
        monkeypatch.setattr(client.core, "step", lambda: 1 / 0)
        with pytest.raises(EngineDeadError, match="ZeroDivisionError"):
            await client.get_outputs()
        assert not client.is_alive()
        with pytest.raises(EngineDeadError):
            client.add_request(request("b", [1]))

    asyncio.run(body())


def test_abort_frees_blocks_and_utility_calls(mp_client):
    async def body():
        assert await mp_client.call("reset_prefix_cache") in (True, False)
        mp_client.add_request(request("long", list(range(10, 40)), max_tokens=200))
        while not any(o.request_id == "long" for o in (await mp_client.get_outputs()).outputs):
            pass
        busy = await mp_client.call("stats")
        assert busy.num_running == 1 and busy.kv_cache_usage > 0
        mp_client.abort_requests(["long", "never-existed"])
        idle = await mp_client.call("stats")
        assert (idle.num_running, idle.num_waiting, idle.kv_cache_usage) == (0, 0, 0.0)
        with pytest.raises(ValueError, match="unknown engine utility"):
            await mp_client.call("__del__")
    asyncio.run(body())


def test_bad_messages_get_errors_and_the_engine_lives_on(mp_client):
    async def body():
        mp_client._input.send(b"\x93garbage")
        mp_client._input.send(_add_frame(temperature=-1.0))
        mp_client._input.send(msgspec.msgpack.encode({"type": "call", "call_id": "x"}))
        mp_client.add_request(request("oov", [1, 299, 300]))
        # long enough to be still running when its duplicate arrives, even on a loaded machine
        mp_client.add_request(request("dup", [3, 4, 5], max_tokens=200))
        mp_client.add_request(request("dup", [3, 4, 5], max_tokens=4))
        errors, finished_ids = [], set()
        while len(errors) < 5 or "dup" not in finished_ids:  # the first "dup" is valid: let it end
            batch = await asyncio.wait_for(mp_client.get_outputs(), 30)
            errors += batch.errors
            finished_ids |= {o.request_id for o in batch.outputs
                             if o.finish_reason in ("length", "stop")}
        by_id = {e.request_id: e for e in errors}
        assert "temperature" in by_id["bad-1"].message
        assert "out of vocabulary" in by_id["oov"].message
        assert "already in use" in by_id["dup"].message
        assert sum(e.request_id is None for e in errors) == 2
        mp_client.add_request(request("after", [7, 8, 9], max_tokens=3))
        tokens, finished, _, late = await collect(mp_client, ["after"])
        assert finished == {"after": "length"} and len(tokens["after"]) == 3 and not late
        assert mp_client.is_alive()
    asyncio.run(body())


def test_error_output_ends_the_rejected_request(mp_client):
    mp_client.add_request(request("oov-2", [1, 1000]))
    tokens, finished, _, errors = asyncio.run(collect(mp_client, ["oov-2"]))
    assert finished == {"oov-2": "error"} and tokens == {"oov-2": []}
    assert [e.request_id for e in errors] == ["oov-2"]


async def _pending_then_death(client: MPClient, kill) -> float:
    """Start a long request, wait in get_outputs, kill; seconds until the waiter raised."""
    client.add_request(request("victim", list(range(20)), max_tokens=230))
    await client.get_outputs()
    waiter = asyncio.ensure_future(client.get_outputs())
    await asyncio.sleep(0.05)
    start = time.monotonic()
    kill()
    with pytest.raises(EngineDeadError):
        while True:  # batches already in flight may still arrive first
            await asyncio.wait_for(waiter, 5)
            waiter = asyncio.ensure_future(client.get_outputs())
    return time.monotonic() - start


def _assert_dead_and_clean(client: MPClient, sock_root: Path) -> None:
    assert not client.is_alive()
    with pytest.raises(EngineDeadError):
        client.add_request(request("late", [1]))
    with pytest.raises(EngineDeadError):
        asyncio.run(client.get_outputs())
    with pytest.raises(EngineDeadError):
        asyncio.run(client.call("stats"))
    client.shutdown()
    assert process_gone(client.engine_pid) and not list(sock_root.iterdir())


def test_sigkilled_engine_is_reported_dead_within_a_second(tiny_model, sock_root):
    client = MPClient(tiny_config(tiny_model), startup_timeout=120)
    elapsed = asyncio.run(_pending_then_death(
        client, lambda: os.kill(client.engine_pid, signal.SIGKILL)))
    assert elapsed < 1.0
    assert client._proc.exitcode == -signal.SIGKILL
    _assert_dead_and_clean(client, sock_root)


@pytest.mark.parametrize("env, exit_code, reason", [
    (FAIL_AT_STEP_ENV, 1, "injected failure"),
    (EXIT_AT_STEP_ENV, 17, "exit code 17"),
])
def test_engine_failing_mid_run_is_reported_dead(tiny_model, sock_root, monkeypatch,
                                                 env, exit_code, reason):
    monkeypatch.setenv(env, "3")
    client = MPClient(tiny_config(tiny_model), startup_timeout=120)
    monkeypatch.delenv(env)
    client.add_request(request("victim", list(range(20)), max_tokens=100))
    start = time.monotonic()

    async def drain():
        while True:
            await asyncio.wait_for(client.get_outputs(), 10)

    with pytest.raises(EngineDeadError) as info:
        asyncio.run(drain())
    assert time.monotonic() - start < 5.0
    assert wait_until(lambda: client._proc.exitcode is not None, 5)
    assert client._proc.exitcode == exit_code
    assert reason in str(info.value) or "exit code" in str(info.value)
    _assert_dead_and_clean(client, sock_root)


HELPER = """
import os, sys, time
from pagoda.config import CacheConfig, EngineConfig
from pagoda.engine.client import MPClient

if __name__ == "__main__":
    client = MPClient(EngineConfig(model=sys.argv[1], load_format="dummy",
                                   cache=CacheConfig(kv_cache_memory=4 << 20)))
    with open(sys.argv[2] + ".tmp", "w") as f:
        f.write(f"{client.engine_pid} {client._sock_dir}")
    os.rename(sys.argv[2] + ".tmp", sys.argv[2])
    time.sleep(120)
"""


COLLECTED = """
import asyncio, gc, sys
from pagoda.config import CacheConfig, EngineConfig
from pagoda.engine.client import MPClient

if __name__ == "__main__":
    client = MPClient(EngineConfig(model=sys.argv[1], load_format="dummy",
                                   cache=CacheConfig(kv_cache_memory=4 << 20)))
    asyncio.run(client.call("stats"))  # the output socket has been read from a loop
    print(client.engine_pid, flush=True)
    client.cycle = client  # only the garbage collector can free it
    del client
    gc.collect()
    print("collected", flush=True)
"""


def test_a_client_freed_by_the_garbage_collector_stops_its_engine(tiny_model, tmp_path):
    """Its finalizer runs when the collector breaks the cycle: the sockets the context no
    longer tracks by then must still be closed, or ending the context waits forever."""
    script = tmp_path / "collected.py"
    script.write_text(COLLECTED)
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    done = subprocess.run([sys.executable, str(script), str(tiny_model)], env=env, check=False,
                          capture_output=True, text=True, timeout=90)
    engine_pid, collected = done.stdout.split()
    assert collected == "collected" and done.returncode == 0, done.stderr[-2000:]
    assert process_gone(int(engine_pid))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_engine_exits_when_its_parent_is_sigkilled(tiny_model, tmp_path):
    script, pid_file = tmp_path / "helper.py", tmp_path / "engine.pid"
    script.write_text(HELPER)
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    helper = subprocess.Popen([sys.executable, str(script), str(tiny_model), str(pid_file)],
                              env=env)
    try:
        assert wait_until(lambda: pid_file.exists() or helper.poll() is not None, 90)
        engine_pid, sock_dir = pid_file.read_text().split()
        engine_pid = int(engine_pid)
        assert not process_gone(engine_pid) and Path(sock_dir).is_dir()
        helper.send_signal(signal.SIGKILL)
        helper.wait(10)
        assert wait_until(lambda: process_gone(int(engine_pid)), 5), "engine outlived its parent"
        assert wait_until(lambda: not Path(sock_dir).exists(), 2)
    finally:
        helper.kill()
        helper.wait(10)


def test_startup_failure_raises_a_clear_error(sock_root):
    start = time.monotonic()
    with pytest.raises(EngineStartupError, match="failed to load the model") as info:
        MPClient(EngineConfig(model="/nonexistent/model-dir", load_format="safetensors"),
                 startup_timeout=120)
    assert time.monotonic() - start < 30
    assert info.value.exit_code == 1 and info.value.error_type == "ModelNotFoundError"
    assert not list(sock_root.iterdir())


def test_startup_timeout_stops_the_engine(tiny_model, sock_root):
    with pytest.raises(EngineStartupError, match="did not report ready within"):
        MPClient(tiny_config(tiny_model), startup_timeout=0.2)
    assert not list(sock_root.iterdir())


def test_shutdown_stops_engine_and_removes_socket_dir(tiny_model, sock_root):
    client = MPClient(tiny_config(tiny_model), startup_timeout=120)
    sock_dir = Path(client._sock_dir)
    assert sock_dir.parent == sock_root and oct(sock_dir.stat().st_mode & 0o777) == "0o700"
    assert sorted(p.name for p in sock_dir.iterdir()) == ["input", "output"]

    async def wait_then_shutdown():
        waiter = asyncio.ensure_future(client.get_outputs())
        await asyncio.sleep(0.05)
        client.shutdown()
        with pytest.raises(EngineDeadError, match="shut down"):
            await asyncio.wait_for(waiter, 2)

    asyncio.run(wait_then_shutdown())
    assert client._proc.exitcode == 0
    assert process_gone(client.engine_pid) and not sock_dir.exists()
    assert not client.is_alive()
    client.shutdown()  # idempotent
