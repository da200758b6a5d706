"""What every executor of workers outside the engine process shares, whatever carries its
frames (the multi-process executor's pipes, the Ray executor's actor calls).

Each call goes to every worker as one msgpack frame (serial.py), and every worker answers
every call in order. The step calls (execute_model, sample_tokens) are not waited for: their
replies are read with the next call that needs an answer (collect_output), so a step can stay
in flight. Every rank samples the same tokens (same logits after the gather, same seeds); the
last pipeline stage's first tensor-parallel rank's are returned.

A worker that dies, or fails a call, ends the engine: the waiting call raises WorkerError
naming the rank and why, never waits forever on the others. A subclass says how a frame
reaches a worker, how its next reply comes back (failing as soon as any worker is found
dead), and how a dead worker is reported.
"""

from __future__ import annotations

import abc
from typing import Any

import torch

from pagoda.errors import (
    ConfigError,
    ModelNotFoundError,
    PagodaError,
    UnsupportedModelError,
)
from pagoda.executor import serial
from pagoda.executor.base import Executor, KVCacheSizing, LoadedModelInfo, WorkerConfig
from pagoda.logger import get_logger
from pagoda.lora.request import LoRAAdapterError, LoRARequest
from pagoda.scheduler.output import ModelRunnerOutput, SchedulerOutput

logger = get_logger(__name__)

DEATH_GRACE_S = 1.0  # after a worker's error, how long to look for a dead rank behind it
# errors a worker raises that keep their type across the channel (one-argument constructors)
KNOWN_ERRORS: dict[str, type[Exception]] = {
    cls.__name__: cls for cls in (ConfigError, UnsupportedModelError, ModelNotFoundError,
                                  LoRAAdapterError)}


class WorkerError(PagodaError, RuntimeError):
    """A worker died or failed: the engine cannot go on."""


class RankHandle:
    """One rank's worker as its executor sees it, and the replies it still owes."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.owed: list[str] = []  # methods sent and not yet answered, oldest first


class WorkerGroupExecutor(Executor):
    """Drives world_size workers in lockstep through call frames and their replies."""

    workers: list[Any]  # RankHandle subclasses, in rank order

    def __init__(self, config: WorkerConfig) -> None:
        parallel = config.engine.parallel
        self.world_size = parallel.world_size
        # the rank whose step outputs are returned: the last stage's first TP rank
        self._output_rank = (parallel.pipeline_parallel_size - 1) * parallel.tensor_parallel_size
        self._info: LoadedModelInfo | None = None
        self._dead: str | None = None

    # ---- what a transport provides ------------------------------------------------------------
    @abc.abstractmethod
    def _send(self, worker: Any, frame: bytes) -> bool:
        """Hand the worker a call frame; False where it cannot be reached."""

    @abc.abstractmethod
    def _receive(self, worker: Any) -> bytes:
        """The worker's next reply frame; fails (_fail_dead) as soon as any worker is found
        dead: a live rank may be blocked in a collective with the dead one."""

    @abc.abstractmethod
    def _fail_dead(self, worker: Any) -> None:
        """Raise for a dead worker, saying which rank it was and how it ended."""

    @abc.abstractmethod
    def _first_dead(self, timeout: float, besides: RankHandle) -> Any | None:
        """A worker other than `besides` found dead, waiting up to `timeout` for one to be."""

    # ---- the Executor interface ---------------------------------------------------------------
    @property
    def loaded_model(self) -> LoadedModelInfo:
        if self._info is None:
            raise RuntimeError("the model is not loaded yet")
        return self._info

    def init_device(self) -> None:
        self._call_all(serial.PlainCall("init_device"))

    def load_model(self) -> LoadedModelInfo:
        self._info = self._call_all(serial.PlainCall("load_model"))[0]
        return self._info

    def determine_kv_cache_size(self) -> KVCacheSizing:
        sizes = self._call_all(serial.PlainCall("determine_kv_cache_size"))
        if len({sizing.windows for sizing in sizes}) > 1:  # one block table per KV group
            raise ConfigError(
                "the pipeline stages would hold different KV cache groups (attention windows "
                f"{sorted({s.windows for s in sizes}, key=str)}); choose another "
                "pipeline_parallel_size")
        return min(sizes, key=lambda sizing: sizing.num_blocks)

    def initialize_kv_cache(self, num_blocks: int) -> int:
        return self._call_all(serial.InitKVCache(num_blocks))[0]

    def capture_decode_graphs(self) -> bool:
        return all(self._call_all(serial.PlainCall("capture_decode_graphs")))

    def execute_model(self, sched_out: SchedulerOutput) -> None:
        self._send_all(serial.ExecuteModel(sched_out))

    def sample_tokens(self, grammar_bitmask: torch.Tensor | None) -> None:
        if grammar_bitmask is None:
            self._send_all(serial.SampleTokens())
            return
        mask = grammar_bitmask.to(torch.int32).contiguous()
        self._send_all(serial.SampleTokens(mask.numpy().tobytes(), *mask.shape))

    def collect_output(self) -> ModelRunnerOutput:
        return self._call_all(serial.PlainCall("collect_output"))[self._output_rank]

    def add_lora(self, request: LoRARequest) -> int:
        return self._call_all(serial.AddLoRA(request))[0]

    def remove_lora(self, lora_id: int) -> None:
        self._call_all(serial.RemoveLoRA(lora_id))

    def sleep(self) -> None:
        self._call_all(serial.PlainCall("sleep"))

    def wake_up(self) -> bool:
        return any(self._call_all(serial.PlainCall("wake_up")))

    def prepare_sleep(self) -> bool:
        return any(self._call_all(serial.PlainCall("prepare_sleep")))

    # ---- calls and replies --------------------------------------------------------------------
    def _send_all(self, call: serial.WorkerCall) -> None:
        """Send the call to every worker; its replies are read by a later _call_all."""
        if self._dead is not None:
            raise WorkerError(self._dead)
        frame, method = serial.encode(call), serial.method_of(call)
        for worker in self.workers:
            if not self._send(worker, frame):
                self._fail_dead(worker)
            worker.owed.append(method)

    def _call_all(self, call: serial.WorkerCall) -> list[Any]:
        """Send the call to every worker and return each rank's value, in rank order (after
        the replies they owed for earlier calls)."""
        self._send_all(call)
        return [self._settle(worker) for worker in self.workers]

    def _settle(self, worker: RankHandle) -> Any:
        """Read every reply the worker owes; the last one's value."""
        value = None
        while worker.owed:
            reply = serial.decode_reply(self._receive(worker))
            method = worker.owed.pop(0)
            if reply.error_type is not None:
                self._raise_worker_error(worker, method, reply)
            value = serial.decode_value(method, reply.value)
        return value

    def _fail(self, message: str) -> None:
        self._dead = message
        logger.error("%s; the engine cannot go on", message)
        raise WorkerError(message)

    def _fail_after_error(self, note: str, error_type: str, message: str) -> None:
        """Raise for a worker that died after reporting an error: pagoda's own errors (a
        checkpoint that does not load) as themselves, else WorkerError saying both."""
        self._dead = f"{note} after {error_type}: {message}"
        logger.error("%s; the engine cannot go on", self._dead)
        known = KNOWN_ERRORS.get(error_type)
        raise known(message) if known is not None else WorkerError(self._dead)

    def _raise_worker_error(self, worker: RankHandle, method: str,
                            reply: serial.WorkerReply) -> None:
        """Raise what a worker reported: pagoda's own errors as themselves; anything else
        as WorkerError, or as the death of a rank behind it (a collective that failed
        because its peer died)."""
        if reply.error_type == "LoRAAdapterError":
            raise LoRAAdapterError(reply.error or "")  # the worker goes on after it
        self._dead = f"worker rank {worker.rank} failed in {method}: {reply.error_type}: " \
                     f"{reply.error}"
        known = KNOWN_ERRORS.get(reply.error_type or "")
        if known is not None:
            raise known(reply.error or "")
        # (the answering rank exits after its error: look past it for the peer behind it)
        dead = self._first_dead(DEATH_GRACE_S, besides=worker)
        if dead is not None:
            self._fail_dead(dead)
        self._fail(self._dead)
