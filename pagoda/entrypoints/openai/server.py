"""Starting and stopping the HTTP server around an engine-core process."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import uvicorn

from pagoda.config import engine_config, resolve_max_model_len
from pagoda.engine.admission import AdmissionLimits
from pagoda.engine.async_engine import AsyncEngine
from pagoda.engine.client import EngineStartupError, MPClient, start_in_background
from pagoda.entrypoints.metrics import EngineMetrics
from pagoda.entrypoints.openai.app import ServerConfig, ServerState, build_app
from pagoda.entrypoints.openai.output_parsers import check_parser_names
from pagoda.errors import PagodaError
from pagoda.fleet.spec import FleetSpec
from pagoda.logger import get_logger
from pagoda.models.loader.tokenizer import get_tokenizer
from pagoda.models.quantization import resolve_quantization
from pagoda.models.source import resolve_model
from pagoda.process import freeze_startup_objects

logger = get_logger(__name__)


class DrainingServer(uvicorn.Server):
    """SIGTERM/SIGINT: stop admitting, let in-flight requests finish for up to
    shutdown_timeout, abort the rest (finish_reason 'abort'), then exit. A second signal
    exits at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState, shutdown_timeout: float):
        super().__init__(config)
        self.state = state
        self.shutdown_timeout = shutdown_timeout
        self._drain_task: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self._drain_task is not None or sig not in (signal.SIGTERM, signal.SIGINT):
            return super().handle_exit(sig, frame)
        self.state.draining = True
        logger.info("draining %d in-flight requests (up to %.0fs)", self.state.num_in_flight,
                    self.shutdown_timeout)
        self._drain_task = asyncio.get_event_loop().create_task(self._drain())

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.shutdown_timeout
        state = self.state
        while state.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if state.num_in_flight:
            logger.info("aborting %d requests still in flight", state.num_in_flight)
            state.abort_all()
            await asyncio.sleep(0.2)  # let the final chunks reach their clients
        self.should_exit = True

    async def watch_engine(self) -> None:
        """Exit (non-zero, see serve()) once the engine failed to load or died."""
        state = self.state
        if state.manager is not None:  # one model's engine dying does not stop the others
            while not state.manager_started and state.load_error is None:
                await asyncio.sleep(0.1)
            if state.load_error is not None:
                self.should_exit = True
            return
        while state.engine is None and state.load_error is None:
            await asyncio.sleep(0.1)
        if state.engine is not None:
            logger.info("ready: %s", _summary(state))
            while state.engine.dead is None and state.engine.client.is_alive():
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.5)  # in-flight requests receive their errors first
        self.should_exit = True

    @property
    def failed(self) -> bool:
        engine = self.state.engine
        return self.state.load_error is not None or (engine is not None and engine.dead is not None)


@dataclass(slots=True)
class ListenOptions:
    """Where and how the HTTP server runs."""

    host: str = "0.0.0.0"
    port: int = 8000
    shutdown_timeout: float = 30.0
    uvicorn_log_level: str = "warning"
    max_pending: int = 1024  # in-flight requests per engine before 503s
    max_pending_sequences: int | None = None  # None: 4 x max_num_seqs
    max_pending_tokens: int | None = None  # None: 4 x the KV cache's tokens
    max_queue_wait: float = 10.0  # seconds a new request may be expected to wait to start
    engine_stall_timeout: float = 10.0  # silent engine with work -> unhealthy after this
    ollama_port: int | None = None  # also listen here (Ollama's clients default to 11434)

    def engine_options(self) -> dict[str, Any]:
        """AsyncEngine's keyword arguments for admission and stall detection."""
        limits = AdmissionLimits(self.max_pending, self.max_pending_sequences,
                                 self.max_pending_tokens, self.max_queue_wait)
        return {"limits": limits, "stall_timeout": self.engine_stall_timeout}


def serve(model: str, engine_kwargs: dict[str, Any], config: ServerConfig,
          listen: ListenOptions, engine_starting: Future[MPClient] | None = None) -> int:
    """Listen at once (/health answers 503 until the model is loaded), start the engine
    process (or take the one `engine_starting` is already starting), serve until SIGTERM
    or engine death; returns the exit code."""
    check_parser_names(config.tool_call_parser, config.reasoning_parser)
    engine_cfg = engine_config(model, **engine_kwargs)
    engine_starting = engine_starting or start_in_background(engine_cfg)
    source = resolve_model(engine_cfg.model, engine_cfg.load_format)
    try:  # before "listening": a mismatch or a too-long context is one line, now
        resolve_quantization(engine_cfg.quantization, source)
        resolve_max_model_len(source.hf_config, engine_cfg.max_model_len)
    except PagodaError:
        _shutdown(engine_starting)
        raise
    tokenizer = get_tokenizer(source, engine_cfg.tokenizer)
    metrics = EngineMetrics(config.served_model_names[0])
    metrics.max_loras = config.lora.max_loras

    def load_engine() -> AsyncEngine:
        client = engine_starting.result()
        return AsyncEngine(client, tokenizer, observer=metrics, **listen.engine_options())

    state = ServerState(None, config, metrics, load_engine=load_engine)
    if engine_starting.done() and engine_starting.exception() is not None:
        raise engine_starting.exception()  # failed already: no "listening" line before it
    logger.info("listening on http://%s:%d (serving %s as %s)", listen.host, listen.port,
                model, ", ".join(config.served_model_names))
    try:
        return _run_server(state, listen)
    finally:
        _shutdown(engine_starting)


def serve_fleet(fleet: FleetSpec, engine_kwargs: dict[str, Any], config: ServerConfig,
                listen: ListenOptions, *, max_waiting: int = 256, swap_timeout: float = 120.0,
                host_memory_limit: int | None = None) -> int:
    """Serve several models from one endpoint (see pagoda.fleet); returns the exit code.
    `config.served_model_names` is filled from the fleet."""
    from pagoda.fleet.manager import ModelManager
    check_parser_names(config.tool_call_parser, config.reasoning_parser)
    metrics = EngineMetrics(fleet.models[0].name)
    manager = ModelManager(fleet, engine_kwargs, max_pending=listen.max_pending,
                           max_waiting=max_waiting, swap_timeout=swap_timeout, metrics=metrics,
                           host_memory_limit=host_memory_limit,
                           engine_options=listen.engine_options())
    manager.configure()
    config.served_model_names = [name for spec in fleet.models for name in spec.names]
    state = ServerState(None, config, metrics, manager=manager)
    logger.info("listening on http://%s:%d (serving %s)", listen.host, listen.port,
                ", ".join(config.served_model_names))
    return _run_server(state, listen)


def _run_server(state: ServerState, listen: ListenOptions) -> int:
    server = DrainingServer(uvicorn.Config(build_app(state), host=listen.host, port=listen.port,
                                           log_level=listen.uvicorn_log_level, access_log=False,
                                           lifespan="on"), state, listen.shutdown_timeout)
    sockets = _sockets(listen)
    freeze_startup_objects()
    asyncio.run(_run(server, sockets))
    if state.load_error is not None:
        raise _as_pagoda_error(state.load_error)
    return 1 if server.failed else 0


def _as_pagoda_error(exc: BaseException) -> PagodaError:
    """A load failure as one line for the command line (its type named if unexpected)."""
    if isinstance(exc, PagodaError):
        return exc
    return EngineStartupError(f"the model failed to load: {type(exc).__name__}: {exc}")


def _sockets(listen: ListenOptions) -> list[socket.socket] | None:
    """Both listening sockets when the Ollama port is asked for (None: uvicorn binds one)."""
    if listen.ollama_port is None or listen.ollama_port == listen.port:
        return None
    logger.info("Ollama's API also on http://%s:%d", listen.host, listen.ollama_port)
    return [_bind(listen.host, port) for port in (listen.port, listen.ollama_port)]


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        from pagoda.errors import ConfigError
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def _shutdown(engine_starting: Future[MPClient]) -> None:
    try:
        client = engine_starting.result()
    except Exception:  # it never started; its error was reported already
        return
    client.shutdown()


def _summary(state: ServerState) -> str:
    info = state.engine.model_info
    return (f"{info.name}, max_model_len {info.max_model_len}, KV cache "
            f"{info.kv_capacity_tokens} tokens, up {time.time() - state.started:.1f}s")


async def _run(server: DrainingServer, sockets: list[socket.socket] | None = None) -> None:
    watcher = asyncio.get_running_loop().create_task(server.watch_engine())
    try:
        await server.serve(sockets=sockets)
    finally:
        watcher.cancel()
