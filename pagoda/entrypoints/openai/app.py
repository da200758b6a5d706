"""The FastAPI application: routes, error handling, middleware, lifecycle."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

import pagoda
from pagoda.engine.async_engine import AsyncEngine
from pagoda.entrypoints.metrics import EngineMetrics
from pagoda.entrypoints.openai import errors as api_errors
from pagoda.entrypoints.openai.middleware import (
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    RequestIdMiddleware,
)
from pagoda.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from pagoda.entrypoints.openai.serving import OpenAIServing
from pagoda.entrypoints.openai.serving_base import ClientDisconnected
from pagoda.errors import PagodaError
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

    @property
    def ready(self) -> bool:
        return not self.draining and self.engine is not None and self.engine.is_ready


async def _load(state: ServerState) -> None:
    try:
        engine = await asyncio.to_thread(state.load_engine)
    except Exception as exc:  # reported by the server's watcher, which then exits non-zero
        logger.error("the engine failed to start: %s", exc)
        state.load_error = exc
        return
    engine.start()
    state.engine = engine


def build_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = None
        if state.engine is not None:
            state.engine.start()
        elif state.load_engine is not None:
            loader = asyncio.get_running_loop().create_task(_load(state))
        yield
        if loader is not None:
            loader.cancel()
        if state.engine is not None:
            await state.engine.stop()

    app = FastAPI(title="pagoda", version=pagoda.__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.server = state
    serving = OpenAIServing(state)
    _add_routes(app, state, serving)
    _add_error_handlers(app)
    if state.config.api_keys:
        app.add_middleware(ApiKeyMiddleware, api_keys=state.config.api_keys)
    app.add_middleware(BodyLimitMiddleware, max_bytes=state.config.max_body_bytes)
    app.add_middleware(RequestIdMiddleware)
    return app


def _add_routes(app: FastAPI, state: ServerState, serving: OpenAIServing) -> None:
    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if state.ready else 503)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": pagoda.__version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[_model_card(state, name) for name in state.config.served_model_names])

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> ModelCard:
        serving.check_model(model_id)
        return _model_card(state, model_id)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await serving.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return await serving.chat_completions(body, request)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> Any:
        return await serving.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> Any:
        return await serving.detokenize(body)


def _model_card(state: ServerState, name: str) -> ModelCard:
    info = state.engine.model_info if state.engine is not None else None
    return ModelCard(id=name, created=int(state.started), owned_by="pagoda",
                     root=info.name if info else None,
                     max_model_len=info.max_model_len if info else None)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(api_errors.pydantic_error_to_body(exc), status_code=400)

    @app.exception_handler(PagodaError)
    async def on_pagoda_error(request: Request, exc: PagodaError) -> JSONResponse:
        status, body, headers = api_errors.exception_to_response(exc)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(
            exc.status_code)
        message = str(exc.detail) if exc.status_code < 500 else "Internal server error."
        return JSONResponse(api_errors.error_body(exc.status_code, message, kind, code=code),
                            status_code=exc.status_code)

    @app.exception_handler(ClientDisconnected)
    async def on_disconnect(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody is listening; the requests were aborted

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONResponse(api_errors.error_body(500, "Internal server error.", "server_error"),
                            status_code=500)
