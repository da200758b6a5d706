"""The multi-process executor on CUDA: one worker process (TP=1) with its CUDA graphs gives
the in-process engine's tokens, at nearly its decode speed; a killed worker fails the call;
two pipeline stages on one GPU, each replaying its own CUDA graphs, give one worker's tokens;
with two GPUs, TP=2 over NCCL (collectives inside the CUDA graphs) and PP=2 give TP=1's
tokens."""

from __future__ import annotations

import os
import signal
import time
from collections import deque
from dataclasses import dataclass, field

import pytest
import torch
from transformers import LlamaConfig

from pagoda import LLM, SamplingParams
from pagoda.config import engine_config
from pagoda.executor.base import WorkerConfig
from pagoda.executor.multiproc import MultiprocExecutor, WorkerError
from pagoda.executor.worker import Worker
from pagoda.layers.parallel import PipelineStage
from pagoda.runner.cuda_graphs import CudaGraphRunner
from pagoda.scheduler.output import CachedRequestData, NewRequestData, SchedulerOutput
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
    return greedy_of(llm, PROMPTS)


def greedy_of(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    return [o.outputs[0].token_ids for o in outs]


def decode_one_s(llm: LLM, tokens: int = 256, runs: int = 3) -> float:
    """Seconds per output token of one request alone (after a warm-up), the fastest of
    `runs` (on a step of about a millisecond one run's host hiccups move it by half)."""
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    llm.generate([{"prompt_token_ids": PROMPTS[1]}], params)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": PROMPTS[1]}], params)
        times.append((time.perf_counter() - start) / tokens)
    return min(times)


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
    # regression fails: the worker process may add half a millisecond a step (0.17-0.59 ms
    # seen in single runs)
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
    for eager in (True, False):  # activations between GPUs; with graphs, each stage's own
        stages = make(checkpoint, pipeline_parallel_size=2, enforce_eager=eager)
        assert greedy(stages) == expected
        stages.engine.core.shutdown()


@dataclass(frozen=True)
class HandoffStage(PipelineStage):
    """A pipeline stage whose transfers stay in this process: the activations and the
    sampled ids go through queues both stages share (NCCL, which makes these transfers
    between GPUs, will not put two ranks on one device)."""

    activations: deque = field(default_factory=deque, compare=False)
    sampled_ids: deque = field(default_factory=deque, compare=False)

    def send(self, tensors):
        self.activations.append(tuple(t.clone() for t in tensors))

    def receive(self, shape, dtype, device, count):
        tensors = self.activations.popleft()
        assert len(tensors) == count and all(t.shape == shape for t in tensors)
        return tensors

    def share_sampled(self, sampled):
        if self.is_last:
            self.sampled_ids.append(sampled.clone())
        else:  # the last stage samples first here
            sampled.copy_(self.sampled_ids.popleft())
        return []


def stage_worker(checkpoint: str, stage: PipelineStage, blocks: int) -> Worker:
    worker = Worker(WorkerConfig(stage_config(checkpoint), 512))
    worker.init_device()
    worker.stage = stage
    worker.load_model()
    worker.initialize_kv_cache(blocks)
    assert worker.capture_decode_graphs()
    return worker


def stage_config(checkpoint: str):
    return engine_config(checkpoint, device="cuda", dtype="float32", max_num_seqs=8)


def test_pipeline_stages_replay_their_graphs_on_one_gpu(checkpoint, monkeypatch):
    prompts = PROMPTS[:4]
    one = make(checkpoint)
    expected = greedy_of(one, prompts)
    one.engine.core.shutdown()
    del one
    torch.cuda.empty_cache()
    replays = []
    real_run = CudaGraphRunner.run
    monkeypatch.setattr(CudaGraphRunner, "run",
                        lambda self, *a: replays.append(self) or real_run(self, *a))
    queues = {"activations": deque(), "sampled_ids": deque()}
    first = HandoffStage(0, 2, 0, 2, next_rank=1, last_rank=1, **queues)
    last = HandoffStage(1, 2, 2, 4, prev_rank=0, last_rank=1, **queues)
    block_size = stage_config(checkpoint).cache.block_size
    blocks_each = -(-(max(map(len, prompts)) + GREEDY.max_tokens) // block_size)
    workers = [stage_worker(checkpoint, s, len(prompts) * blocks_each + 1)
               for s in (first, last)]
    got = [[] for _ in prompts]
    for step in range(GREEDY.max_tokens):
        sched_out = step_of(prompts, step, blocks_each)
        for worker in workers:
            worker.execute_model(sched_out)
        for worker in reversed(workers):  # the last stage samples, then hands its ids back
            worker.sample_tokens(None)
        outputs = [worker.collect_output() for worker in workers]
        assert outputs[0].sampled_token_ids == outputs[1].sampled_token_ids
        for rid, ids in outputs[1].sampled_token_ids.items():
            got[int(rid)] += ids
    assert got == expected
    assert {id(g) for g in replays} == {id(w.runner.graphs) for w in workers}
    assert len(replays) == 2 * (GREEDY.max_tokens - 1)  # every decode step, on both stages


def step_of(prompts: list[list[int]], step: int, blocks_each: int) -> SchedulerOutput:
    """Step `step` of a greedy run of every prompt: all prefills first, then decodes."""
    ids = [str(i) for i in range(len(prompts))]
    if step == 0:
        return SchedulerOutput(
            new_requests=[NewRequestData(rid, p, GREEDY, None,
                                         [list(range(1 + i * blocks_each,
                                                     1 + (i + 1) * blocks_each))], 0)
                          for i, (rid, p) in enumerate(zip(ids, prompts))],
            num_scheduled_tokens={rid: len(p) for rid, p in zip(ids, prompts)},
            total_num_scheduled_tokens=sum(map(len, prompts)))
    return SchedulerOutput(
        cached_requests=[CachedRequestData(rid, [], len(p) + step - 1)
                         for rid, p in zip(ids, prompts)],
        num_scheduled_tokens=dict.fromkeys(ids, 1), total_num_scheduled_tokens=len(ids))
