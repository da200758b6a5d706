"""MultiprocExecutor: one worker process per rank, each with its own shard of the model and
its own KV cache, joined by torch.distributed (gloo on CPU, NCCL on CUDA) for the tensors.

The engine core schedules once; each call goes to every worker as one msgpack frame over its
pipe (the control channel), and every worker answers every call in order. The step calls
(execute_model, sample_tokens) are not waited for: their replies are read with the next call
that needs an answer (collect_output), so a step can stay in flight. Every rank samples the
same tokens (same logits after the gather, same seeds); rank 0's are returned.

A worker that dies, or fails a call, ends the engine: the waiting call raises WorkerError
naming the rank and why (exit status or its error), never waits forever on the others.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.util
import os
import socket
from multiprocessing.connection import Connection, wait
from typing import Any

import msgspec
import torch

from pagoda.errors import (
    ConfigError,
    ModelNotFoundError,
    PagodaError,
    UnsupportedModelError,
)
from pagoda.executor import serial
from pagoda.executor.base import Executor, KVCacheSizing, LoadedModelInfo, WorkerConfig
from pagoda.executor.worker_proc import worker_main
from pagoda.logger import get_logger
from pagoda.lora.request import LoRAAdapterError, LoRARequest
from pagoda.process import affinity_cores
from pagoda.scheduler.output import ModelRunnerOutput, SchedulerOutput

logger = get_logger(__name__)

STOP_TIMEOUT_S = 5.0
DEATH_GRACE_S = 1.0  # after a worker's error, how long to look for a dead rank behind it  # a worker gets this long to exit after shutdown before it is killed
# errors a worker raises that keep their type across the pipe (one-argument constructors)
_KNOWN_ERRORS: dict[str, type[Exception]] = {
    cls.__name__: cls for cls in (ConfigError, UnsupportedModelError, ModelNotFoundError,
                                  LoRAAdapterError)}


class WorkerError(PagodaError, RuntimeError):
    """A worker process died or failed: the engine cannot go on."""


class _WorkerProcess:
    """One rank's process, its end of the pipe, and the replies it still owes."""

    def __init__(self, rank: int, process: multiprocessing.Process, conn: Connection) -> None:
        self.rank, self.process, self.conn = rank, process, conn
        self.owed: list[str] = []  # methods sent and not yet answered, oldest first


class MultiprocExecutor(Executor):
    """Starts tensor_parallel_size x pipeline_parallel_size worker processes and drives
    them in lockstep."""

    def __init__(self, config: WorkerConfig) -> None:
        parallel = config.engine.parallel
        self.world_size = parallel.world_size
        # the rank whose step outputs are returned: the last stage's first TP rank
        self._output_rank = (parallel.pipeline_parallel_size - 1) * parallel.tensor_parallel_size
        self._info: LoadedModelInfo | None = None
        self._dead: str | None = None
        ctx = _worker_context()
        alive_reader, self._alive = ctx.Pipe(duplex=False)  # closes when this process ends
        init_method = f"tcp://127.0.0.1:{_free_port()}"
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

    def capture_cuda_graphs(self) -> bool:
        return all(self._call_all(serial.PlainCall("capture_cuda_graphs")))

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

    def shutdown(self) -> None:
        """Ask every worker to stop and give it STOP_TIMEOUT_S to; then end them all. After
        a worker's death the others are ended at once (they may wait in a collective)."""
        if self._dead is None:
            for worker in self.workers:
                self._try_send(worker, serial.encode(serial.PlainCall("shutdown")))
            for worker in self.workers:
                worker.process.join(STOP_TIMEOUT_S)
        self._dead = self._dead or "the executor was shut down"
        self._finalizer()

    # ---- the control channel ------------------------------------------------------------------
    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self.workers]

    def _send_all(self, call: serial.WorkerCall) -> None:
        """Send the call to every worker; its replies are read by a later _call_all."""
        if self._dead is not None:
            raise WorkerError(self._dead)
        frame, method = serial.encode(call), serial.method_of(call)
        for worker in self.workers:
            if not self._try_send(worker, frame):
                self._fail_dead(worker)
            worker.owed.append(method)

    def _call_all(self, call: serial.WorkerCall) -> list[Any]:
        """Send the call to every worker and return each rank's value, in rank order (after
        the replies they owed for earlier calls)."""
        self._send_all(call)
        return [self._settle(worker) for worker in self.workers]

    def _settle(self, worker: _WorkerProcess) -> Any:
        """Read every reply the worker owes; the last one's value."""
        value = None
        while worker.owed:
            reply = serial.decode_reply(self._receive(worker))
            method = worker.owed.pop(0)
            if reply.error_type is not None:
                self._raise_worker_error(worker, method, reply)
            value = serial.decode_value(method, reply.value)
        return value

    def _receive(self, worker: _WorkerProcess) -> bytes:
        """The worker's next frame; raises WorkerError as soon as any worker is found dead
        (a live rank may be blocked in a collective with the dead one: never wait on it)."""
        while True:
            if worker.conn.poll():
                try:
                    return worker.conn.recv_bytes()
                except (EOFError, OSError):
                    self._fail_dead(worker)
            sentinels = {w.process.sentinel: w for w in self.workers}
            ready = wait([worker.conn, *sentinels])
            for handle in ready:
                dead = sentinels.get(handle)
                if dead is not None and not (dead is worker and worker.conn.poll()):
                    self._fail_dead(dead)

    def _try_send(self, worker: _WorkerProcess, frame: bytes) -> bool:
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
        error_type, message = last
        self._dead = f"{note} after {error_type}: {message}"
        logger.error("%s; the engine cannot go on", self._dead)
        known = _KNOWN_ERRORS.get(error_type)
        raise known(message) if known is not None else WorkerError(self._dead)

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

    def _fail(self, message: str) -> None:
        self._dead = message
        logger.error("%s; the engine cannot go on", message)
        raise WorkerError(message)

    def _raise_worker_error(self, worker: _WorkerProcess, method: str,
                            reply: serial.WorkerReply) -> None:
        """Raise what a worker reported: pagoda's own errors as themselves; anything else
        as WorkerError, or as the death of a rank behind it (a collective that failed
        because its peer died)."""
        if reply.error_type == "LoRAAdapterError":
            raise LoRAAdapterError(reply.error or "")  # the worker goes on after it
        self._dead = f"worker rank {worker.rank} failed in {method}: {reply.error_type}: " \
                     f"{reply.error}"
        known = _KNOWN_ERRORS.get(reply.error_type or "")
        if known is not None:
            raise known(reply.error or "")
        dead = self._first_dead(DEATH_GRACE_S)
        if dead is not None and dead is not worker:
            self._fail_dead(dead)
        self._fail(self._dead)

    def _first_dead(self, timeout: float) -> _WorkerProcess | None:
        """A worker that has exited, waiting up to `timeout` for one to."""
        sentinels = {w.process.sentinel: w for w in self.workers}
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _threads_per_worker(world_size: int) -> int:
    """This process's CPU threads shared among the workers (OMP_NUM_THREADS: each gets it)."""
    given = os.environ.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given)
    budget = min(torch.get_num_threads(), affinity_cores())
    return max(1, budget // world_size)
