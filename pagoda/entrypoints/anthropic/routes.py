"""Anthropic's routes on pagoda's server (errors in Anthropic's shape, made by the app's
handlers for every path under /v1/messages; ``x-api-key`` is accepted like a bearer key)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request

from pagoda.entrypoints.anthropic.protocol import CountTokensRequest, MessagesRequest
from pagoda.entrypoints.anthropic.serving import AnthropicServing
from pagoda.entrypoints.openai.serving_chat import ChatServing

if TYPE_CHECKING:
    from pagoda.entrypoints.openai.app import ServerState


def add_anthropic_routes(app: FastAPI, state: ServerState, chat: ChatServing) -> None:
    """Register /v1/messages and /v1/messages/count_tokens on `app`."""
    from pagoda.entrypoints.openai.app import routed
    serving = AnthropicServing(chat)

    @app.post("/v1/messages")
    async def messages(body: MessagesRequest, request: Request) -> Any:
        return await routed(state, body.model, None, lambda: serving.messages(body, request))

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(body: CountTokensRequest) -> Any:
        return await routed(state, body.model, None, lambda: serving.count_tokens(body))
