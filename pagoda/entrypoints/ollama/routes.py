"""Ollama's routes on pagoda's server (errors in Ollama's ``{"error": ...}`` shape, made by
the app's handlers for every path under /api/)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse

import pagoda
from pagoda.entrypoints.ollama.models import OllamaModels
from pagoda.entrypoints.ollama.protocol import (
    ChatRequest,
    CopyRequest,
    GenerateRequest,
    ModelRequest,
    model_name,
)
from pagoda.entrypoints.ollama.serving import NDJSON, OllamaServing, Timing
from pagoda.entrypoints.openai.serving_chat import ChatServing

if TYPE_CHECKING:
    from pagoda.entrypoints.openai.app import ServerState


def add_ollama_routes(app: FastAPI, state: ServerState, chat: ChatServing) -> None:
    """Register /api/* on `app`."""
    from pagoda.entrypoints.openai.app import routed
    serving = OllamaServing(chat)
    models = OllamaModels(state)

    @app.post("/api/chat")
    async def api_chat(body: ChatRequest, request: Request) -> Any:
        timing = Timing(time.monotonic_ns())
        return await routed(state, model_name(body.model), body.keep_alive_seconds(),
                            lambda: serving.chat_endpoint(body, request, timing))

    @app.post("/api/generate")
    async def api_generate(body: GenerateRequest, request: Request) -> Any:
        timing = Timing(time.monotonic_ns())
        return await routed(state, model_name(body.model), body.keep_alive_seconds(),
                            lambda: serving.generate(body, request, timing))

    @app.get("/api/tags")
    async def api_tags() -> dict[str, Any]:
        return models.tags()

    @app.get("/api/ps")
    async def api_ps() -> dict[str, Any]:
        return models.ps()

    @app.post("/api/show")
    async def api_show(body: ModelRequest) -> dict[str, Any]:
        return models.show(body.target)

    @app.post("/api/pull")
    async def api_pull(body: ModelRequest) -> Any:
        builtin = models.start_pull(body.target)
        lines = models.pull_lines(builtin)
        if body.stream:
            return StreamingResponse(_ndjson(lines), media_type=NDJSON)
        last: dict[str, Any] = {}
        async for last in lines:
            pass
        status = 500 if "error" in last else 200
        return Response(json.dumps(last), status_code=status, media_type="application/json")

    @app.delete("/api/delete")
    async def api_delete(body: ModelRequest) -> Response:
        models.delete(body.target)
        return Response(status_code=200)

    @app.post("/api/copy")
    async def api_copy(body: CopyRequest) -> Response:
        models.copy(body.source, body.destination)
        return Response(status_code=200)

    @app.get("/api/version")
    async def api_version() -> dict[str, str]:
        return {"version": pagoda.__version__}


async def _ndjson(items: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    async for item in items:
        yield json.dumps(item) + "\n"

