"""EngineCore: synchronous, I/O-free step loop (schedule -> run -> update)."""

from __future__ import annotations

import concurrent.futures
import time
from collections import deque
from concurrent.futures import Future
from typing import Any

import torch

from pagoda.config import EngineConfig, resolve_max_model_len
from pagoda.core_outputs import EngineCoreOutput, SchedulerStats
from pagoda.engine.model_info import ModelInfo, validate_prompt_ids
from pagoda.engine.warmup import warm_up
from pagoda.errors import InvalidRequestError
from pagoda.executor.base import KVCacheSizing, WorkerConfig
from pagoda.executor.factory import executor_for
from pagoda.kv_cache.hashing import BlockHasher
from pagoda.kv_cache.manager import KVCacheManager
from pagoda.logger import get_logger
from pagoda.lora.registry import LoRARegistry
from pagoda.models.estimate import (
    check_expert_parallel,
    check_pipeline_parallel,
    check_tensor_parallel,
)
from pagoda.models.loader.tokenizer import get_tokenizer
from pagoda.models.source import ModelSource, resolve_model
from pagoda.process import StartupPhases
from pagoda.request import EngineCoreRequest, RequestStatus
from pagoda.scheduler.output import SchedulerOutput
from pagoda.scheduler.scheduler import Scheduler
from pagoda.structured_output.bitmask import BitmaskFiller
from pagoda.structured_output.grammar import GrammarCompiler, GrammarMatcherState

logger = get_logger(__name__)


def eos_ids(hf_config: Any) -> list[int]:
    eos = getattr(hf_config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


class EngineCore:
    """Starts the executor, sizes the KV cache, and runs scheduler + executor one step at a
    time."""

    def __init__(self, config: EngineConfig, source: ModelSource | None = None,
                 startup: StartupPhases | None = None) -> None:
        """`startup` has the phases before this one (the engine process's start and
        imports); the log line at the end times them all."""
        startup = startup or StartupPhases()
        self.config = config
        self.source = source or resolve_model(config.model, config.load_format)
        startup.mark("model config")
        hf = self.source.hf_config
        self.max_model_len = resolve_max_model_len(hf, config.max_model_len)
        check_tensor_parallel(hf, config.parallel.tensor_parallel_size)
        check_pipeline_parallel(hf, config.parallel.pipeline_parallel_size)
        if config.parallel.enable_expert_parallel:
            check_expert_parallel(hf, config.parallel.tensor_parallel_size)
        self.executor = executor_for(WorkerConfig(config, self.max_model_len), self.source)
        try:
            sizing, kv_bytes = self._start_executor(startup)
        except BaseException:
            self.executor.shutdown()  # worker processes end with the failed start
            raise
        loaded = self.executor.loaded_model
        self.device, self.dtype = torch.device(loaded.device), getattr(torch, loaded.dtype)
        block_size = config.cache.block_size
        hasher = BlockHasher(block_size, model_id=self.source.name)
        self.kv_manager = KVCacheManager(sizing.num_blocks, block_size,
                                         config.cache.enable_prefix_caching, hasher,
                                         sizing.windows)
        # a pipeline keeps one step in flight per stage, each with requests of its own
        self.pipeline_depth = config.parallel.pipeline_parallel_size
        self.scheduler = Scheduler(config.scheduler, self.kv_manager, self.max_model_len,
                                   config.lora.max_loras if config.lora else 0,
                                   pipeline_depth=self.pipeline_depth)
        self.loras = LoRARegistry(config.lora is not None)
        eos = eos_ids(hf)
        capacity = self.kv_manager.capacity_tokens(self.max_model_len,
                                                   config.scheduler.max_num_batched_tokens)
        self.model_info = ModelInfo(self.source.name, self.max_model_len, hf.vocab_size,
                                    eos[0] if eos else None, eos[1:], sizing.num_blocks,
                                    block_size, capacity, loaded.device,
                                    loaded.weight_bytes, kv_bytes, sizing.activation_bytes,
                                    config.scheduler.max_num_seqs, torch.get_num_threads(),
                                    config.parallel.tensor_parallel_size,
                                    config.parallel.pipeline_parallel_size,
                                    loaded.kv_cache_dtype, loaded.expert_weight_bytes)
        if self.device.type == "cuda":  # kernels compiled or loaded on first use: not mid-traffic
            self.warm_up()
            startup.mark("warm-up")
        self.grammars = GrammarCompiler(
            lambda: get_tokenizer(self.source, config.tokenizer), hf.vocab_size)
        self.bitmask_filler = BitmaskFiller(hf.vocab_size)
        self._compiling: dict[str, Future] = {}  # request id -> its grammar being compiled
        self._constrained: set[str] = set()  # ids of live requests with a grammar
        self._rejected: list[tuple[str, Exception]] = []
        self.async_scheduling = config.scheduler.async_scheduling
        if self.async_scheduling is None:
            self.async_scheduling = self.device.type == "cuda"
        self._token_dependent: set[str] = set()  # live requests that rule out overlap
        self._in_flight: deque[SchedulerOutput] = deque()  # executed, outputs not collected
        self._asleep = False
        self._log_capacity()
        logger.info("engine started in %s", startup.summary())

    def warm_up(self) -> int:
        """Run the warm-up steps (pagoda.engine.warmup) on this engine's executor, beside
        its own scheduler; returns how many ran. At start on CUDA."""
        return warm_up(self.executor, self.config.scheduler, self.model_info.num_kv_blocks,
                       self.kv_manager.block_size, self.kv_manager.windows,
                       self.max_model_len, self.model_info.vocab_size)

    def _start_executor(self, startup: StartupPhases) -> tuple[KVCacheSizing, int]:
        """Bring the executor up, timing each phase; returns the KV cache's sizing and bytes."""
        self.executor.init_device()
        startup.mark("device init")
        self.executor.load_model()
        startup.mark("weights")
        sizing = self.executor.determine_kv_cache_size()
        startup.mark("memory profile")
        kv_bytes = self.executor.initialize_kv_cache(sizing.num_blocks)
        startup.mark("KV cache")
        if self.executor.capture_decode_graphs():
            on_cpu = self.executor.loaded_model.device == "cpu"
            startup.mark("CPU plans" if on_cpu else "CUDA graphs")
        return sizing, kv_bytes

    def _log_capacity(self) -> None:
        cap = self.model_info.kv_capacity_tokens
        parallel = self.config.parallel
        per_rank = "" if parallel.world_size == 1 else (
            f" on each of {parallel.world_size} ranks (tensor parallel "
            f"{parallel.tensor_parallel_size} x pipeline parallel "
            f"{parallel.pipeline_parallel_size})")
        logger.info("KV cache: %d blocks of %d tokens, %d KV group(s) (%.2f GiB%s) = %d tokens "
                    "of context; max concurrency at max_model_len=%d: %.1fx",
                    self.model_info.num_kv_blocks - 1, self.model_info.block_size,
                    len(self.kv_manager.groups), self.model_info.kv_cache_bytes / 2**30,
                    per_rank, cap, self.max_model_len, cap / self.max_model_len)

    def add_request(self, request: EngineCoreRequest) -> None:
        """Queue a request; raises InvalidRequestError (and changes nothing) if it is bad."""
        if self._asleep:  # the frontend wakes us first; never run on missing weights
            logger.warning("a request arrived while asleep: waking up")
            self.wake_up()
        validate_prompt_ids(request.prompt_token_ids, self.model_info)
        request.sampling_params.check_vocab(self.model_info.vocab_size)
        if request.request_id in self.scheduler.requests:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use",
                                      "request_id")
        lora_id = self.loras.id_of(request.lora_name)
        self.scheduler.add_request(request, lora_id)
        if request.sampling_params.sampling_reads_output:
            self._token_dependent.add(request.request_id)
        constraint = request.sampling_params.structured_outputs
        if constraint is not None:
            self.scheduler.requests[request.request_id].waiting_for_grammar = True
            self._compiling[request.request_id] = self.grammars.submit(constraint)
            self._constrained.add(request.request_id)

    def abort_requests(self, request_ids: list[str]) -> None:
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self._in_flight)

    def step(self) -> list[EngineCoreOutput]:
        """Schedule and launch one step; returns the outputs of the steps that finished.
        With async scheduling the step launched is left running and the previous one's
        outputs are returned, so the host's work overlaps the device's; a pipeline of M
        stages leaves up to M - 1 steps running, of other requests, as the stages work."""
        outputs = []
        if self._steps_left_running() == 0:
            outputs += self._finish_in_flight()  # the next step needs its tokens on the host
        if not self.scheduler.has_unfinished_requests():
            return outputs + self._finish_in_flight()
        outputs += self._collect_grammars()
        sched_out = self.scheduler.schedule()
        if sched_out.is_empty and self._compiling:
            concurrent.futures.wait(self._compiling.values(), timeout=0.005,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        if self._in_flight and _carries_nothing(sched_out):
            return outputs + self._finish_in_flight(len(self._in_flight) - 1)
        self._execute(sched_out)
        self._in_flight.append(sched_out)
        outputs += self._finish_in_flight(self._steps_left_running())
        self._retire_loras()
        return outputs

    def _execute(self, sched_out: SchedulerOutput) -> None:
        """Queue the step on the executor: the forward pass first, then the sampling, with
        the grammar bitmask filled on the host meanwhile (while the device runs)."""
        grammar_states = self._plan_grammar_rows(sched_out)
        self.executor.execute_model(sched_out)
        bitmask = self.bitmask_filler.fill(grammar_states) if grammar_states else None
        self.executor.sample_tokens(bitmask)

    def _steps_left_running(self) -> int:
        """How many launched steps a step may leave running when it returns."""
        if self.pipeline_depth > 1:
            return self.pipeline_depth - 1
        return 1 if self._can_overlap() else 0

    def _can_overlap(self) -> bool:
        """Whether the next step may be scheduled before this one's tokens are back: not
        when a live request's sampling depends on its latest token (a grammar, penalties,
        min_tokens)."""
        if not self.async_scheduling or self._constrained:
            return False
        self._token_dependent &= self.scheduler.requests.keys()
        return not self._token_dependent

    def _finish_in_flight(self, leave: int = 0) -> list[EngineCoreOutput]:
        """Collect the oldest launched steps until `leave` are left running."""
        outputs = []
        while len(self._in_flight) > leave:
            sched_out = self._in_flight.popleft()
            runner_out = self.executor.collect_output()
            outputs += self.scheduler.update_from_output(sched_out, runner_out)
        return outputs

    def _collect_grammars(self) -> list[EngineCoreOutput]:
        """Give each request whose grammar finished compiling its matcher; a request whose
        grammar failed ends with finish_reason "error" (and is listed by take_rejections)."""
        failed = []
        for request_id, future in list(self._compiling.items()):
            if not future.done():
                continue
            del self._compiling[request_id]
            request = self.scheduler.requests.get(request_id)
            if request is None:
                continue  # aborted while compiling
            if future.exception() is not None:
                self.scheduler.finish_requests([request_id], RequestStatus.FINISHED_ABORTED)
                self._rejected.append((request_id, future.exception()))
                failed.append(EngineCoreOutput(request_id, [], finish_reason="error"))
                continue
            request.grammar = GrammarMatcherState(future.result())
            request.waiting_for_grammar = False
        return failed

    def _plan_grammar_rows(self, sched_out: SchedulerOutput) -> list[GrammarMatcherState]:
        """Which constrained requests sample this step: their rows of the grammar bitmask go
        into sched_out.grammar_rows; returns their matchers in row order."""
        if not self._constrained:
            return []  # no per-request work on steps without constrained requests
        self._constrained &= self.scheduler.requests.keys()
        rows, states = {}, []
        for request_id in self._constrained.intersection(sched_out.num_scheduled_tokens):
            request = self.scheduler.requests[request_id]
            if request.grammar is not None and request.num_computed_tokens == request.num_tokens:
                rows[request_id] = len(rows)
                states.append(request.grammar)
        sched_out.grammar_rows = rows
        return states

    def take_rejections(self) -> list[tuple[str, Exception]]:
        """Requests the engine ended on its own since the last call, and why."""
        rejected, self._rejected = self._rejected, []
        return rejected

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    def add_lora(self, name: str, path: str) -> int:
        """Load a LoRA adapter under `name` (checked against the model now; a
        LoRAAdapterError says why it does not fit); returns its engine id."""
        request = self.loras.reserve(name, path)
        self.executor.add_lora(request)
        self.loras.add(request)
        return request.lora_id

    def remove_lora(self, name: str) -> bool:
        """Stop taking requests for the adapter; the ones running with it finish. Returns
        whether it was loaded."""
        if self.loras.remove(name) is None:
            return False
        self._retire_loras()
        return True

    def _retire_loras(self) -> None:
        """Tell the workers about unloaded adapters no request waits for or runs with."""
        if not self.loras.retiring:
            return
        done = self.loras.retiring - self.scheduler.live_lora_ids()
        for lora_id in done:
            self.executor.remove_lora(lora_id)
        self.loras.retiring -= done

    def list_loras(self) -> list[str]:
        return self.loras.names()

    def reset_prefix_cache(self) -> bool:
        return self.kv_manager.reset_prefix_cache()

    def sleep(self) -> float:
        """Free the KV cache and move the weights to host memory; returns the seconds it
        took. Refused while requests are in flight (abort them first)."""
        if self.scheduler.has_unfinished_requests():
            raise RuntimeError("cannot sleep with requests in flight")
        self._finish_in_flight()  # only ended requests' tokens: nobody waits for them
        start = time.perf_counter()
        self.kv_manager.reset_prefix_cache()  # the cached blocks' contents are about to go
        self.executor.sleep()
        self._asleep = True
        seconds = time.perf_counter() - start
        logger.info("asleep: freed %.2f GiB of weights and KV cache in %.2fs",
                    (self.model_info.weight_bytes * (self.device.type == "cuda")
                     + self.model_info.kv_cache_bytes) / 2**30, seconds)
        return seconds

    def prepare_sleep(self) -> bool:
        """Make the weights' host copy now (seconds for an 8B: best while idle), so that the
        first sleep is as quick as the later ones; returns whether there was anything to
        copy (GPU only)."""
        return self.executor.prepare_sleep()

    def wake_up(self) -> float:
        """Undo sleep(); returns the seconds it took."""
        start = time.perf_counter()
        recaptured = self.executor.wake_up()
        self._asleep = False
        seconds = time.perf_counter() - start
        logger.info("awake in %.2fs%s", seconds,
                    " (CUDA graphs re-captured: their addresses moved)" if recaptured else "")
        return seconds

    def is_sleeping(self) -> bool:
        return self._asleep

    def shutdown(self) -> None:
        """Stop the executor (and its workers); the core is unusable afterwards."""
        self._in_flight.clear()
        self.executor.shutdown()


def _carries_nothing(sched_out: SchedulerOutput) -> bool:
    """No tokens to compute and no request for the workers to forget: not worth a launch
    (every runnable request is in a step still running)."""
    return sched_out.is_empty and not sched_out.finished_request_ids \
        and not sched_out.preempted_request_ids
