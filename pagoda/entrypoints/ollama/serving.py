"""/api/chat and /api/generate: Ollama's bodies in, the shared chat path, Ollama's NDJSON
lines (or one JSON object with ``stream: false``) out, with the timing fields clients read."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from pagoda.entrypoints.error_shapes import ollama_error
from pagoda.entrypoints.ollama.protocol import (
    OPTION_NAMES,
    ChatRequest,
    GenerateRequest,
    Options,
)
from pagoda.entrypoints.openai.chat_output import ChoiceMessage
from pagoda.entrypoints.openai.errors import exception_to_response
from pagoda.entrypoints.openai.internal_request import client_field_names
from pagoda.entrypoints.openai.protocol import ChatCompletionRequest
from pagoda.entrypoints.openai.serving_base import new_request_id, until_disconnect
from pagoda.entrypoints.openai.serving_chat import (
    ChatServing,
    PreparedChat,
    message_deltas,
)
from pagoda.errors import ContextLengthExceededError
from pagoda.outputs import RequestOutput

NDJSON = "application/x-ndjson"


def created_at() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


@dataclass(slots=True)
class Timing:
    """Nanosecond clocks of one request: received, engine handed it, first and last output."""

    received: int
    started: int = 0
    first: int = 0
    last: int = 0

    def mark(self) -> None:
        now = time.monotonic_ns()
        self.first = self.first or now
        self.last = now

    def fields(self, prompt_tokens: int, output_tokens: int) -> dict[str, int]:
        end = self.last or time.monotonic_ns()
        first = self.first or end
        return {"total_duration": end - self.received,
                "load_duration": self.started - self.received,
                "prompt_eval_count": prompt_tokens, "prompt_eval_duration": first - self.started,
                "eval_count": output_tokens, "eval_duration": end - first}


@dataclass(slots=True)
class _Reply:
    """What one request has produced so far."""

    message: ChoiceMessage = field(default_factory=ChoiceMessage)
    final: RequestOutput | None = None


class OllamaServing:
    """Ollama's generation endpoints over the chat path of the OpenAI server."""

    def __init__(self, chat: ChatServing) -> None:
        self.chat = chat

    async def chat_endpoint(self, body: ChatRequest, request: Request, timing: Timing) -> Any:
        internal = body.to_chat() if body.messages else None
        return await self._run(body, internal, None, request, timing, _ChatLines())

    async def generate(self, body: GenerateRequest, request: Request, timing: Timing) -> Any:
        internal = body.to_chat() if body.prompt else None
        raw = body.prompt if body.raw else None
        return await self._run(body, internal, raw, request, timing, _GenerateLines())

    async def _run(self, body: ChatRequest | GenerateRequest,
                   internal: ChatCompletionRequest | None, raw: str | None, request: Request,
                   timing: Timing, lines: _Lines) -> Any:
        timing.started = time.monotonic_ns()
        name = self.chat.model_name
        if internal is None:  # Ollama's "load" request: bring the model in, generate nothing
            self.chat.check_model(body.model.removesuffix(":latest"))
            reason = "unload" if body.keep_alive_seconds() == 0 else "load"
            return lines.done(name, _Reply(), reason, {})
        with client_field_names(OPTION_NAMES):
            prepared = await self.chat.prepare(internal, raw)
        _bound_by_num_ctx(prepared, body.options)
        outputs = self.chat.start(prepared, new_request_id("ollama"))
        if body.stream:
            return StreamingResponse(self._stream(prepared, outputs, timing, lines, name),
                                     media_type=NDJSON)
        reply = await until_disconnect(request, self._collect(prepared, outputs, timing))
        return lines.done(name, reply, _done_reason(reply), self._stats(prepared, reply, timing),
                          whole=True)

    async def _collect(self, prepared: PreparedChat, outputs: AsyncIterator[RequestOutput],
                       timing: Timing) -> _Reply:
        reply = _Reply()
        async for deltas, out in message_deltas(self.chat.choice_stream(prepared), outputs):
            timing.mark()
            reply.final = out
            for delta in deltas:
                reply.message.add(delta)
        return reply

    async def _stream(self, prepared: PreparedChat, outputs: AsyncIterator[RequestOutput],
                      timing: Timing, lines: _Lines, name: str) -> AsyncIterator[str]:
        reply = _Reply()
        try:
            async for deltas, out in message_deltas(self.chat.choice_stream(prepared), outputs):
                timing.mark()
                reply.final = out
                piece = ChoiceMessage()
                for delta in deltas:
                    piece.add(delta)
                    reply.message.add(delta)
                if piece.content or piece.reasoning:
                    yield lines.part(name, piece.content, piece.reasoning)
            if reply.message.tool_calls:
                yield lines.tool_calls(name, reply.message)
            yield _line(lines.done(name, reply, _done_reason(reply),
                                   self._stats(prepared, reply, timing)))
        except Exception as exc:
            _, body, _ = exception_to_response(exc)
            yield _line(ollama_error(body["error"]["message"]))

    @staticmethod
    def _stats(prepared: PreparedChat, reply: _Reply, timing: Timing) -> dict[str, int]:
        produced = len(reply.final.outputs[0].token_ids) if reply.final else 0
        return timing.fields(len(prepared.prompt.token_ids), produced)


def _bound_by_num_ctx(prepared: PreparedChat, options: Options | None) -> None:
    """``num_ctx``: the prompt must fit it and generation stops at it."""
    if options is None or options.num_ctx is None:
        return
    n_prompt = len(prepared.prompt.token_ids)
    if n_prompt >= options.num_ctx:
        raise ContextLengthExceededError(
            f"the prompt has {n_prompt} tokens, which leaves no room for output within "
            f"num_ctx {options.num_ctx}", "options.num_ctx")
    room = options.num_ctx - n_prompt
    if prepared.params.max_tokens > room:
        prepared.params = prepared.params.clone(max_tokens=room)


def _done_reason(reply: _Reply) -> str:
    reason = reply.final.outputs[0].finish_reason if reply.final else None
    return "length" if reason == "length" else "stop"


def _line(payload: dict[str, Any]) -> str:
    return json.dumps(payload, ensure_ascii=False) + "\n"


def _tool_calls(message: ChoiceMessage) -> list[dict[str, Any]]:
    calls = []
    for call in message.tool_calls:
        try:
            arguments = json.loads(call.function.arguments or "{}")
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            arguments = {"arguments": call.function.arguments}
        calls.append({"function": {"name": call.function.name, "arguments": arguments}})
    return calls


class _Lines:
    """How one endpoint words its lines."""

    def part(self, name: str, content: str, thinking: str) -> str:
        raise NotImplementedError

    def tool_calls(self, name: str, message: ChoiceMessage) -> str:
        raise NotImplementedError

    def done(self, name: str, reply: _Reply, reason: str, stats: dict[str, int],
             whole: bool = False) -> dict[str, Any]:
        """The final object; `whole`: it carries the whole reply (not streamed)."""
        raise NotImplementedError


class _ChatLines(_Lines):
    def part(self, name: str, content: str, thinking: str) -> str:
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if thinking:
            message["thinking"] = thinking
        return _line({"model": name, "created_at": created_at(), "message": message,
                      "done": False})

    def tool_calls(self, name: str, message: ChoiceMessage) -> str:
        return _line({"model": name, "created_at": created_at(), "done": False,
                      "message": {"role": "assistant", "content": "",
                                  "tool_calls": _tool_calls(message)}})

    def done(self, name: str, reply: _Reply, reason: str, stats: dict[str, int],
             whole: bool = False) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant",
                                   "content": reply.message.content if whole else ""}
        if whole and reply.message.reasoning:
            message["thinking"] = reply.message.reasoning
        if whole and reply.message.tool_calls:
            message["tool_calls"] = _tool_calls(reply.message)
        payload = {"model": name, "created_at": created_at(), "message": message, "done": True,
                   "done_reason": reason, **stats}
        return payload


class _GenerateLines(_Lines):
    def part(self, name: str, content: str, thinking: str) -> str:
        payload: dict[str, Any] = {"model": name, "created_at": created_at(),
                                   "response": content, "done": False}
        if thinking:
            payload["thinking"] = thinking
        return _line(payload)

    def tool_calls(self, name: str, message: ChoiceMessage) -> str:
        return self.part(name, "", "")

    def done(self, name: str, reply: _Reply, reason: str, stats: dict[str, int],
             whole: bool = False) -> dict[str, Any]:
        payload: dict[str, Any] = {"model": name, "created_at": created_at(),
                                   "response": reply.message.content if whole else "",
                                   "done": True, "done_reason": reason, **stats}
        if whole and reply.message.reasoning:
            payload["thinking"] = reply.message.reasoning
        return payload
