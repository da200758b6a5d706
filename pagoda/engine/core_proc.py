"""The engine process: load the model, then loop (drain input, step, push outputs) over ZMQ.

Spawned by `MPClient`. Input frames arrive on a PULL socket, output batches leave on a PUSH
socket; both are connected to addresses the client bound. A bad frame or a request the core
refuses is answered with an error for that request and the loop goes on; an exception inside
`step()` is fatal: it is logged with its traceback, announced with an EngineDead frame and
the process exits with status 1. The process also exits when its parent dies.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

import msgspec
import zmq

from pagoda.config import EngineConfig
from pagoda.core_outputs import EngineCoreOutput
from pagoda.engine import serial
from pagoda.engine.core import EngineCore
from pagoda.engine.cpu_threads import configure_cpu_threads
from pagoda.engine.input_processor import InputProcessor
from pagoda.errors import PagodaError
from pagoda.executor.serial import decode_config
from pagoda.logger import configure_logging, get_logger
from pagoda.process import StartupPhases, freeze_startup_objects
from pagoda.request import EngineCoreRequest

logger = get_logger(__name__)

IDLE_POLL_MS = 250  # how long an idle engine blocks on input before checking its parent again
HEARTBEAT_S = 1.0  # the loop sends (at least) a stats batch this often, busy or idle
PARENT_POLL_S = 0.25  # how often the watchdog thread checks the parent (covers model loading)
FLUSH_LINGER_MS = 2000  # how long the last frames may take to leave when the engine exits
FAIL_AT_STEP_ENV = "PAGODA_TEST_FAIL_AT_STEP"  # test hook: step N raises inside the loop
EXIT_AT_STEP_ENV = "PAGODA_TEST_EXIT_AT_STEP"  # test hook: step N hard-exits the process
STARTUP_DELAY_ENV = "PAGODA_TEST_STARTUP_DELAY_S"


class _ParentGone(Exception):
    """The process that started the engine is gone; nobody can read our outputs."""


@dataclass(slots=True)
class _FaultInjector:
    """Env-gated test hook: fail (raise) or hard-exit at a given step number."""

    fail_at: int | None
    exit_at: int | None

    @classmethod
    def from_env(cls) -> _FaultInjector | None:
        fail_at, exit_at = os.environ.get(FAIL_AT_STEP_ENV), os.environ.get(EXIT_AT_STEP_ENV)
        if fail_at is None and exit_at is None:
            return None
        return cls(int(fail_at) if fail_at else None, int(exit_at) if exit_at else None)

    def before_step(self, step: int) -> None:
        if step == self.exit_at:
            os._exit(17)
        if step == self.fail_at:
            raise RuntimeError(f"injected failure at step {step} ({FAIL_AT_STEP_ENV})")


@dataclass(slots=True)
class _Pending:
    """Rejections collected while draining input, sent with the next batch."""

    outputs: list[EngineCoreOutput] = field(default_factory=list)
    errors: list[serial.RequestError] = field(default_factory=list)

    def reject(self, request_id: str | None, exc: BaseException) -> None:
        self.explain(request_id, exc)
        if request_id is not None:
            self.outputs.append(EngineCoreOutput(request_id, [], finish_reason="error"))

    def explain(self, request_id: str | None, exc: BaseException) -> None:
        """Why a request ended in error (its "error" output is sent separately)."""
        message = str(exc) or type(exc).__name__
        logger.warning("rejected request %s: %s", request_id, message)
        self.errors.append(serial.RequestError(request_id, type(exc).__name__, message))


class EngineLoop:
    """Drives one EngineCore from ZMQ input; pushes one batch per step that produced output."""

    def __init__(self, core: EngineCore, input_sock: zmq.Socket, output_sock: zmq.Socket,
                 parent_pid: int) -> None:
        self.core = core
        self.input = input_sock
        self.output = output_sock
        self.parent_pid = parent_pid
        self.checker = InputProcessor(None, core.model_info)
        self.faults = _FaultInjector.from_env()
        self.pending = _Pending()
        self.num_steps = 0
        self.running = True
        self.stats_stale = False  # state changed since the last batch we sent
        self.last_sent = time.monotonic()

    def run(self) -> None:
        """Returns on a Shutdown frame; raises _ParentGone, or whatever step() raised."""
        while self.running:
            if os.getppid() != self.parent_pid:
                raise _ParentGone()
            busy = self.core.has_unfinished_requests()
            self._drain(0 if busy else IDLE_POLL_MS)
            if self.core.has_unfinished_requests():
                self._step()
            elif self.pending.errors or self.stats_stale:
                self._send_batch([])  # idle now: publish final stats (freed blocks, aborts)
            if time.monotonic() - self.last_sent >= HEARTBEAT_S:
                self._send_batch([])  # the heartbeat: the frontend sees the loop turning

    def _drain(self, timeout_ms: int) -> None:
        if not self.input.poll(timeout_ms):
            return
        while self.running:
            try:
                frame = self.input.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle(frame)

    def _handle(self, frame: bytes) -> None:
        try:
            message = serial.decode_input(frame)
        except msgspec.MsgspecError as exc:
            self.pending.reject(serial.request_id_of(frame), exc)
            return
        if isinstance(message, serial.AddRequest):
            self._add(message.request)
        elif isinstance(message, serial.AbortRequests):
            self.core.abort_requests(message.request_ids)
            self.stats_stale = True
        elif isinstance(message, serial.UtilityCall):
            self._call(message)
        else:
            self.running = False

    def _add(self, request: EngineCoreRequest) -> None:
        try:
            self.checker.validate_prompt(request.prompt_token_ids)
            request.sampling_params.check_vocab(self.core.model_info.vocab_size)
            self.core.add_request(request)
        except Exception as exc:  # noqa: BLE001 -- a bad request must not kill the engine
            self.pending.reject(request.request_id, exc)

    def _call(self, call: serial.UtilityCall) -> None:
        if call.method not in serial.UTILITY_METHODS:
            result = serial.make_result(call.call_id, error=f"unknown method {call.method!r}")
        else:
            try:
                value = getattr(self.core, call.method)(*call.args)
                result = serial.make_result(call.call_id, value)
            except Exception as exc:  # noqa: BLE001 -- reported to the caller
                result = serial.make_result(call.call_id, error=f"{type(exc).__name__}: {exc}")
        self.output.send(serial.encode(result))

    def _step(self) -> None:
        if self.faults is not None:
            self.faults.before_step(self.num_steps)
        self.num_steps += 1
        outputs = self.core.step()
        for request_id, exc in self.core.take_rejections():
            self.pending.explain(request_id, exc)
        self.stats_stale = True
        if outputs or self.pending.errors:
            self._send_batch(outputs)

    def _send_batch(self, outputs: list[EngineCoreOutput]) -> None:
        pending, self.pending = self.pending, _Pending()
        self.stats_stale = False
        self.last_sent = time.monotonic()
        batch = serial.EngineCoreOutputs(pending.outputs + outputs, self.core.stats(),
                                         time.monotonic(), pending.errors)
        self.output.send(serial.encode(batch))


def run_engine_core(config: EngineConfig, input_addr: str, output_addr: str,
                    parent_pid: int, startup: StartupPhases | None = None) -> None:
    """The engine process's main: load, send READY (or StartupFailed), loop until told to stop.

    Exits with 0 on Shutdown, 1 when loading or a step fails, 2 when the parent is gone.
    """
    configure_logging()
    configure_cpu_threads()
    _watch_parent(parent_pid, input_addr)
    ctx = zmq.Context()
    input_sock = ctx.socket(zmq.PULL)
    input_sock.setsockopt(zmq.RCVHWM, 0)
    input_sock.connect(input_addr)
    output_sock = ctx.socket(zmq.PUSH)
    output_sock.setsockopt(zmq.SNDHWM, 0)
    output_sock.connect(output_addr)
    try:
        code = _load_and_run(config, input_sock, output_sock, parent_pid, input_addr, startup)
    finally:
        input_sock.close(linger=0)
        output_sock.close(linger=FLUSH_LINGER_MS)
        ctx.term()
    sys.exit(code)


def _load_and_run(config: EngineConfig, input_sock: zmq.Socket, output_sock: zmq.Socket,
                  parent_pid: int, input_addr: str, startup: StartupPhases | None) -> int:
    time.sleep(float(os.environ.get(STARTUP_DELAY_ENV, "0")))  # test hook: a slow model load
    try:
        core = EngineCore(config, startup=startup)
    except Exception as exc:  # noqa: BLE001 -- reported to the client, then we exit
        # the client reports the error in one line; the traceback is for --log-level debug
        if not isinstance(exc, PagodaError):
            logger.debug("engine failed to start: %s", traceback.format_exc())
        output_sock.send(serial.encode(serial.StartupFailed(type(exc).__name__, str(exc))))
        return 1
    output_sock.send(serial.encode(serial.Ready(core.model_info)))
    freeze_startup_objects()
    try:
        EngineLoop(core, input_sock, output_sock, parent_pid).run()
    except _ParentGone:
        logger.warning("the frontend process (pid %d) is gone; engine exiting", parent_pid)
        _remove_socket_dir(input_addr)
        return 2
    except Exception as exc:  # noqa: BLE001 -- fatal: logged, announced, exit 1
        logger.error("engine step failed; the engine is dead:\n%s", traceback.format_exc())
        message = f"engine step failed: {type(exc).__name__}: {exc}"
        output_sock.send(serial.encode(serial.EngineDead(message)), zmq.NOBLOCK)
        return 1
    finally:
        core.shutdown()
    return 0


def _watch_parent(parent_pid: int, input_addr: str) -> None:
    """Exit hard if the parent dies while we are busy (model loading, a long step).

    The engine loop checks the parent between steps too and exits cleanly. Linux's
    PR_SET_PDEATHSIG is not used: it fires when the *thread* that spawned us exits, which
    kills a healthy engine whose client was created from a worker thread.
    """
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        _remove_socket_dir(input_addr)
        os._exit(2)

    threading.Thread(target=watch, name="pagoda-parent-watchdog", daemon=True).start()


def _remove_socket_dir(addr: str) -> None:
    """The dead parent cannot remove its private ipc directory any more: do it for it."""
    if not addr.startswith("ipc://"):
        return
    sock_dir = os.path.dirname(addr[len("ipc://"):])
    if os.path.basename(sock_dir).startswith("pagoda-"):
        shutil.rmtree(sock_dir, ignore_errors=True)


def spawn_main(config_frame: bytes, input_addr: str, output_addr: str, parent_pid: int,
               startup: StartupPhases) -> None:
    """multiprocessing entry point: the config arrives as msgpack, not as a pickled object."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the frontend, which stops us
    run_engine_core(decode_config(config_frame), input_addr, output_addr, parent_pid,
                    startup)
