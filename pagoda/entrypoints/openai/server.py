"""Starting and stopping the HTTP server around an engine-core process."""

from __future__ import annotations

import asyncio
import signal
import time
from concurrent.futures import Future
from typing import Any

import uvicorn

from pagoda.config import engine_config
from pagoda.engine.async_engine import AsyncEngine
from pagoda.engine.client import MPClient, start_in_background
from pagoda.entrypoints.metrics import EngineMetrics
from pagoda.entrypoints.openai.app import ServerConfig, ServerState, build_app
from pagoda.entrypoints.openai.output_parsers import check_parser_names
from pagoda.fleet.spec import FleetSpec
from pagoda.logger import get_logger
from pagoda.models.source import resolve_model
from pagoda.tokenizer.tokenizer import get_tokenizer

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


def serve(model: str, engine_kwargs: dict[str, Any], *, host: str, port: int,
          served_model_names: list[str], api_keys: list[str], chat_template: str | None,
          trust_request_chat_template: bool, log_requests: bool, shutdown_timeout: float,
          max_pending: int, max_body_bytes: int, uvicorn_log_level: str,
          honor_priority: bool = True, tool_call_parser: str | None = None,
          reasoning_parser: str | None = None,
          engine_starting: Future[MPClient] | None = None) -> int:
    """Listen at once (/health answers 503 until the model is loaded), start the engine
    process (or take the one `engine_starting` is already starting), serve until SIGTERM
    or engine death; returns the exit code."""
    config = engine_config(model, **engine_kwargs)
    engine_starting = engine_starting or start_in_background(config)
    source = resolve_model(config.model, config.load_format)
    tokenizer = get_tokenizer(source, config.tokenizer)
    metrics = EngineMetrics(served_model_names[0])

    def load_engine() -> AsyncEngine:
        client = engine_starting.result()
        return AsyncEngine(client, tokenizer, max_pending=max_pending, observer=metrics)

    check_parser_names(tool_call_parser, reasoning_parser)
    server_config = ServerConfig(served_model_names, api_keys, max_body_bytes, chat_template,
                                 trust_request_chat_template, log_requests, honor_priority,
                                 tool_call_parser, reasoning_parser)
    state = ServerState(None, server_config, metrics, load_engine=load_engine)
    server = DrainingServer(uvicorn.Config(build_app(state), host=host, port=port,
                                           log_level=uvicorn_log_level, access_log=False,
                                           lifespan="on"), state, shutdown_timeout)
    logger.info("listening on http://%s:%d (serving %s as %s)", host, port, model,
                ", ".join(served_model_names))
    try:
        asyncio.run(_run(server))
    finally:
        _shutdown(engine_starting)
    return 1 if server.failed else 0


def serve_fleet(fleet: FleetSpec, engine_kwargs: dict[str, Any], *, host: str, port: int,
                api_keys: list[str], chat_template: str | None,
                trust_request_chat_template: bool, log_requests: bool, shutdown_timeout: float,
                max_pending: int, max_body_bytes: int, uvicorn_log_level: str,
                honor_priority: bool = True, tool_call_parser: str | None = None,
                reasoning_parser: str | None = None, max_waiting: int = 256,
                swap_timeout: float = 120.0, host_memory_limit: int | None = None) -> int:
    """Serve several models from one endpoint (see pagoda.fleet); returns the exit code."""
    from pagoda.fleet.manager import ModelManager
    check_parser_names(tool_call_parser, reasoning_parser)
    metrics = EngineMetrics(fleet.models[0].name)
    manager = ModelManager(fleet, engine_kwargs, max_pending=max_pending, max_waiting=max_waiting,
                           swap_timeout=swap_timeout, metrics=metrics,
                           host_memory_limit=host_memory_limit)
    manager.configure()
    names = [name for spec in fleet.models for name in spec.names]
    server_config = ServerConfig(names, api_keys, max_body_bytes, chat_template,
                                 trust_request_chat_template, log_requests, honor_priority,
                                 tool_call_parser, reasoning_parser)
    state = ServerState(None, server_config, metrics, manager=manager)
    server = DrainingServer(uvicorn.Config(build_app(state), host=host, port=port,
                                           log_level=uvicorn_log_level, access_log=False,
                                           lifespan="on"), state, shutdown_timeout)
    logger.info("listening on http://%s:%d (serving %s)", host, port, ", ".join(names))
    asyncio.run(_run(server))
    return 1 if server.failed else 0


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


async def _run(server: DrainingServer) -> None:
    watcher = asyncio.get_running_loop().create_task(server.watch_engine())
    try:
        await server.serve()
    finally:
        watcher.cancel()
