"""The multi-process executor: two worker processes (gloo on CPU) driven by hand with plain
scheduler outputs as EngineCore drives them, giving the engine's tokens; the grammar bitmask
and sleep/wake crossing to every rank; an engine on one worker process equal to the
in-process one (an adapter it refuses leaves it serving); a worker that dies (exits
mid-step, or is killed) failing the waiting call at once with its rank and why, never a
hang; a failed start and a script's exit ending the workers."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

from pagoda import LLM, SamplingParams
from pagoda.config import engine_config
from pagoda.errors import ConfigError, UnsupportedModelError
from pagoda.executor import serial
from pagoda.executor.base import WorkerConfig
from pagoda.executor.factory import executor_for
from pagoda.executor.multiproc import MultiprocExecutor, WorkerError
from pagoda.executor.worker_proc import EXIT_AT_STEP_ENV
from pagoda.lora.request import LoRAAdapterError
from pagoda.scheduler.output import NewRequestData, SchedulerOutput
from tests.executor.test_in_process import (
    BLOCK_BYTES,
    GREEDY,
    PROMPT,
    decode,
    only_token,
    prefill,
    run,
)
from tests.utils import save_random_checkpoint, tiny_chat_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    return tiny_chat_model(tmp_path_factory.mktemp("tiny"), smollm2_dir)


def start(tiny_dir, tensor_parallel_size: int = 2) -> MultiprocExecutor:
    config = engine_config(str(tiny_dir), max_model_len=64, kv_cache_memory=64 * BLOCK_BYTES,
                           tensor_parallel_size=tensor_parallel_size,
                           distributed_executor_backend="mp")
    executor = executor_for(WorkerConfig(config, 64))
    executor.init_device()
    executor.load_model()
    executor.initialize_kv_cache(executor.determine_kv_cache_size().num_blocks)
    return executor


@pytest.fixture(scope="module")
def executor(tiny_dir):
    executor = start(tiny_dir)
    yield executor
    executor.shutdown()


def test_start_up_on_two_worker_processes(executor):
    assert isinstance(executor, MultiprocExecutor)
    assert len(executor.worker_pids()) == 2 and os.getpid() not in executor.worker_pids()
    info = executor.loaded_model
    assert (info.device, info.dtype, info.attention_backend) == ("cpu", "float32", "torch")
    # each rank holds one of the two KV heads: the same bytes buy twice the blocks
    assert executor.determine_kv_cache_size().num_blocks == 128
    assert executor.capture_decode_graphs() is False


def test_greedy_steps_with_one_in_flight_equal_the_engine(executor, tiny_dir):
    expected = LLM(str(tiny_dir), max_model_len=64).generate(
        [{"prompt_token_ids": PROMPT}], GREEDY.clone(max_tokens=4))[0].outputs[0].token_ids
    got = []
    executor.execute_model(prefill("a", PROMPT, GREEDY, block=1))
    executor.sample_tokens(None)
    for n in range(3):  # the next step is sent before the previous one's tokens are back
        executor.execute_model(decode("a", len(PROMPT) + n))
        executor.sample_tokens(None)
        got += executor.collect_output().sampled_token_ids["a"]
    got += executor.collect_output().sampled_token_ids["a"]
    assert got == expected
    run(executor, SchedulerOutput(finished_request_ids={"a"}))


def test_the_bitmask_reaches_every_rank(executor, tiny_dir):
    free = run(executor, prefill("free", PROMPT, GREEDY, block=2))["free"]
    both = SchedulerOutput(
        new_requests=[NewRequestData("free2", PROMPT, GREEDY, None, [[3]], 0),
                      NewRequestData("bound", PROMPT, GREEDY, None, [[4]], 0)],
        num_scheduled_tokens={"free2": 5, "bound": 5}, total_num_scheduled_tokens=10,
        finished_request_ids={"free"}, grammar_rows={"bound": 0})
    assert run(executor, both, only_token(42)) == {"free2": free, "bound": [42]}
    # both ranks fed token 42 back: the next step continues from it on both
    step = SchedulerOutput(cached_requests=decode("bound", 5).cached_requests,
                           num_scheduled_tokens={"bound": 1}, total_num_scheduled_tokens=1,
                           finished_request_ids={"free2"})
    expected = LLM(str(tiny_dir), max_model_len=64).generate(
        [{"prompt_token_ids": PROMPT + [42]}], GREEDY.clone(max_tokens=1))[0].outputs[0]
    assert run(executor, step)["bound"] == expected.token_ids
    run(executor, SchedulerOutput(finished_request_ids={"bound"}))


def test_sleep_and_wake_on_every_rank(executor):
    before = run(executor, prefill("s1", PROMPT, GREEDY, block=6))["s1"]
    assert not executor.prepare_sleep()
    executor.sleep()
    assert executor.wake_up() is False
    after = run(executor, prefill("s2", PROMPT, GREEDY, block=6, finished={"s1"}))["s2"]
    assert after == before
    run(executor, SchedulerOutput(finished_request_ids={"s2"}))


def test_one_worker_process_serves_like_the_in_process_worker(tiny_dir):
    prompts = [{"prompt_token_ids": PROMPT}, {"prompt_token_ids": PROMPT[:3]}]
    params = [GREEDY.clone(logprobs=2), SamplingParams(max_tokens=4, temperature=0.8, seed=11)]
    results = {}
    for backend in ("uni", "mp"):
        llm = LLM(str(tiny_dir), max_model_len=64, distributed_executor_backend=backend,
                  enable_lora=True)
        assert isinstance(llm.engine.core.executor, MultiprocExecutor) == (backend == "mp")
        results[backend] = llm.generate(prompts, params)
        with pytest.raises(LoRAAdapterError, match="does not exist"):  # the worker goes on
            llm.add_lora("missing", str(tiny_dir / "no-such-adapter"))
        assert llm.generate(prompts[:1], params[:1])[0].outputs[0].token_ids == \
            results[backend][0].outputs[0].token_ids
        llm.engine.core.shutdown()
    for uni, mp in zip(results["uni"], results["mp"]):
        assert mp.outputs[0].token_ids == uni.outputs[0].token_ids
    for uni, mp in zip(results["uni"][0].outputs[0].logprobs,
                       results["mp"][0].outputs[0].logprobs):
        assert uni.keys() == mp.keys()
        assert all(abs(uni[t].logprob - mp[t].logprob) < 1e-5 for t in uni)


def test_a_worker_exiting_mid_step_fails_the_call_with_its_rank(tiny_dir, monkeypatch):
    monkeypatch.setenv(EXIT_AT_STEP_ENV, "1:2")  # rank 1 exits when its second step arrives
    executor = start(tiny_dir)
    try:
        run(executor, prefill("a", PROMPT, GREEDY, block=1))
        executor.execute_model(decode("a", len(PROMPT)))
        executor.sample_tokens(None)
        with pytest.raises(WorkerError, match=r"rank 1 \(pid \d+\) exited with status 19"):
            executor.collect_output()
        with pytest.raises(WorkerError, match="rank 1"):  # and every later call, at once
            executor.execute_model(decode("a", len(PROMPT) + 1))
    finally:
        processes = [w.process for w in executor.workers]
        executor.shutdown()
    assert not any(p.is_alive() for p in processes)  # rank 0, stuck in a collective, is ended


def test_a_killed_worker_fails_the_next_call(tiny_dir):
    executor = start(tiny_dir)
    try:
        os.kill(executor.worker_pids()[0], signal.SIGKILL)
        with pytest.raises(WorkerError, match="rank 0 .* killed by signal 9"):
            run(executor, prefill("a", PROMPT, GREEDY, block=1))
    finally:
        executor.shutdown()


def test_a_ranks_error_after_its_peers_death_names_the_dead_peer(tiny_dir):
    """A rank whose collective failed because its peer died answers with that error and
    exits; the executor names the peer even when the answering rank is gone first too (a
    wait on every rank's sentinel then finds the answering rank before its peer)."""
    executor = start(tiny_dir)
    try:
        for worker in executor.workers:
            os.kill(worker.process.pid, signal.SIGKILL)
            worker.process.join(30)
        reply = serial.WorkerReply(msgspec.Raw(b""), "RuntimeError",
                                   "Connection closed by peer")
        with pytest.raises(WorkerError, match=r"rank 1 \(pid \d+\) was killed by signal 9"):
            executor._raise_worker_error(executor.workers[0], "execute_model", reply)
    finally:
        executor.shutdown()


def test_a_size_that_does_not_split_the_heads_is_refused_before_any_worker_starts(tiny_dir):
    with pytest.raises(ConfigError, match="does not divide the model's 4 attention heads"):
        LLM(str(tiny_dir), max_model_len=64, tensor_parallel_size=3)


def test_a_failed_start_reports_the_workers_error_and_ends_them(tmp_path):
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=128)
    path = save_random_checkpoint(config, tmp_path / "ckpt", None)
    weights = load_file(path / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, path / "model.safetensors")
    before = set(multiprocessing.active_children())
    with pytest.raises(UnsupportedModelError, match="lacks 1 weights the model needs"):
        LLM(str(path), max_model_len=64, tensor_parallel_size=2)
    assert not set(multiprocessing.active_children()) - before


def test_a_script_that_never_shuts_its_engine_down_still_exits(tmp_path):
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=128)
    path = save_random_checkpoint(config, tmp_path / "ckpt", None)
    script = ("from pagoda import LLM, SamplingParams\n"
              f"llm = LLM({str(path)!r}, max_model_len=64, tensor_parallel_size=2)\n"
              "out = llm.generate([{'prompt_token_ids': [1, 2]}], SamplingParams(max_tokens=2))\n"
              "print(len(out[0].outputs[0].token_ids))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).parents[2])
    assert (proc.returncode, proc.stdout.strip()) == (0, "2"), proc.stderr[-2000:]
