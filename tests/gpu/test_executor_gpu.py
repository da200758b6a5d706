"""The multi-process executor on CUDA: one worker process (TP=1) with its CUDA graphs gives
the in-process engine's tokens, at nearly its decode speed; a killed worker fails the call;
with two GPUs, TP=2 over NCCL (collectives inside the CUDA graphs) and PP=2 give TP=1's
tokens."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from transformers import LlamaConfig

from pagoda import LLM, SamplingParams
from pagoda.executor.multiproc import MultiprocExecutor, WorkerError
from tests.utils import save_random_checkpoint

PROMPTS = [[(7 * i + 3 * j) % 4000 + 5 for j in range(n)] for i, n in
           enumerate((3, 17, 64, 200, 9, 33))]
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
MAX_WORKER_OVERHEAD_S = 0.5e-3  # what a worker process may add to one decode step


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, vocab_size=4096,
                         max_position_embeddings=4096, initializer_range=0.1,
                         tie_word_embeddings=False)
    return str(save_random_checkpoint(config, tmp_path_factory.mktemp("gpu-llama"), None))


def make(checkpoint: str, **kwargs) -> LLM:
    return LLM(checkpoint, device="cuda", dtype="float32", kv_cache_memory=1 << 30,
               max_num_seqs=32, **kwargs)


def greedy(llm: LLM) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
    return [o.outputs[0].token_ids for o in outs]


def decode_one_s(llm: LLM, tokens: int = 256) -> float:
    """Seconds per output token of one request alone (after a warm-up)."""
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    llm.generate([{"prompt_token_ids": PROMPTS[1]}], params)
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": PROMPTS[1]}], params)
    return (time.perf_counter() - start) / tokens


def test_one_worker_process_with_graphs_equals_in_process(checkpoint, gpu_report):
    in_process = make(checkpoint, distributed_executor_backend="uni")
    expected, uni_s = greedy(in_process), decode_one_s(in_process)
    in_process.engine.core.shutdown()
    del in_process
    torch.cuda.empty_cache()
    worker = make(checkpoint, distributed_executor_backend="mp")
    assert isinstance(worker.engine.core.executor, MultiprocExecutor)
    assert greedy(worker) == expected
    mp_s = decode_one_s(worker)
    gpu_report(uni_ms_per_token=uni_s * 1e3, mp_ms_per_token=mp_s * 1e3,
               mp_over_uni=mp_s / uni_s)
    # the bench (bench/results) holds the 3 % bound on the 8B; on this 1 ms step only a gross
    # regression fails: the worker process may add half a millisecond a step (0.2 ms seen)
    assert mp_s - uni_s < MAX_WORKER_OVERHEAD_S
    worker.engine.core.shutdown()


def test_a_killed_worker_fails_the_engine(checkpoint):
    llm = make(checkpoint, distributed_executor_backend="mp")
    os.kill(llm.engine.core.executor.worker_pids()[0], signal.SIGKILL)
    with pytest.raises(WorkerError, match="killed by signal 9"):
        greedy(llm)
    llm.engine.core.shutdown()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_ranks_over_nccl_equal_one(checkpoint):
    one = make(checkpoint)
    expected = greedy(one)
    one.engine.core.shutdown()
    del one
    torch.cuda.empty_cache()
    for eager in (True, False):  # without and with the all-reduces inside CUDA graphs
        two = make(checkpoint, tensor_parallel_size=2, enforce_eager=eager)
        assert greedy(two) == expected
        two.engine.core.shutdown()
    stages = make(checkpoint, pipeline_parallel_size=2)  # activations between GPUs
    assert greedy(stages) == expected
    stages.engine.core.shutdown()
