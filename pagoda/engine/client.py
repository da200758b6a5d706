"""Clients of an EngineCore: in this process (tests, offline) or in a child process over ZMQ.

Both implement `EngineCoreClient`; the frontend does not know which one it holds.
`MPClient` is what the server uses: the GPU loop then never competes with HTTP parsing and
tokenization for the GIL, and a crashed engine is a dead child that the frontend observes
(`EngineDeadError` on every pending and later call) rather than a hang.
"""

from __future__ import annotations

import abc
import asyncio
import itertools
import multiprocessing
import multiprocessing.connection
import multiprocessing.util
import os
import shutil
import signal
import tempfile
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
import zmq
import zmq.asyncio

from pagoda.config import EngineConfig
from pagoda.core_outputs import EngineCoreOutput
from pagoda.engine import serial
from pagoda.engine.core_entry import spawn_main
from pagoda.engine.model_info import ModelInfo
from pagoda.engine.serial import EngineCoreOutputs, RequestError
from pagoda.errors import PagodaError
from pagoda.executor.serial import encode_config
from pagoda.logger import get_logger
from pagoda.request import EngineCoreRequest

if TYPE_CHECKING:
    from pagoda.engine.core import EngineCore

__all__ = ["EngineCoreClient", "EngineCoreOutputs", "EngineDeadError", "EngineStartupError",
           "InprocClient", "MPClient", "RequestError"]

logger = get_logger(__name__)

_STARTUP_POLL_MS = 100
_MAX_UNIX_PATH = 100  # sun_path is 108 bytes on Linux, 104 on macOS


class EngineDeadError(PagodaError):
    """The engine is gone (crashed, killed or shut down); no request can make progress."""

    retry_after = 1.0  # its 503 says when to retry (elsewhere: this server is exiting)


def _startup_failure(message) -> str:
    """The engine's load error in one line: pagoda's own errors speak for themselves."""
    from pagoda import errors
    error_class = getattr(errors, message.error_type, None)
    if isinstance(error_class, type) and issubclass(error_class, PagodaError):
        return f"the engine failed to load the model: {message.message}"
    return f"the engine failed to load the model: {message.error_type}: {message.message}"


class EngineStartupError(PagodaError):
    """The engine process failed to load the model or to report READY in time."""

    def __init__(self, message: str, exit_code: int | None = None,
                 error_type: str | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.error_type = error_type  # the exception type the engine raised while loading


class EngineCoreClient(abc.ABC):
    """The frontend's handle on one engine core, wherever it runs."""

    model_info: ModelInfo

    @abc.abstractmethod
    def add_request(self, request: EngineCoreRequest) -> None:
        """Queue a validated request; raises EngineDeadError if the engine is gone."""

    @abc.abstractmethod
    def abort_requests(self, request_ids: list[str]) -> None:
        """End these requests and free their blocks; no output follows for them."""

    @abc.abstractmethod
    async def get_outputs(self) -> EngineCoreOutputs:
        """The next batch of outputs (waits for one); raises EngineDeadError once dead."""

    @abc.abstractmethod
    async def call(self, method: str, *args: Any) -> Any:
        """Run a utility method on the core (see serial.UTILITY_METHODS) and return its value."""

    @abc.abstractmethod
    def is_alive(self) -> bool:
        """False once the engine has died or was shut down."""

    @abc.abstractmethod
    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the engine and release everything it holds; idempotent."""


def _check_method(method: str) -> None:
    if method not in serial.UTILITY_METHODS:
        raise ValueError(f"unknown engine utility method {method!r}; "
                         f"known: {sorted(serial.UTILITY_METHODS)}")


class InprocClient(EngineCoreClient):
    """Runs the EngineCore in the caller's process: get_outputs() steps it on the event loop.

    Meant for tests and offline use: one consumer of get_outputs() at a time. Unlike
    MPClient, a request the core refuses raises from add_request() right away.
    """

    def __init__(self, config: EngineConfig, core: EngineCore | None = None) -> None:
        from pagoda.engine.core import EngineCore
        self.core = core or EngineCore(config)
        self.model_info = self.core.model_info
        self._wakeup: asyncio.Event | None = None
        self._dead: str | None = None

    def add_request(self, request: EngineCoreRequest) -> None:
        self._check_open()
        self.core.add_request(request)
        self._wake()

    def abort_requests(self, request_ids: list[str]) -> None:
        self._check_open()
        self.core.abort_requests(request_ids)

    async def get_outputs(self) -> EngineCoreOutputs:
        while True:
            self._check_open()
            if self.core.has_unfinished_requests():
                outputs = self._step()
                if outputs:
                    return EngineCoreOutputs(outputs, self.core.stats(), time.monotonic())
                await asyncio.sleep(0)  # a prefill chunk with no token yet: let others run
                continue
            self._wakeup = asyncio.Event()
            await self._wakeup.wait()

    async def call(self, method: str, *args: Any) -> Any:
        _check_method(method)
        self._check_open()
        return getattr(self.core, method)(*args)

    def _step(self) -> list[EngineCoreOutput]:
        try:
            return self.core.step()
        except Exception as exc:  # as in the engine process: a failed step is fatal
            self._dead = f"engine step failed: {type(exc).__name__}: {exc}"
            raise EngineDeadError(self._dead) from exc

    def is_alive(self) -> bool:
        return self._dead is None

    def shutdown(self, timeout: float = 5.0) -> None:
        if self._dead is None:
            self._dead = "the engine was shut down"
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def _check_open(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._dead)


@dataclass(slots=True)
class _LoopState:
    """What the client binds to the running event loop: the output reader and a wakeup."""

    loop: asyncio.AbstractEventLoop
    wakeup: asyncio.Event
    reader: asyncio.Task | None = None


class MPClient(EngineCoreClient):
    """Runs the EngineCore in a spawned child process and talks to it over ZMQ.

    Sockets: the client binds, the engine connects. Input is client PUSH -> engine PULL,
    output is engine PUSH -> client PULL (read by an asyncio task through zmq.asyncio). The
    sockets are unix-domain sockets (`ipc://`) inside a fresh `tempfile.mkdtemp` directory,
    which is created with mode 0700: no TCP port is opened and only this user can connect,
    so no other local user can inject requests or read outputs. Where ipc is unavailable
    (Windows) it falls back to loopback TCP, which any local user could reach.

    Use from one event loop at a time (a later loop takes over; pending waits of the
    earlier one are abandoned). A thread watches the child: when it exits, every pending
    and later get_outputs()/call() raises EngineDeadError, and so do add_request()/abort.
    """

    sends_heartbeats = True  # the engine loop sends a batch at least every HEARTBEAT_S

    def __init__(self, config: EngineConfig, startup_timeout: float = 600.0) -> None:
        self._dead: str | None = None  # why the engine is dead; None while it is alive
        self._stopping = threading.Event()  # set before any deliberate stop of the engine
        self._batches: deque[EngineCoreOutputs] = deque()
        self._calls: dict[int, tuple[asyncio.Future, str]] = {}
        self._call_ids = itertools.count()
        self._state: _LoopState | None = None
        self._lock = threading.Lock()
        self._ctx = zmq.Context()
        self._sock_dir = _make_socket_dir()
        self._input = self._ctx.socket(zmq.PUSH)
        self._output = self._ctx.socket(zmq.PULL, socket_class=zmq.asyncio.Socket)
        self._proc = multiprocessing.get_context("spawn").Process(
            target=spawn_main, name="pagoda-engine",
            args=(encode_config(config), *self._bind(), os.getpid(), time.time()))
        # the finalizer holds both sockets: collected with the client, an unclosed one would
        # leave the context's termination waiting for it forever
        self._finalizer = multiprocessing.util.Finalize(
            self, _teardown, exitpriority=10,
            args=(self._proc, self._ctx, (self._input, self._output), self._sock_dir,
                  self._stopping, 5.0))
        try:
            self._proc.start()
            self.model_info = self._wait_ready(startup_timeout)
        except BaseException:
            self.shutdown(timeout=1.0)
            raise
        threading.Thread(target=_watch_engine, args=(self._proc.sentinel, weakref.ref(self)),
                         name="pagoda-engine-watcher", daemon=True).start()

    @property
    def engine_pid(self) -> int | None:
        return self._proc.pid

    def _bind(self) -> tuple[str, str]:
        """Bind both sockets; returns the (input, output) addresses for the engine."""
        try:
            self._input.setsockopt(zmq.SNDHWM, 0)  # admission limits live in the frontend
            self._output.setsockopt(zmq.RCVHWM, 0)
            for sock, name in ((self._input, "input"), (self._output, "output")):
                sock.setsockopt(zmq.LINGER, 0)
                sock.bind(f"ipc://{self._sock_dir}/{name}" if self._sock_dir
                          else "tcp://127.0.0.1:*")
            return (self._input.getsockopt_string(zmq.LAST_ENDPOINT),
                    self._output.getsockopt_string(zmq.LAST_ENDPOINT))
        except BaseException:
            _release(self._ctx, (self._input, self._output), self._sock_dir)
            raise

    # ---- startup ---------------------------------------------------------------------------
    def _wait_ready(self, timeout: float) -> ModelInfo:
        output = zmq.Socket.shadow(self._output.underlying)  # blocking view; does not own it
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if output.poll(_STARTUP_POLL_MS):
                info = self._startup_frame(output.recv())
                if info is not None:
                    return info
            elif not self._proc.is_alive():
                while output.poll(0):  # a StartupFailed sent just before exiting
                    self._startup_frame(output.recv())
                raise EngineStartupError(_exit_hint(self._proc.exitcode), self._proc.exitcode)
        raise EngineStartupError(
            f"the engine did not report ready within {timeout:g} s (a big model may still "
            "be loading: raise the startup timeout); it was stopped")

    def _startup_frame(self, frame: bytes) -> ModelInfo | None:
        try:
            message = serial.decode_output(frame)
        except msgspec.MsgspecError as exc:
            logger.warning("dropped a malformed frame from the engine: %s", exc)
            return None
        if isinstance(message, serial.Ready):
            return message.model_info
        if isinstance(message, serial.StartupFailed):
            self._proc.join(5.0)
            raise EngineStartupError(_startup_failure(message), self._proc.exitcode,
                                     message.error_type)
        logger.warning("unexpected %s frame from the engine during startup",
                       type(message).__name__)
        return None

    # ---- requests ----------------------------------------------------------------------------
    def add_request(self, request: EngineCoreRequest) -> None:
        self._send(serial.AddRequest(request))

    def abort_requests(self, request_ids: list[str]) -> None:
        self._send(serial.AbortRequests(list(request_ids)))

    def _send(self, message: Any) -> None:
        self._raise_if_dead()
        try:
            self._input.send(serial.encode(message), zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # Again: no engine connected any more
            raise EngineDeadError(self._dead or f"the engine is unreachable ({exc})") from None

    def _raise_if_dead(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._dead)

    # ---- outputs -----------------------------------------------------------------------------
    async def get_outputs(self) -> EngineCoreOutputs:
        while True:
            state = self._loop_state()
            state.wakeup.clear()
            self._raise_if_dead()  # after _loop_state(): _mark_dead() then wakes this state
            if self._batches:
                return self._batches.popleft()
            await state.wakeup.wait()

    async def call(self, method: str, *args: Any) -> Any:
        _check_method(method)
        state = self._loop_state()
        self._raise_if_dead()
        call_id = next(self._call_ids)
        future = state.loop.create_future()
        self._calls[call_id] = (future, method)
        try:
            self._send(serial.UtilityCall(call_id, method, list(args)))
            return await future
        finally:
            self._calls.pop(call_id, None)

    def _loop_state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._state
        if state is None or state.loop is not loop:
            state = _LoopState(loop, asyncio.Event())
            self._state = state
        if state.reader is None or state.reader.done():
            state.reader = loop.create_task(self._read_outputs(state))
        return state

    async def _read_outputs(self, state: _LoopState) -> None:
        while self._dead is None:
            try:
                frame = await self._output.recv()
            except zmq.ZMQError as exc:
                self._mark_dead(f"the engine output socket failed: {exc}")
                return
            try:
                self._dispatch(frame)
            except Exception:  # a bug here must not leave get_outputs() waiting forever
                logger.exception("failed to handle a frame from the engine")
            state.wakeup.set()

    def _dispatch(self, frame: bytes) -> None:
        try:
            message = serial.decode_output(frame)
        except msgspec.MsgspecError as exc:
            logger.warning("dropped a malformed frame from the engine: %s", exc)
            return
        if isinstance(message, EngineCoreOutputs):
            self._batches.append(message)
        elif isinstance(message, serial.UtilityResult):
            self._resolve_call(message)
        elif isinstance(message, serial.EngineDead):
            self._mark_dead(message.message)
        else:
            logger.warning("unexpected %s frame from the engine", type(message).__name__)

    def _resolve_call(self, message: serial.UtilityResult) -> None:
        future, method = self._calls.pop(message.call_id, (None, ""))
        if future is None or future.done():
            return
        if message.error is not None:
            future.set_exception(RuntimeError(f"engine {method}() failed: {message.error}"))
            return
        try:
            future.set_result(serial.decode_result(method, message.result))
        except msgspec.MsgspecError as exc:
            future.set_exception(exc)

    # ---- death and shutdown ----------------------------------------------------------------
    def _mark_dead(self, reason: str) -> None:
        """Thread-safe: record why the engine is dead and wake every waiter."""
        with self._lock:
            if self._dead is not None:
                return
            self._dead = reason
            state = self._state
        if reason:
            (logger.debug if self._stopping.is_set() else logger.error)("engine: %s", reason)
        if state is None or state.loop.is_closed():
            return
        try:
            state.loop.call_soon_threadsafe(self._wake_all, state)
        except RuntimeError:  # the loop closed in the meantime: nobody is waiting
            pass

    def _wake_all(self, state: _LoopState) -> None:
        error = EngineDeadError(self._dead or "the engine is dead")
        for future, _ in list(self._calls.values()):
            if not future.done():
                future.set_exception(error)
        self._calls.clear()
        state.wakeup.set()

    def _on_engine_exit(self) -> None:
        if self._stopping.is_set():
            self._mark_dead("the engine was shut down")
        else:
            self._mark_dead(_exit_hint(self._proc.exitcode, after_startup=True))

    def is_alive(self) -> bool:
        return self._dead is None and self._proc.is_alive()

    def shutdown(self, timeout: float = 5.0) -> None:
        if self._finalizer.still_active():
            self._finalizer.cancel()
            _teardown(self._proc, self._ctx, (self._input, self._output), self._sock_dir,
                      self._stopping, timeout)
        self._mark_dead("the engine was shut down")


def _watch_engine(sentinel: int, client_ref: weakref.ref) -> None:
    """Watcher thread: wait for the engine process to exit, then mark its client dead."""
    multiprocessing.connection.wait([sentinel])
    client = client_ref()
    if client is not None:
        if not client._stopping.is_set():  # else shutdown() is joining it
            client._proc.join(1.0)  # reap it so exitcode is known
        client._on_engine_exit()


def _teardown(proc: multiprocessing.process.BaseProcess, ctx: zmq.Context,
              sockets: tuple[zmq.Socket, zmq.Socket], sock_dir: str | None,
              stopping: threading.Event, timeout: float) -> None:
    """Ask the engine to exit, then terminate/kill it; close the sockets; remove the dir.

    Runs from shutdown(), or as a finalizer when the client is collected or at exit.
    """
    stopping.set()
    if proc.pid is not None and proc.exitcode is None:
        try:
            sockets[0].send(serial.encode(serial.Shutdown()), zmq.NOBLOCK)  # the input socket
        except zmq.ZMQError:
            pass
        proc.join(timeout)
        if proc.exitcode is None:
            logger.warning("the engine did not exit within %.1f s; terminating it", timeout)
            proc.terminate()
            proc.join(2.0)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
    _release(ctx, sockets, sock_dir)


def _make_socket_dir() -> str | None:
    """A fresh private directory for the ipc sockets; None where ipc is unavailable.

    mkdtemp creates it with mode 0700, so only this user can reach the sockets inside: no
    port is opened and no other local user can inject requests or read outputs.
    """
    if not zmq.has("ipc"):
        logger.warning("ZMQ ipc is unavailable: using loopback TCP, which any local user "
                       "can reach")
        return None
    parent = None if len(tempfile.gettempdir()) < _MAX_UNIX_PATH - 30 else "/tmp"
    return tempfile.mkdtemp(prefix="pagoda-", dir=parent)


def _release(ctx: zmq.Context, sockets: tuple[zmq.Socket, ...], sock_dir: str | None) -> None:
    """Close the sockets, then end the context (which waits for every socket of its own to
    close: one it no longer tracks, as during a garbage collection, must be closed here)."""
    for sock in sockets:
        sock.close(linger=0)
    ctx.destroy(linger=0)
    if sock_dir is not None:
        shutil.rmtree(sock_dir, ignore_errors=True)


def _exit_hint(exit_code: int | None, after_startup: bool = False) -> str:
    what = "the engine process died" if after_startup else "the engine process died while starting"
    if exit_code is not None and exit_code < 0:
        name = signal.Signals(-exit_code).name if -exit_code in signal.valid_signals() else "?"
        hint = (" (SIGKILL often means the kernel's OOM killer: check host memory and dmesg)"
                if -exit_code == signal.SIGKILL else "")
        return f"{what}: killed by signal {name}{hint}"
    return f"{what} with exit code {exit_code}; its log (stderr) says why"


def start_in_background(config: EngineConfig) -> Future[MPClient]:
    """Spawn the engine process from a worker thread; the caller goes on while it loads."""
    logger.info("starting the engine for %s", config.model)
    return ThreadPoolExecutor(1, thread_name_prefix="pagoda-engine-start").submit(
        MPClient, config)
