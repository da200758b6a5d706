"""POST /v1/messages and /v1/messages/count_tokens over the shared chat path: content
blocks (thinking, text, tool_use) built from the chat deltas, streamed as Anthropic's event
sequence (message_start, content_block_start/delta/stop, message_delta, message_stop)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from pagoda.entrypoints.anthropic.protocol import (
    FIELD_NAMES,
    CountTokensRequest,
    MessagesRequest,
)
from pagoda.entrypoints.error_shapes import anthropic_error
from pagoda.entrypoints.openai.errors import exception_to_response
from pagoda.entrypoints.openai.internal_request import client_field_names
from pagoda.entrypoints.openai.protocol import DeltaMessage
from pagoda.entrypoints.openai.serving_base import until_disconnect
from pagoda.entrypoints.openai.serving_chat import (
    ChatServing,
    PreparedChat,
    message_deltas,
)
from pagoda.outputs import RequestOutput


def _event(kind: str, payload: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **payload})}\n\n"


@dataclass(slots=True)
class _Blocks:
    """The content blocks of one reply, opened and closed as deltas of each kind arrive."""

    content: list[dict[str, Any]] = field(default_factory=list)
    open_kind: str | None = None  # "thinking", "text" or "tool_use:<call index>"
    arguments: dict[int, str] = field(default_factory=dict)  # tool-call index -> JSON text
    spaces: str = ""  # whitespace-only text held back: it opens no block of its own

    def add(self, delta: DeltaMessage) -> list[str]:
        events: list[str] = []
        text = delta.content or ""
        if text and not text.strip() and self.open_kind != "text":
            self.spaces += text  # between tool calls, or before text still to come
            text = ""
        elif text:
            text, self.spaces = self.spaces + text, ""
        if delta.reasoning_content:
            events += self._extend("thinking", {"type": "thinking", "thinking": "",
                                                "signature": ""},
                                   {"type": "thinking_delta",
                                    "thinking": delta.reasoning_content})
            self.content[-1]["thinking"] += delta.reasoning_content
        if text:
            events += self._extend("text", {"type": "text", "text": ""},
                                   {"type": "text_delta", "text": text})
            self.content[-1]["text"] += text
        for call in delta.tool_calls or []:
            start = {"type": "tool_use", "id": call.id or f"toolu_{uuid.uuid4().hex[:24]}",
                     "name": call.function.name if call.function else "", "input": {}}
            piece = (call.function.arguments if call.function else None) or ""
            events += self._extend(f"tool_use:{call.index}", start,
                                   {"type": "input_json_delta", "partial_json": piece}
                                   if piece else None)
            self.arguments[call.index] = self.arguments.get(call.index, "") + piece
            self.content[-1]["input"] = _arguments(self.arguments[call.index])
        return events

    def close(self) -> list[str]:
        if self.open_kind is None:
            return []
        self.open_kind = None
        return [_event("content_block_stop", {"index": len(self.content) - 1})]

    def _extend(self, kind: str, start: dict[str, Any],
                delta: dict[str, Any] | None) -> list[str]:
        events: list[str] = []
        if self.open_kind != kind:
            events += self.close()
            self.open_kind = kind
            self.content.append(dict(start))
            events.append(_event("content_block_start", {"index": len(self.content) - 1,
                                                         "content_block": start}))
        if delta is not None:
            events.append(_event("content_block_delta", {"index": len(self.content) - 1,
                                                         "delta": delta}))
        return events


def _arguments(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _stop(body: MessagesRequest, blocks: _Blocks, final: RequestOutput | None
          ) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence."""
    choice = final.outputs[0] if final is not None else None
    if any(block["type"] == "tool_use" for block in blocks.content):
        return "tool_use", None
    if choice is not None and choice.finish_reason == "length":
        return "max_tokens", None
    if choice is not None and isinstance(choice.stop_reason, str) and \
            choice.stop_reason in (body.stop_sequences or []):
        return "stop_sequence", choice.stop_reason
    return "end_turn", None


class AnthropicServing:
    """The Messages API over the chat path of the OpenAI server."""

    def __init__(self, chat: ChatServing) -> None:
        self.chat = chat

    async def messages(self, body: MessagesRequest, request: Request) -> Any:
        with client_field_names(FIELD_NAMES):
            prepared = await self.chat.prepare(body.to_chat())
        message_id = f"msg_{uuid.uuid4().hex}"
        outputs = self.chat.start(prepared, message_id)
        if body.stream:
            return StreamingResponse(self._stream(body, prepared, message_id, outputs),
                                     media_type="text/event-stream")
        blocks, final = await until_disconnect(request, self._collect(prepared, outputs))
        reason, sequence = _stop(body, blocks, final)
        if not blocks.content:
            blocks.content.append({"type": "text", "text": ""})
        return self._message(message_id, prepared, blocks.content, reason, sequence,
                             _output_tokens(final))

    async def count_tokens(self, body: CountTokensRequest) -> dict[str, int]:
        return {"input_tokens": await self.chat.count_prompt_tokens(body.to_chat())}

    def _message(self, message_id: str, prepared: PreparedChat, content: list[dict[str, Any]],
                 reason: str | None, sequence: str | None, output_tokens: int
                 ) -> dict[str, Any]:
        return {"id": message_id, "type": "message", "role": "assistant",
                "model": self.chat.model_name, "content": content, "stop_reason": reason,
                "stop_sequence": sequence,
                "usage": {"input_tokens": len(prepared.prompt.token_ids),
                          "output_tokens": output_tokens}}

    async def _collect(self, prepared: PreparedChat, outputs: AsyncIterator[RequestOutput]
                       ) -> tuple[_Blocks, RequestOutput | None]:
        blocks, final = _Blocks(), None
        async for deltas, out in message_deltas(self.chat.choice_stream(prepared), outputs):
            final = out
            for delta in deltas:
                blocks.add(delta)
        return blocks, final

    async def _stream(self, body: MessagesRequest, prepared: PreparedChat, message_id: str,
                      outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
        blocks, final = _Blocks(), None
        try:
            yield _event("message_start", {"message": self._message(
                message_id, prepared, [], None, None, 0)})
            yield _event("ping", {})
            async for deltas, out in message_deltas(self.chat.choice_stream(prepared), outputs):
                final = out
                for delta in deltas:
                    for event in blocks.add(delta):
                        yield event
            for event in blocks.close():
                yield event
            reason, sequence = _stop(body, blocks, final)
            yield _event("message_delta", {"delta": {"stop_reason": reason,
                                                     "stop_sequence": sequence},
                                           "usage": {"output_tokens": _output_tokens(final)}})
            yield _event("message_stop", {})
        except Exception as exc:
            status, error, _ = exception_to_response(exc)
            payload = anthropic_error(status, error["error"]["message"])
            yield f"event: error\ndata: {json.dumps(payload)}\n\n"


def _output_tokens(final: RequestOutput | None) -> int:
    return len(final.outputs[0].token_ids) if final is not None else 0
