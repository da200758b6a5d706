"""How a worker elsewhere answers the executor's calls: one call frame in, one reply frame
out, whatever carries them (a pipe for the multi-process executor, a Ray actor method).

A call that fails is answered with its error; unless it is one a worker survives (an adapter
that does not fit), the worker must then stop, since its state no longer matches the other
ranks'.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import msgspec

from pagoda.executor import serial
from pagoda.executor.worker import Worker
from pagoda.logger import configure_logging, get_logger

logger = get_logger(__name__)

SURVIVABLE_ERRORS = ("LoRAAdapterError",)  # the worker's state is intact after these
EXIT_AT_STEP_ENV = "PAGODA_TEST_WORKER_EXIT_AT_STEP"  # test hook: "rank:step" hard-exits


def configure_rank_logging(rank: int) -> None:
    """Rank 0 speaks for all: the others log warnings and errors only (unless DEBUG)."""
    configure_logging(None if rank == 0 or os.environ.get("PAGODA_LOG_LEVEL") == "DEBUG"
                      else "WARNING")


@dataclass(frozen=True, slots=True)
class Answer:
    """The reply frame to send, and the exit status the worker should now stop with (None:
    it goes on; 0 after shutdown, 1 after a fatal error)."""

    reply: bytes
    exit_status: int | None = None


class CallAnswerer:
    """Decodes a call frame, runs it on the worker, encodes its value or its error."""

    def __init__(self, worker: Worker, rank: int) -> None:
        self.worker, self.rank = worker, rank
        self.exit_at = _exit_at_step(rank)
        self.steps = 0

    def answer(self, frame: bytes) -> Answer:
        try:
            call = serial.decode_call(frame)
        except msgspec.MsgspecError as exc:
            return Answer(serial.encode_reply(error=exc), 1)
        method = serial.method_of(call)
        try:
            value = self._run(method, call)
        except Exception as exc:  # noqa: BLE001 -- sent to the executor, which raises it
            survivable = type(exc).__name__ in SURVIVABLE_ERRORS
            # one line: the executor reports it (a rank whose peer died fails here too)
            logger.log(logging.WARNING if survivable else logging.ERROR,
                       "worker rank %d: %s failed: %s: %s", self.rank, method,
                       type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            logger.debug("worker rank %d: %s", self.rank, method, exc_info=True)
            return Answer(serial.encode_reply(error=exc), None if survivable else 1)
        return Answer(serial.encode_reply(value), 0 if method == "shutdown" else None)

    def _run(self, method: str, call: serial.WorkerCall) -> Any:
        worker = self.worker
        if isinstance(call, serial.ExecuteModel):
            self._count_step()
            return worker.execute_model(call.sched_out)
        if isinstance(call, serial.SampleTokens):
            return worker.sample_tokens(_bitmask(call))
        if isinstance(call, serial.InitKVCache):
            return worker.initialize_kv_cache(call.num_blocks)
        if isinstance(call, serial.AddLoRA):
            return worker.add_lora(call.request)
        if isinstance(call, serial.RemoveLoRA):
            return worker.remove_lora(call.lora_id)
        value = getattr(worker, method)()
        if method == "collect_output" and not worker.returns_output:
            return None  # every rank holds the same tokens: one rank's are returned
        return value

    def _count_step(self) -> None:
        self.steps += 1
        if self.steps == self.exit_at:
            os._exit(19)


def _bitmask(call: serial.SampleTokens):
    if call.bitmask is None:
        return None
    import torch
    mask = torch.frombuffer(bytearray(call.bitmask), dtype=torch.int32)
    return mask.view(call.rows, call.words)


def _exit_at_step(rank: int) -> int | None:
    """The test hook's step for this rank ("rank:step"), if it names this rank."""
    value = os.environ.get(EXIT_AT_STEP_ENV, "")
    target, _, step = value.partition(":")
    return int(step) if target.strip() == str(rank) and step.strip().isdigit() else None
