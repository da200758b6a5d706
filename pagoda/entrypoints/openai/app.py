"""The FastAPI application: routes, error handling, middleware, lifecycle."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.exceptions import HTTPException

import pagoda
from pagoda.engine.async_engine import AsyncEngine
from pagoda.entrypoints.error_shapes import reshape
from pagoda.entrypoints.metrics import EngineMetrics
from pagoda.entrypoints.openai import errors as api_errors
from pagoda.entrypoints.openai.errors import (
    ServerOverloadedError,
    ServerShuttingDownError,
)
from pagoda.entrypoints.openai.middleware import (
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    JsonBodyMiddleware,
    RequestIdMiddleware,
)
from pagoda.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    StopRequest,
    TokenizeRequest,
)
from pagoda.entrypoints.openai.protocol_responses import ResponsesRequest
from pagoda.entrypoints.openai.serving import OpenAIServing
from pagoda.entrypoints.openai.serving_base import ClientDisconnected, current_lease
from pagoda.entrypoints.openai.serving_lora import (
    LoadLoRAAdapterRequest,
    LoRAServerConfig,
    LoRAServing,
    UnloadLoRAAdapterRequest,
    runtime_updating_allowed,
)
from pagoda.entrypoints.openai.serving_responses import ResponsesServing
from pagoda.errors import InvalidRequestError, PagodaError
from pagoda.logger import get_logger

logger = get_logger(__name__)


@dataclass(slots=True)
class ServerConfig:
    """Operator settings of the HTTP server."""

    served_model_names: list[str]
    api_keys: list[str] = field(default_factory=list)
    max_body_bytes: int = 32 << 20
    chat_template: str | None = None
    trust_request_chat_template: bool = False
    log_requests: bool = True
    honor_priority: bool = True
    tool_call_parser: str | None = None  # None or "auto": from the chat template
    reasoning_parser: str | None = None  # None or "auto": from the chat template; "none": off
    lora: LoRAServerConfig = field(default_factory=LoRAServerConfig)


@dataclass(slots=True)
class ServerState:
    """What the routes share: the engine (None while it loads), its metrics, and whether
    we are draining. `load_engine`, if set, builds the engine off the event loop at startup
    so the server answers /health with 503 while the model loads."""

    engine: AsyncEngine | None
    config: ServerConfig
    metrics: EngineMetrics
    load_engine: Callable[[], AsyncEngine] | None = None
    load_error: BaseException | None = None
    started: float = field(default_factory=time.time)
    draining: bool = False
    output_parsers: Any = None  # OutputParsers, resolved on the first chat request
    manager: Any = None  # a fleet.ModelManager when the server hosts several models
    manager_started: bool = False
    loras: LoRAServing | None = None  # the LoRA adapters on top of the model (set by build_app)

    @property
    def ready(self) -> bool:
        """Healthy (vLLM's /health): loaded, not draining, the engine alive and turning."""
        if self.manager is not None:
            return not self.draining and self.manager_started and not self.stalled
        return not self.draining and self.engine is not None and self.engine.is_ready

    @property
    def live(self) -> bool:
        """The process is worth keeping (/live): nothing failed to load, no engine died or
        stalled. Loading and draining are live; a restart would not help them."""
        if self.load_error is not None or self.stalled:
            return False
        if self.manager is not None:
            return True  # a fleet reloads a model whose engine died
        return self.engine is None or (self.engine.dead is None and self.engine.client.is_alive())

    @property
    def accepting(self) -> bool:
        """Ready and with room for one more request now (/ready)."""
        if not self.ready:
            return False
        engines = self._engines()
        return not engines or any(e.has_room for e in engines)

    @property
    def stalled(self) -> bool:
        return any(e.stalled for e in self._engines())

    def _engines(self) -> list[AsyncEngine]:
        if self.manager is not None:
            return [r.engine for m in self.manager.models for r in m.replicas
                    if r.engine is not None]
        return [self.engine] if self.engine is not None else []

    @property
    def num_in_flight(self) -> int:
        if self.manager is not None:
            return self.manager.num_in_flight
        return self.engine.num_in_flight if self.engine is not None else 0

    def abort_all(self) -> None:
        if self.manager is not None:
            self.manager.abort_all()
        elif self.engine is not None:
            self.engine.abort_all()


async def _load(state: ServerState, on_loaded: Callable[[], Any]) -> None:
    try:
        engine = await asyncio.to_thread(state.load_engine)
        engine.start()
        await state.loras.load_static(engine, state.config.served_model_names[0])
    except Exception as exc:  # the server's watcher stops it; serve() reports the error
        state.load_error = exc
        return
    state.engine = engine
    on_loaded()


async def _start_manager(state: ServerState) -> None:
    try:
        await state.manager.start()
    except Exception as exc:  # the server's watcher stops it; serve_fleet() reports it
        state.load_error = exc
        return
    state.manager_started = True


def build_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = None
        if state.manager is not None:
            loader = asyncio.get_running_loop().create_task(_start_manager(state))
        elif state.engine is not None:
            state.engine.start()
            serving.resolve_output_parsers()
        elif state.load_engine is not None:
            loader = asyncio.get_running_loop().create_task(
                _load(state, serving.resolve_output_parsers))
        yield
        if loader is not None:
            loader.cancel()
        if state.manager is not None:
            await state.manager.stop()
        if state.engine is not None:
            await state.engine.stop()

    app = FastAPI(title="pagoda", version=pagoda.__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.server = state
    state.loras = LoRAServing(state, state.config.lora)
    serving = OpenAIServing(state)
    _add_routes(app, state, serving)
    _add_protocols(app, state)
    if state.loras.enabled and runtime_updating_allowed(state.config.lora.allow_runtime_updating):
        _add_lora_routes(app, state)
    _add_error_handlers(app)
    if state.config.api_keys:
        app.add_middleware(ApiKeyMiddleware, api_keys=state.config.api_keys)
    app.add_middleware(JsonBodyMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=state.config.max_body_bytes)
    app.add_middleware(RequestIdMiddleware)
    return app


def _add_routes(app: FastAPI, state: ServerState, serving: OpenAIServing) -> None:
    @app.get("/health")
    async def health() -> Response:
        """vLLM's health check: 200 once loaded while the engine is alive and turning."""
        return Response(status_code=200 if state.ready else 503)

    @app.get("/live")
    async def live() -> Response:
        """Liveness: 503 only when a restart would help (engine dead, stalled, failed)."""
        return Response(status_code=200 if state.live else 503)

    @app.get("/ready")
    async def ready() -> Response:
        """Readiness: healthy and with room to admit a request now."""
        return Response(status_code=200 if state.accepting else 503)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": pagoda.__version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> ModelList:
        if state.manager is not None:
            return ModelList(data=fleet_model_cards(state))
        info = state.engine.model_info if state.engine is not None else None
        return ModelList(data=[_model_card(state, name) for name in state.config.served_model_names]
                         + state.loras.cards(info.max_model_len if info else None))

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> ModelCard:
        if state.manager is not None:
            state.manager.resolve(model_id)
            return next(c for c in fleet_model_cards(state) if c.id == model_id)
        serving.check_model(model_id)
        if state.loras.is_adapter(model_id):
            return next(c for c in state.loras.cards(None) if c.id == model_id)
        return _model_card(state, model_id)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await routed(state, body.model, body.keep_alive_seconds(),
                            lambda: serving.completions(body, request))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return await routed(state, body.model, body.keep_alive_seconds(),
                            lambda: serving.chat_completions(body, request))

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> Any:
        return await routed(state, body.model, None, lambda: serving.tokenize(body))

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> Any:
        return await routed(state, body.model, None, lambda: serving.detokenize(body))

    @app.get("/pagoda/plan")
    async def plan() -> dict[str, Any]:
        """The memory plan of every device (several-model servers)."""
        if state.manager is None:
            raise HTTPException(404, "this server hosts one model: it has no memory plan")
        return {"devices": [p.to_json() for p in state.manager.plans()]}

    @app.get("/pagoda/ps")
    async def ps() -> dict[str, Any]:
        """Each hosted model replica: device, state, bytes held, idle time."""
        return {"models": ps_rows(state)}

    @app.post("/pagoda/stop")
    async def stop(body: StopRequest) -> dict[str, Any]:
        """Unload an idle model now (`pagoda stop`); its next request loads it again."""
        if state.manager is None:
            raise InvalidRequestError("this server hosts one model: stop the server itself "
                                      "(SIGTERM, Ctrl-C) to unload it", "model")
        model = await state.manager.stop_model(body.model)
        return {"model": model.name, "state": str(model.state)}


def _add_protocols(app: FastAPI, state: ServerState) -> None:
    """The other APIs on the same server, each over the chat path of this one."""
    from pagoda.entrypoints.anthropic.routes import add_anthropic_routes
    from pagoda.entrypoints.ollama.routes import add_ollama_routes
    from pagoda.entrypoints.openai.serving_chat import ChatServing
    chat = ChatServing(state)
    add_ollama_routes(app, state, chat)
    add_anthropic_routes(app, state, chat)
    _add_responses_routes(app, state, ResponsesServing(chat))


def _add_responses_routes(app: FastAPI, state: ServerState, serving: ResponsesServing) -> None:
    @app.post("/v1/responses")
    async def create_response(body: ResponsesRequest, request: Request) -> Any:
        return await routed(state, body.model, None, lambda: serving.create(body, request))

    @app.get("/v1/responses/{response_id}")
    async def retrieve_response(response_id: str) -> Any:
        return serving.retrieve(response_id)

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> Any:
        return serving.delete(response_id)


def _add_lora_routes(app: FastAPI, state: ServerState) -> None:
    """Runtime adapter loading (vLLM's routes and answers)."""
    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> Response:
        engine = _ready_engine(state)
        text = await state.loras.load(engine, body, state.config.served_model_names[0])
        return PlainTextResponse(text)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> Response:
        return PlainTextResponse(await state.loras.unload(_ready_engine(state), body))


def _ready_engine(state: ServerState) -> AsyncEngine:
    if state.engine is None:
        raise ServerOverloadedError("The model is still loading; retry shortly.", retry_after=5)
    return state.engine


async def routed(state: ServerState, model: str | None, keep_alive: float | None,
                 handler: Callable[[], Awaitable[Any]]) -> Any:
    """Run an endpoint with its model leased (several-model servers): the model is brought
    in first if needed and stays resident until the response, streamed or not, is done."""
    if state.manager is None:
        return await handler()
    if state.draining:
        raise ServerShuttingDownError()
    lease = await state.manager.acquire(model, keep_alive)
    current_lease.set(lease)
    try:
        response = await handler()
    except BaseException:
        lease.release()
        raise
    if isinstance(response, StreamingResponse):
        response.body_iterator = _release_when_done(lease, response.body_iterator)
    else:
        lease.release()
    return response


async def _release_when_done(lease: Any, body: AsyncIterator[Any]) -> AsyncIterator[Any]:
    current_lease.set(lease)  # the stream may run in another task than the route did
    try:
        async for chunk in body:
            yield chunk
    finally:
        lease.release()


def fleet_model_cards(state: ServerState) -> list[ModelCard]:
    """A card for every served name and alias, with its model's state."""
    cards = []
    for model in state.manager.models:
        info = model.handle.model_info if model.handle is not None else None
        for name in model.spec.names:
            cards.append(ModelCard(id=name, created=int(state.started), owned_by="pagoda",
                                   root=model.spec.lora_modules.get(name, model.spec.model),
                                   parent=None if name == model.name else model.name,
                                   max_model_len=info.max_model_len if info else None,
                                   state=str(model.state)))
    return cards


def ps_rows(state: ServerState) -> list[dict[str, Any]]:
    if state.manager is not None:
        return state.manager.ps()
    engine = state.engine
    if engine is None:
        return []
    info = engine.model_info
    return [{"model": state.config.served_model_names[0], "replica": 0, "device": info.device,
             "state": "loaded", "weight_bytes": info.weight_bytes,
             "kv_cache_bytes": info.kv_cache_bytes,
             "held_bytes": info.weight_bytes + info.kv_cache_bytes + info.activation_bytes,
             "host_bytes": 0,
             "pinned": True, "in_flight": engine.num_in_flight, "idle_seconds": None,
             "expires_in_seconds": None, "load_seconds": None, "wake_seconds": None,
             "requests_routed": None, "engine_pid": getattr(engine.client, "engine_pid", None),
             "cpu_threads": info.cpu_threads,
             "tensor_parallel_size": info.tensor_parallel_size,
             "pipeline_parallel_size": info.pipeline_parallel_size,
             "error": None}]


def _model_card(state: ServerState, name: str) -> ModelCard:
    info = state.engine.model_info if state.engine is not None else None
    return ModelCard(id=name, created=int(state.started), owned_by="pagoda",
                     root=info.name if info else None,
                     max_model_len=info.max_model_len if info else None,
                     state="loaded" if info else "loading")


def _add_error_handlers(app: FastAPI) -> None:
    def error(request: Request, status: int, body: dict[str, Any],
              headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(reshape(request.url.path, status, body), status_code=status,
                            headers=headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error(request, 400, api_errors.pydantic_error_to_body(exc))

    @app.exception_handler(PagodaError)
    async def on_pagoda_error(request: Request, exc: PagodaError) -> JSONResponse:
        status, body, headers = api_errors.exception_to_response(exc)
        return error(request, status, body, headers)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(
            exc.status_code)
        message = str(exc.detail) if exc.status_code < 500 else "Internal server error."
        return error(request, exc.status_code,
                     api_errors.error_body(exc.status_code, message, kind, code=code))

    @app.exception_handler(ClientDisconnected)
    async def on_disconnect(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody is listening; the requests were aborted

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return error(request, 500,
                     api_errors.error_body(500, "Internal server error.", "server_error"))
