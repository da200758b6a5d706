"""MultiprocExecutor: one worker process per rank, each with its own shard of the model and
its own KV cache, joined by torch.distributed (gloo on CPU, NCCL on CUDA) for the tensors.

The engine core schedules once; each call goes to every worker as one msgpack frame over its
pipe (the control channel), answered in order (worker_group.py: the calls, the step in
flight, the errors). A worker that dies ends the engine: the waiting call raises WorkerError
naming the rank and how it ended (exit status or its last error).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.util
import os
from multiprocessing.connection import Connection, wait

import msgspec
import torch

from pagoda.executor import serial
from pagoda.executor.base import WorkerConfig
from pagoda.executor.worker_group import RankHandle, WorkerError, WorkerGroupExecutor
from pagoda.executor.worker_proc import worker_main
from pagoda.logger import get_logger
from pagoda.process import affinity_cores, free_port

logger = get_logger(__name__)

__all__ = ["MultiprocExecutor", "WorkerError"]

STOP_TIMEOUT_S = 5.0  # a worker gets this long to exit after shutdown before it is killed


class _WorkerProcess(RankHandle):
    """One rank's process, its end of the pipe, and the replies it still owes."""

    def __init__(self, rank: int, process: multiprocessing.Process, conn: Connection) -> None:
        super().__init__(rank)
        self.process, self.conn = process, conn


class MultiprocExecutor(WorkerGroupExecutor):
    """Starts tensor_parallel_size x pipeline_parallel_size worker processes and drives
    them in lockstep."""

    def __init__(self, config: WorkerConfig) -> None:
        super().__init__(config)
        parallel = config.engine.parallel
        ctx = _worker_context()
        alive_reader, self._alive = ctx.Pipe(duplex=False)  # closes when this process ends
        init_method = f"tcp://127.0.0.1:{free_port()}"
        threads = _threads_per_worker(self.world_size)
        frame = serial.encode_config(config.engine)
        self.workers: list[_WorkerProcess] = []
        try:
            for rank in range(self.world_size):
                ours, theirs = ctx.Pipe(duplex=True)
                process = ctx.Process(
                    target=worker_main, name=f"pagoda-worker-{rank}",
                    args=(frame, config.max_model_len,
                          (rank, self.world_size, init_method, parallel.tensor_parallel_size),
                          theirs, alive_reader, threads, dict(os.environ)))
                process.start()
                theirs.close()
                self.workers.append(_WorkerProcess(rank, process, ours))
            alive_reader.close()
        except BaseException:
            _stop_workers(self.workers, self._alive)
            raise
        finally:
            # at interpreter exit too (multiprocessing would otherwise wait for the workers,
            # which wait for this process to go)
            self._finalizer = multiprocessing.util.Finalize(
                self, _stop_workers, args=(self.workers, self._alive), exitpriority=10)
        logger.info("multi-process executor: %d worker process(es) (pids %s), %d CPU "
                    "thread(s) each", self.world_size,
                    ", ".join(str(w.process.pid) for w in self.workers), threads)

    def shutdown(self) -> None:
        """Ask every worker to stop and give it STOP_TIMEOUT_S to; then end them all. After
        a worker's death the others are ended at once (they may wait in a collective)."""
        if self._dead is None:
            for worker in self.workers:
                self._send(worker, serial.encode(serial.PlainCall("shutdown")))
            for worker in self.workers:
                worker.process.join(STOP_TIMEOUT_S)
        self._dead = self._dead or "the executor was shut down"
        self._finalizer()

    # ---- the control channel ------------------------------------------------------------------
    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self.workers]

    def _receive(self, worker: _WorkerProcess) -> bytes:
        """The worker's next frame; raises WorkerError as soon as any worker is found dead
        (a live rank may be blocked in a collective with the dead one: never wait on it).
        The worker's own pipe comes first: what it holds, or its end, says more than another
        rank that exited after it (that rank's error is about the worker's death)."""
        while True:
            if worker.conn.poll():
                try:
                    return worker.conn.recv_bytes()
                except (EOFError, OSError):
                    self._fail_dead(worker)
            sentinels = {w.process.sentinel: w for w in self.workers}
            ready = wait([worker.conn, *sentinels])
            if worker.conn in ready:
                continue
            self._fail_dead(sentinels[ready[0]])

    def _send(self, worker: _WorkerProcess, frame: bytes) -> bool:
        try:
            worker.conn.send_bytes(frame)
            return True
        except (BrokenPipeError, EOFError, OSError):
            return False

    def _fail_dead(self, worker: _WorkerProcess) -> None:
        """Raise for a dead worker: the error it reported last where that is one of pagoda's
        own (a checkpoint that does not load), else WorkerError saying how it ended."""
        note, last = self._death_note(worker), self._last_error(worker)
        if last is None:
            self._fail(note)
        self._fail_after_error(note, *last)

    def _death_note(self, worker: _WorkerProcess) -> str:
        """Which worker died and how."""
        worker.process.join(1.0)
        code = worker.process.exitcode
        how = "is unreachable" if code is None else (
            f"was killed by signal {-code}" if code < 0 else f"exited with status {code}")
        return f"worker process rank {worker.rank} (pid {worker.process.pid}) {how}"

    def _last_error(self, worker: _WorkerProcess) -> tuple[str, str] | None:
        """The error among the replies a dead worker left unread, if any."""
        error = None
        try:
            while worker.conn.poll():
                reply = serial.decode_reply(worker.conn.recv_bytes())
                if reply.error_type is not None:
                    error = (reply.error_type, reply.error or "")
        except (EOFError, OSError, msgspec.MsgspecError):
            pass
        return error

    def _first_dead(self, timeout: float, besides: _WorkerProcess) -> _WorkerProcess | None:
        """A worker other than `besides` that has exited, waiting up to `timeout` for one
        to."""
        sentinels = {w.process.sentinel: w for w in self.workers if w is not besides}
        ready = wait(list(sentinels), timeout)
        return sentinels[ready[0]] if ready else None


def _stop_workers(workers: list[_WorkerProcess], alive: Connection) -> None:
    """End the worker processes: closing `alive` makes each exit; one not gone within
    STOP_TIMEOUT_S is killed. The pipes are closed and the list emptied."""
    alive.close()  # workers still running exit on their own when this closes
    for worker in workers:
        worker.process.join(STOP_TIMEOUT_S)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        worker.conn.close()
    workers.clear()


def _worker_context() -> multiprocessing.context.BaseContext:
    """Workers fork from a server process that imported torch and pagoda once (forkserver),
    so that N ranks, and every later engine of this process, start without importing them
    again; nothing in that server has touched CUDA or started a thread."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["pagoda.executor.worker_proc"])
    return ctx


def _threads_per_worker(world_size: int) -> int:
    """This process's CPU threads shared among the workers (OMP_NUM_THREADS: each gets it)."""
    given = os.environ.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given)
    budget = min(torch.get_num_threads(), affinity_cores())
    return max(1, budget // world_size)
