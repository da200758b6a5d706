"""Warm-up: a few steps of internal requests before the engine takes real ones.

On a GPU, kernels are compiled or loaded on their first use (Triton compiles each new
specialization; CUDA loads modules lazily). The memory profile runs one large prefill and the
CUDA graphs cover decode-only batches, so the first step that mixed a prefill with running
decodes paid for the rest while serving: 0.67 s for the first step with a prefill beside 62
decoding sequences (8B on an H200), a stall every stream then saw.

The warm-up runs that traffic's shapes instead: one short prefill alone; a full batch of short
prefills beside a decode; one prefill beside a full batch of decodes; decode-only steps. Its
requests sample greedily, at temperature 1, with top-p and top-k and with a seed. It runs on a
scheduler and KV cache manager of its own over the same KV cache, so the engine's queues,
counters and prefix cache never see it (the blocks it wrote are free and overwritten before
they are read again).
"""

from __future__ import annotations

from pagoda.config import SchedulerConfig
from pagoda.executor.base import Executor
from pagoda.kv_cache.hashing import BlockHasher
from pagoda.kv_cache.manager import KVCacheManager
from pagoda.request import EngineCoreRequest, RequestStatus
from pagoda.sampling_params import SamplingParams
from pagoda.scheduler.scheduler import Scheduler

WARMUP_ID_PREFIX = "pagoda-warmup-"
MAX_STEPS = 64  # a bound on the loop (it needs a handful)
SAMPLING = (SamplingParams(temperature=0.0, max_tokens=2),
            SamplingParams(temperature=1.0, max_tokens=2),
            SamplingParams(temperature=0.8, top_p=0.9, top_k=50, max_tokens=2),
            SamplingParams(temperature=1.0, seed=7, max_tokens=2))


def warm_up(executor: Executor, scheduler_config: SchedulerConfig, num_blocks: int,
            block_size: int, windows: tuple[int | None, ...], max_model_len: int,
            vocab_size: int) -> int:
    """Run the warm-up steps on `executor`; returns how many it ran."""
    kv = KVCacheManager(num_blocks, block_size, False, BlockHasher(block_size), windows)
    scheduler = Scheduler(scheduler_config, kv, max_model_len)
    # each request needs a block or two; leave room so none is ever preempted
    batch = max(2, min(scheduler_config.max_num_seqs, (num_blocks - 1) // 2))
    waves = ([7], [3] * (batch - 2), [11])  # each wave's prompt lengths
    added = steps = 0
    for wave in waves:
        for length in wave:
            scheduler.add_request(EngineCoreRequest(
                f"{WARMUP_ID_PREFIX}{added}", _prompt(length, vocab_size, max_model_len),
                SAMPLING[added % len(SAMPLING)]))
            added += 1
        _step(executor, scheduler)
        steps += 1
    while scheduler.has_unfinished_requests() and steps < MAX_STEPS:
        _step(executor, scheduler)
        steps += 1
    scheduler.finish_requests(list(scheduler.requests), RequestStatus.FINISHED_ABORTED)
    _step(executor, scheduler)  # the workers forget the finished requests
    return steps + 1


def _step(executor: Executor, scheduler: Scheduler) -> None:
    sched_out = scheduler.schedule()
    executor.execute_model(sched_out)
    executor.sample_tokens(None)
    scheduler.update_from_output(sched_out, executor.collect_output())


def _prompt(length: int, vocab_size: int, max_model_len: int) -> list[int]:
    """A prompt of ordinary token ids (away from 0 and the top of the vocabulary, where
    special tokens usually sit), short enough to leave room for the two tokens sampled."""
    low, span = min(100, vocab_size // 4), max(1, vocab_size // 2)
    return [low + (i * 7919) % span for i in range(max(1, min(length, max_model_len - 2)))]
