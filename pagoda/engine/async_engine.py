"""AsyncEngine: the asyncio facade the server uses. Tokenizes off the event loop, fans
engine-core outputs out to per-request queues, aborts requests whose consumer went away."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from pagoda.core_outputs import EngineCoreOutput, SchedulerStats
from pagoda.engine.client import EngineCoreClient, EngineDeadError
from pagoda.engine.input_processor import InputProcessor, ProcessedPrompt, PromptType
from pagoda.engine.output_processor import OutputProcessor
from pagoda.errors import InvalidRequestError, PagodaError
from pagoda.logger import get_logger
from pagoda.outputs import RequestOutput
from pagoda.sampling_params import SamplingParams
from pagoda.tokenizer.chat_template import Conversation, render_chat

logger = get_logger(__name__)


class EngineOverloadedError(PagodaError):
    """Too many requests are in flight; the client should retry later."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(slots=True)
class RequestTiming:
    """Latency facts about one engine request, for metrics."""

    arrival: float
    num_prompt_tokens: int
    first_token: float | None = None
    last_token: float | None = None
    queue_time: float | None = None
    num_generation_tokens: int = 0
    inter_token_latencies: list[float] = field(default_factory=list)


class EngineObserver(Protocol):
    """Receives what metrics need; the server's Prometheus exporter implements it."""

    def on_stats(self, stats: SchedulerStats) -> None: ...

    def on_request_finished(self, finish_reason: str, timing: RequestTiming) -> None: ...

    def forget(self) -> None:
        """The engine stopped: what it reported about its current state no longer holds."""


class AsyncEngine:
    """generate() yields RequestOutputs as they advance; cancellation aborts the request."""

    def __init__(self, client: EngineCoreClient, tokenizer: Any, max_pending: int = 4096,
                 observer: EngineObserver | None = None) -> None:
        self.client = client
        self.tokenizer = tokenizer
        self.model_info = client.model_info
        self.input_processor = InputProcessor(tokenizer, self.model_info)
        self.output_processor = OutputProcessor(tokenizer)
        self.max_pending = max_pending
        self.observer = observer
        self._queues: dict[str, asyncio.Queue[RequestOutput | Exception]] = {}
        self._timings: dict[str, RequestTiming] = {}
        self._handler: asyncio.Task[None] | None = None
        self.dead: BaseException | None = None
        self.stats = SchedulerStats()

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._handler is None:
            self._handler = asyncio.get_running_loop().create_task(self._output_loop())

    async def stop(self) -> None:
        if self._handler is not None:
            self._handler.cancel()
            await asyncio.gather(self._handler, return_exceptions=True)
            self._handler = None
        if self.observer is not None:
            self.observer.forget()

    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    @property
    def is_ready(self) -> bool:
        return self.dead is None and self.client.is_alive()

    # ---- input ---------------------------------------------------------------------------------
    async def tokenize(self, prompt: PromptType) -> ProcessedPrompt:
        """Tokenize off the event loop (large prompts cost milliseconds of CPU)."""
        return await asyncio.to_thread(self.input_processor.tokenize, prompt)

    async def tokenize_text(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return await asyncio.to_thread(
            lambda: self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)

    async def render_chat(self, messages: Conversation, **kwargs: Any) -> ProcessedPrompt:
        """Apply the chat template and tokenize, off the event loop."""
        def work() -> ProcessedPrompt:
            text = render_chat(self.tokenizer, messages, **kwargs)
            return ProcessedPrompt(text, self.tokenizer(text, add_special_tokens=False).input_ids)
        return await asyncio.to_thread(work)

    async def check_structured_outputs(self, params: SamplingParams) -> None:
        """Compile the output constraint off the event loop (InvalidRequestError if bad)."""
        if params.structured_outputs is not None:
            await asyncio.to_thread(self.input_processor.check_structured_outputs, params)

    async def generate(self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams,
                       priority: int = 0, arrival: float | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its outputs; leaving the loop early aborts it."""
        queue = self._submit(request_id, prompt, params, priority, arrival or time.monotonic())
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def check_alive(self) -> None:
        """Raise EngineDeadError once the engine has died."""
        if self.dead is not None:
            raise EngineDeadError("the engine is not running")

    def _submit(self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams,
                priority: int, arrival: float) -> asyncio.Queue[RequestOutput | Exception]:
        self.check_alive()
        if self.num_in_flight >= self.max_pending:
            raise EngineOverloadedError(
                f"the server is at its limit of {self.max_pending} in-flight requests")
        if request_id in self._queues:
            raise PagodaError(f"request id {request_id!r} is already in use")
        children, core_requests = self.input_processor.fan_out(request_id, prompt, params,
                                                               priority)
        queue: asyncio.Queue[RequestOutput | Exception] = asyncio.Queue()
        self._queues[request_id] = queue
        self.output_processor.add_request(request_id, prompt.text, prompt.token_ids, children)
        for core_request in core_requests:
            self._timings[core_request.request_id] = RequestTiming(arrival, len(prompt.token_ids))
            self.client.add_request(core_request)
        return queue

    def abort(self, request_id: str) -> None:
        child_ids = self.output_processor.child_ids(request_id)
        self.output_processor.abort(request_id)
        for child_id in child_ids:
            self._finish_timing(child_id, "abort")
        if child_ids and self.dead is None:
            self.client.abort_requests(child_ids)

    def abort_all(self) -> None:
        """End every in-flight request with finish_reason 'abort' (used when draining)."""
        for request_id, queue in list(self._queues.items()):
            child_ids = self.output_processor.child_ids(request_id)
            final = self.output_processor.abort(request_id)
            for child_id in child_ids:
                self._finish_timing(child_id, "abort")
            if self.dead is None and child_ids:
                self.client.abort_requests(child_ids)
            if final is not None:
                queue.put_nowait(final)

    # ---- output --------------------------------------------------------------------------------
    async def _output_loop(self) -> None:
        try:
            while True:
                batch = await self.client.get_outputs()
                self._reject(batch.errors)
                self._record_tokens(batch.outputs)
                results, stopped = self.output_processor.process(batch.outputs)
                if stopped:  # a stop string ended them: the core must stop too
                    self.client.abort_requests(stopped)
                    for child_id in stopped:
                        self._finish_timing(child_id, "stop")
                for result in results:
                    queue = self._queues.get(result.request_id)
                    if queue is not None:
                        queue.put_nowait(result)
                self.stats = batch.stats
                if self.observer is not None:
                    self.observer.on_stats(batch.stats)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the engine died (or the channel broke): fail everything
            self._fail_all(exc)

    def _reject(self, errors: list[Any]) -> None:
        """Requests the engine refused (the frontend validates first, so this is rare)."""
        for error in errors:
            parent = self.output_processor.child_to_parent.get(error.request_id or "")
            queue = self._queues.get(parent or "")
            if queue is None:
                continue
            if error.error_type in ("InvalidRequestError", "ContextLengthExceededError"):
                queue.put_nowait(InvalidRequestError(error.message))
            else:
                queue.put_nowait(PagodaError("the engine rejected the request"))
            self.abort(parent)

    def _fail_all(self, exc: BaseException) -> None:
        self.dead = exc
        logger.error("engine core failed: %s", exc)
        error = exc if isinstance(exc, EngineDeadError) else EngineDeadError("the engine failed")
        for queue in self._queues.values():
            queue.put_nowait(error)

    def _record_tokens(self, outputs: list[EngineCoreOutput]) -> None:
        now = time.monotonic()
        for out in outputs:
            timing = self._timings.get(out.request_id)
            if timing is None:
                continue
            if out.queue_time is not None:
                timing.queue_time = out.queue_time
            if out.new_token_ids:
                if timing.first_token is None:
                    timing.first_token = now
                elif timing.last_token is not None:
                    timing.inter_token_latencies.append(now - timing.last_token)
                timing.last_token = now
                timing.num_generation_tokens += len(out.new_token_ids)
            if out.finish_reason is not None:
                self._finish_timing(out.request_id, out.finish_reason)

    def _finish_timing(self, child_id: str, finish_reason: str) -> None:
        timing = self._timings.pop(child_id, None)
        if timing is not None and self.observer is not None:
            self.observer.on_request_finished(finish_reason, timing)
