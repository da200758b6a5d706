"""A worker process of the multi-process executor: one rank's Worker, driven by the call
frames that arrive on its pipe, each answered with one reply frame in order.

A call that fails is answered with its error (worker_calls.py); unless the worker survives
it, the process then exits with status 1. The process exits on the `shutdown` call, when the
pipe closes, and when its parent (the engine process) is gone.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from multiprocessing.connection import Connection

from pagoda.executor.base import WorkerConfig
from pagoda.executor.worker import RankSetup, Worker
from pagoda.executor.worker_calls import (
    EXIT_AT_STEP_ENV,
    CallAnswerer,
    configure_rank_logging,
)

__all__ = ["EXIT_AT_STEP_ENV", "WorkerLoop", "worker_main"]


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
    configure_rank_logging(rank.rank)
    _watch_engine(alive)
    import torch
    torch.set_num_threads(threads)
    worker = Worker(WorkerConfig(decode_config(config_frame), max_model_len), rank=rank)
    sys.exit(WorkerLoop(worker, conn).run())


class WorkerLoop:
    """Receives calls, runs them on the worker, sends back one reply per call."""

    def __init__(self, worker: Worker, conn: Connection) -> None:
        self.worker, self.conn = worker, conn
        self.answerer = CallAnswerer(worker, worker.rank_setup.rank)

    def run(self) -> int:
        """The exit status: 0 after shutdown or a closed pipe, 1 after a fatal error."""
        while True:
            try:
                frame = self.conn.recv_bytes()
            except (EOFError, OSError):
                self.worker.shutdown()
                return 0
            answer = self.answerer.answer(frame)
            self.conn.send_bytes(answer.reply)
            if answer.exit_status is not None:
                return answer.exit_status


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
