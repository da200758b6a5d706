"""What every generation endpoint shares: model checks, context-length validation,
disconnect-aware collection, SSE framing and merging several output streams."""

from __future__ import annotations

import asyncio
import contextvars
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Request
from pydantic import BaseModel

from pagoda.engine.async_engine import AsyncEngine
from pagoda.engine.input_processor import ProcessedPrompt
from pagoda.entrypoints.openai.errors import (
    ServerOverloadedError,
    ServerShuttingDownError,
    exception_to_response,
)
from pagoda.errors import (
    ContextLengthExceededError,
    InvalidRequestError,
    UnknownModelError,
)
from pagoda.logger import get_logger
from pagoda.outputs import RequestOutput
from pagoda.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagoda.entrypoints.openai.app import ServerState

logger = get_logger(__name__)
T = TypeVar("T")
SSE_DONE = "data: [DONE]\n\n"
# The model lease of the request being handled, when the server hosts several models
# (pagoda.fleet); unset on a single-model server.
current_lease: contextvars.ContextVar[Any] = contextvars.ContextVar("pagoda_lease",
                                                                     default=None)


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(payload: BaseModel | dict[str, Any]) -> str:
    if isinstance(payload, BaseModel):
        return f"data: {payload.model_dump_json()}\n\n"
    return f"data: {json.dumps(payload)}\n\n"


def sse_error(exc: BaseException) -> str:
    """An error after the stream started: one error event, then the stream closes."""
    _, body, _ = exception_to_response(exc)
    return sse(body)


class ServingBase:
    """State and checks shared by the endpoint implementations."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    @property
    def engine(self) -> AsyncEngine:
        """The engine; 503 with Retry-After while the model is still loading."""
        lease = current_lease.get()
        if lease is not None:
            return lease.engine
        engine = self.state.engine
        if engine is None:
            raise ServerOverloadedError("The model is still loading; retry shortly.",
                                        retry_after=5)
        return engine

    @property
    def model_name(self) -> str:
        lease = current_lease.get()
        if lease is not None:
            return lease.model.name
        return self.state.config.served_model_names[0]

    def check_model(self, model: str | None) -> None:
        if current_lease.get() is not None:
            return  # the route resolved the model when it leased it
        if model is not None and model not in self.state.config.served_model_names \
                and not (self.state.loras and self.state.loras.is_adapter(model)):
            raise UnknownModelError(model)

    def lora_for(self, model: str | None) -> str | None:
        """The LoRA adapter a request's `model` names (None: the base model)."""
        lease = current_lease.get()
        if lease is not None:
            return lease.lora_name
        if self.state.loras is None:
            return None
        return model if self.state.loras.is_adapter(model) else None

    def server_chat_template(self) -> str | None:
        """The operator's chat template: the model's own setting, else --chat-template."""
        lease = current_lease.get()
        if lease is not None and lease.model.spec.chat_template:
            return lease.model.spec.chat_template
        return self.state.config.chat_template

    def model_defaults(self) -> Any:
        """The hosted model's Modelfile-style defaults (its fleet spec), None if it has none."""
        lease = current_lease.get()
        return lease.model.spec if lease is not None else None

    def check_admission(self) -> None:
        """Refuse new work while draining (503 + Retry-After via the error mapping)."""
        if self.state.draining:
            raise ServerShuttingDownError()

    def resolve_max_tokens(self, prompt: ProcessedPrompt, requested: int | None,
                           field: str, prompt_field: str) -> int:
        """max_tokens for this prompt; prompt + max_tokens must fit the context (400)."""
        limit = self.engine.model_info.max_model_len
        n_prompt = len(prompt.token_ids)
        if requested is None:
            if n_prompt >= limit:
                raise ContextLengthExceededError(
                    f"This model's maximum context length is {limit} tokens. However, your "
                    f"request has {n_prompt} input tokens. Please reduce the length of the "
                    f"input.", prompt_field)
            return limit - n_prompt
        if n_prompt + requested > limit:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {n_prompt + requested} tokens ({n_prompt} in the {prompt_field}, "
                f"{requested} in the completion). Please reduce the length of the "
                f"{prompt_field} or completion.", field if n_prompt < limit else prompt_field)
        return requested

    def validate_prompt(self, prompt: ProcessedPrompt, params: SamplingParams) -> None:
        self.engine.input_processor.validate_prompt(prompt.token_ids)
        params.check_vocab(self.engine.model_info.vocab_size)

    async def check_structured_outputs(self, params: SamplingParams, field: str) -> None:
        """Compile the output constraint (off the event loop); a bad one is a 400 that
        names `field`, the request field it came from."""
        try:
            await self.engine.check_structured_outputs(params)
        except InvalidRequestError as exc:
            raise InvalidRequestError(exc.message, field, exc.code) from None

    def open_streams(self, plans: list[tuple[str, ProcessedPrompt, SamplingParams]],
                     priority: int, arrival: float,
                     lora_name: str | None = None) -> list[AsyncIterator[RequestOutput]]:
        """Admit and submit every (request id, prompt, params) now, before any response
        starts: a refusal is an HTTP error (503 + Retry-After), not an event in a 200
        stream. If one is refused, the ones already submitted are aborted."""
        streams: list[Any] = []
        try:
            for request_id, prompt, params in plans:
                streams.append(self.stream_outputs(request_id, prompt, params, priority,
                                                   arrival, lora_name))
        except BaseException:
            for stream in streams:
                stream.close()
            raise
        return streams

    def stream_outputs(self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams,
                       priority: int, arrival: float,
                       lora_name: str | None = None) -> AsyncIterator[RequestOutput]:
        """Submit one request now (see AsyncEngine.generate) and return its output stream."""
        if self.state.config.log_requests:
            logger.info("request %s: %d prompt tokens, max_tokens %s, n %d", request_id,
                        len(prompt.token_ids), params.max_tokens, params.n)
        if not self.state.config.honor_priority:
            priority = 0
        self.engine.check_alive()  # a 503 now, not an error event after a 200
        return self.engine.generate(request_id, prompt, params, priority, arrival, lora_name)


async def merge_streams(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several async iterators as items arrive: yields (stream index, item).
    Every stream is closed when this ends, however it ends."""
    try:
        async for pair in _merged(streams):
            yield pair
    finally:
        for stream in streams:
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()


async def _merged(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((i, item))
        except Exception as exc:  # forwarded to the consumer
            await queue.put((i, exc))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def last_outputs(streams: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
    """Drain each stream; return its final output."""
    finals: list[RequestOutput | None] = [None] * len(streams)
    async for i, out in merge_streams(streams):
        finals[i] = out
    return [f for f in finals if f is not None]


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run work; if the client disconnects first, cancel it (which aborts its requests)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise ClientDisconnected
        return task.result()
    finally:
        watcher.cancel()


class ClientDisconnected(Exception):
    """The client went away before its response was ready (its requests were aborted)."""


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def now() -> float:
    return time.monotonic()
