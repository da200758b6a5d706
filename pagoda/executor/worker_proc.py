"""A worker process of the multi-process executor: one rank's Worker, driven by the call
frames that arrive on its pipe, each answered with one reply frame in order.

A call that fails is answered with its error; unless it is one a worker survives (an adapter
that does not fit), the process then exits with status 1, since its state no longer matches
the other ranks'. The process exits on the `shutdown` call, when the pipe closes, and when its
parent (the engine process) is gone.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

import msgspec

from pagoda.executor import serial
from pagoda.executor.base import WorkerConfig
from pagoda.executor.worker import RankSetup, Worker
from pagoda.logger import configure_logging, get_logger

logger = get_logger(__name__)

SURVIVABLE_ERRORS = ("LoRAAdapterError",)  # the worker's state is intact after these
EXIT_AT_STEP_ENV = "PAGODA_TEST_WORKER_EXIT_AT_STEP"  # test hook: "rank:step" hard-exits


def worker_main(config_frame: bytes, max_model_len: int, setup: tuple[int, int, str, int],
                conn: Connection, alive: Connection, threads: int,
                environ: dict[str, str]) -> None:
    """multiprocessing entry point: the config arrives as msgpack; `alive` reaches its end
    when the engine process is gone; `environ` is the engine's environment now (the fork
    server's is the one it had when the server started)."""
    from pagoda.executor.serial import decode_config
    os.environ.clear()
    os.environ.update(environ)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the frontend, which stops us
    rank = RankSetup(*setup)
    configure_logging(None if rank.rank == 0 or os.environ.get("PAGODA_LOG_LEVEL") == "DEBUG"
                      else "WARNING")  # rank 0 speaks for all
    _watch_engine(alive)
    import torch
    torch.set_num_threads(threads)
    worker = Worker(WorkerConfig(decode_config(config_frame), max_model_len), rank=rank)
    sys.exit(WorkerLoop(worker, conn).run())


class WorkerLoop:
    """Receives calls, runs them on the worker, sends back one reply per call."""

    def __init__(self, worker: Worker, conn: Connection) -> None:
        self.worker, self.conn = worker, conn
        self.exit_at = _exit_at_step(worker.rank_setup.rank)
        self.steps = 0

    def run(self) -> int:
        """The exit status: 0 after shutdown or a closed pipe, 1 after a fatal error."""
        while True:
            try:
                frame = self.conn.recv_bytes()
            except (EOFError, OSError):
                self.worker.shutdown()
                return 0
            try:
                call = serial.decode_call(frame)
            except msgspec.MsgspecError as exc:
                self.conn.send_bytes(serial.encode_reply(error=exc))
                return 1
            method = serial.method_of(call)
            try:
                value = self._run(method, call)
            except Exception as exc:  # noqa: BLE001 -- sent to the executor, which raises it
                # one line: the executor reports it (a rank whose peer died fails here too)
                survivable = type(exc).__name__ in SURVIVABLE_ERRORS
                logger.log(logging.WARNING if survivable else logging.ERROR,
                           "worker rank %d: %s failed: %s: %s", self.worker.group.rank, method,
                           type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                logger.debug("worker rank %d: %s", self.worker.group.rank, method,
                             exc_info=True)
                self.conn.send_bytes(serial.encode_reply(error=exc))
                if survivable:
                    continue
                return 1
            self.conn.send_bytes(serial.encode_reply(value))
            if method == "shutdown":
                return 0

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


def _watch_engine(alive: Connection) -> None:
    """Exit hard when the engine process is gone (its end of `alive` closes), even in the
    middle of a long call or a collective that will never complete. (The worker's parent
    is the fork server, not the engine: its pid says nothing.)"""
    def watch() -> None:
        try:
            while True:
                alive.recv_bytes()
        except (EOFError, OSError):
            os._exit(2)

    threading.Thread(target=watch, name="pagoda-worker-parent-watchdog", daemon=True).start()
