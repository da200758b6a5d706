"""POST /v1/responses over the shared chat path: output items (reasoning, message,
function_call) built from the chat deltas, streamed as the Responses API's typed events;
stored (bounded, least recently used out first) only when the request asks."""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from pagoda.entrypoints.openai.errors import APIError, exception_to_response
from pagoda.entrypoints.openai.internal_request import client_field_names
from pagoda.entrypoints.openai.protocol import DeltaMessage
from pagoda.entrypoints.openai.protocol_responses import (
    FIELD_NAMES,
    ResponsesRequest,
    json_size,
    output_messages,
)
from pagoda.entrypoints.openai.serving_base import until_disconnect
from pagoda.entrypoints.openai.serving_chat import (
    ChatServing,
    PreparedChat,
    message_deltas,
)
from pagoda.errors import InvalidRequestError
from pagoda.outputs import RequestOutput

MAX_STORED_RESPONSES = 1024
MAX_STORED_BYTES = 64 << 20


class ResponseNotFoundError(APIError):
    """No stored response has this id (404)."""

    status, type, code = 404, "invalid_request_error", "not_found"

    def __init__(self, response_id: str) -> None:
        super().__init__(f"No response with id '{response_id[:256]}' is stored.", "response_id")


@dataclass(slots=True)
class _Stored:
    response: dict[str, Any]
    conversation: list[dict[str, Any]]  # the chat messages up to and including the reply
    size: int


class ResponseStore:
    """Responses kept for GET/DELETE and previous_response_id: bounded in count and bytes."""

    def __init__(self, max_items: int = MAX_STORED_RESPONSES,
                 max_bytes: int = MAX_STORED_BYTES) -> None:
        self.max_items, self.max_bytes = max_items, max_bytes
        self._items: OrderedDict[str, _Stored] = OrderedDict()
        self._bytes = 0

    def put(self, response: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        size = json_size(response) + json_size(conversation)
        if size > self.max_bytes:
            return  # too big to keep at all
        self.pop(response["id"])
        self._items[response["id"]] = _Stored(response, conversation, size)
        self._bytes += size
        while len(self._items) > self.max_items or self._bytes > self.max_bytes:
            _, oldest = self._items.popitem(last=False)
            self._bytes -= oldest.size

    def get(self, response_id: str) -> _Stored:
        stored = self._items.get(response_id)
        if stored is None:
            raise ResponseNotFoundError(response_id)
        self._items.move_to_end(response_id)
        return stored

    def pop(self, response_id: str) -> _Stored | None:
        stored = self._items.pop(response_id, None)
        if stored is not None:
            self._bytes -= stored.size
        return stored


@dataclass(slots=True)
class _Items:
    """The output items of one reply, opened and closed as deltas of each kind arrive;
    `events` collects the stream events they make (without sequence numbers)."""

    output: list[dict[str, Any]] = field(default_factory=list)
    open_kind: str | None = None  # "reasoning", "message" or "call:<index>"
    events: list[dict[str, Any]] = field(default_factory=list)
    spaces: str = ""  # whitespace-only text held back: it opens no item of its own

    def add(self, delta: DeltaMessage) -> None:
        text = delta.content or ""
        if text and not text.strip() and self.open_kind != "message":
            self.spaces += text  # between function calls, or before text still to come
            text = ""
        elif text:
            text, self.spaces = self.spaces + text, ""
        if delta.reasoning_content:
            item = self._open("reasoning", lambda: {
                "id": f"rs_{uuid.uuid4().hex}", "type": "reasoning", "summary": [],
                "content": [{"type": "reasoning_text", "text": ""}], "status": "in_progress"})
            item["content"][0]["text"] += delta.reasoning_content
            self._emit("response.reasoning_text.delta", item, content_index=0,
                       delta=delta.reasoning_content)
        if text:
            item = self._open("message", lambda: {
                "id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant",
                "status": "in_progress", "content": [{"type": "output_text", "text": "",
                                                      "annotations": [], "logprobs": []}]})
            item["content"][0]["text"] += text
            self._emit("response.output_text.delta", item, content_index=0,
                       delta=text, logprobs=[])
        for call in delta.tool_calls or []:
            item = self._open(f"call:{call.index}", lambda c=call: {
                "id": f"fc_{uuid.uuid4().hex}", "type": "function_call",
                "call_id": c.id or f"call_{uuid.uuid4().hex}",
                "name": c.function.name if c.function else "", "arguments": "",
                "status": "in_progress"})
            piece = (call.function.arguments if call.function else None) or ""
            if piece:
                item["arguments"] += piece
                self._emit("response.function_call_arguments.delta", item, delta=piece)

    def close(self) -> None:
        if self.open_kind is None:
            return
        self.open_kind = None
        item = self.output[-1]
        item["status"] = "completed"
        if item["type"] == "message":
            part = item["content"][0]
            self._emit("response.output_text.done", item, content_index=0,
                       text=part["text"], logprobs=[])
            self._emit("response.content_part.done", item, content_index=0, part=part)
        elif item["type"] == "reasoning":
            part = item["content"][0]
            self._emit("response.reasoning_text.done", item, content_index=0, text=part["text"])
            self._emit("response.content_part.done", item, content_index=0, part=part)
        else:
            self._emit("response.function_call_arguments.done", item,
                       arguments=item["arguments"], name=item["name"])
        self.events.append({"type": "response.output_item.done",
                            "output_index": len(self.output) - 1, "item": _copy(item)})

    def _open(self, kind: str, make: Any) -> dict[str, Any]:
        if self.open_kind == kind:
            return self.output[-1]
        self.close()
        self.open_kind = kind
        item = make()
        self.output.append(item)
        index = len(self.output) - 1
        shell = _copy(item)
        if "content" in shell:
            shell["content"] = []
        self.events.append({"type": "response.output_item.added", "output_index": index,
                            "item": shell})
        if item["type"] in ("message", "reasoning"):
            self._emit("response.content_part.added", item, content_index=0,
                       part=_copy(item["content"][0]))
        return item

    def _emit(self, kind: str, item: dict[str, Any], **fields: Any) -> None:
        self.events.append({"type": kind, "item_id": item["id"],
                            "output_index": len(self.output) - 1, **fields})

    def take(self) -> list[dict[str, Any]]:
        events, self.events = self.events, []
        return events


def _copy(value: Any) -> Any:
    return json.loads(json.dumps(value))


class ResponsesServing:
    """The Responses API over the chat path of the OpenAI server."""

    def __init__(self, chat: ChatServing, store: ResponseStore | None = None) -> None:
        self.chat = chat
        self.store = store or ResponseStore()

    async def create(self, body: ResponsesRequest, request: Request) -> Any:
        history: list[dict[str, Any]] = []
        if body.previous_response_id is not None:
            try:
                history = self.store.get(body.previous_response_id).conversation
            except ResponseNotFoundError:
                raise InvalidRequestError(
                    f"Previous response with id '{body.previous_response_id}' not found "
                    f"(pagoda keeps responses only when they are created with store: true).",
                    "previous_response_id") from None
        internal = body.to_chat(history)
        with client_field_names(FIELD_NAMES):
            prepared = await self.chat.prepare(internal)
        response_id = f"resp_{uuid.uuid4().hex}"
        outputs = self.chat.start(prepared, response_id)
        shell = self._response(body, response_id, prepared, [], "in_progress", None)
        if body.stream:
            return StreamingResponse(self._stream(body, prepared, shell, outputs, history),
                                     media_type="text/event-stream")
        items, final = await until_disconnect(request, self._collect(prepared, outputs))
        return self._finish(body, prepared, shell, items, final, history)

    def retrieve(self, response_id: str) -> dict[str, Any]:
        return self.store.get(response_id).response

    def delete(self, response_id: str) -> dict[str, Any]:
        if self.store.pop(response_id) is None:
            raise ResponseNotFoundError(response_id)
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    def _response(self, body: ResponsesRequest, response_id: str, prepared: PreparedChat,
                  output: list[dict[str, Any]], status: str, final: RequestOutput | None
                  ) -> dict[str, Any]:
        produced = len(final.outputs[0].token_ids) if final is not None else 0
        prompt = len(prepared.prompt.token_ids)
        reasoning = sum(1 for item in output if item["type"] == "reasoning")
        return {"id": response_id, "object": "response", "created_at": int(time.time()),
                "status": status, "model": self.chat.model_name, "output": output,
                "error": None, "incomplete_details": None, **body.echo_fields(),
                "usage": None if final is None else {
                    "input_tokens": prompt, "output_tokens": produced,
                    "total_tokens": prompt + produced,
                    "input_tokens_details": {"cached_tokens": final.num_cached_tokens,
                                             "cache_write_tokens": 0},
                    "output_tokens_details": {"reasoning_tokens": 0 if not reasoning else
                                              produced}}}

    def _finish(self, body: ResponsesRequest, prepared: PreparedChat, shell: dict[str, Any],
                items: _Items, final: RequestOutput | None,
                history: list[dict[str, Any]]) -> dict[str, Any]:
        items.close()
        length = final is not None and final.outputs[0].finish_reason == "length"
        response = self._response(body, shell["id"], prepared, items.output,
                                  "incomplete" if length else "completed", final)
        response["created_at"] = shell["created_at"]
        if length:
            response["incomplete_details"] = {"reason": "max_output_tokens"}
        if body.store:  # the turns themselves: instructions are not carried over
            conversation = history + body.input_messages() + output_messages(items.output)
            self.store.put(response, conversation)
        return response

    async def _collect(self, prepared: PreparedChat, outputs: AsyncIterator[RequestOutput]
                       ) -> tuple[_Items, RequestOutput | None]:
        items, final = _Items(), None
        async for deltas, out in message_deltas(self.chat.choice_stream(prepared), outputs):
            final = out
            for delta in deltas:
                items.add(delta)
        return items, final

    async def _stream(self, body: ResponsesRequest, prepared: PreparedChat,
                      shell: dict[str, Any], outputs: AsyncIterator[RequestOutput],
                      history: list[dict[str, Any]]) -> AsyncIterator[str]:
        sequence = _Sequence()
        items, final = _Items(), None
        try:
            yield sequence.event({"type": "response.created", "response": shell})
            yield sequence.event({"type": "response.in_progress", "response": shell})
            async for deltas, out in message_deltas(self.chat.choice_stream(prepared), outputs):
                final = out
                for delta in deltas:
                    items.add(delta)
                for event in items.take():
                    yield sequence.event(event)
            response = self._finish(body, prepared, shell, items, final, history)
            for event in items.take():
                yield sequence.event(event)
            kind = "response.incomplete" if response["status"] == "incomplete" else \
                "response.completed"
            yield sequence.event({"type": kind, "response": response})
        except Exception as exc:
            _, error, _ = exception_to_response(exc)
            yield sequence.event({"type": "error", **error["error"]})


@dataclass(slots=True)
class _Sequence:
    """Numbers the events of one stream."""

    next: int = 0

    def event(self, payload: dict[str, Any]) -> str:
        payload = {**payload, "sequence_number": self.next}
        self.next += 1
        return f"event: {payload['type']}\ndata: {json.dumps(payload)}\n\n"
