"""AsyncEngine: the asyncio facade the server uses. Tokenizes off the event loop, admits
requests by the work they bring (pagoda.engine.admission), fans engine-core outputs out to
per-request streams, aborts requests whose consumer went away, and notices an engine that
stopped answering."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from pagoda.core_outputs import EngineCoreOutput, SchedulerStats
from pagoda.engine.admission import (
    Admission,
    AdmissionLimits,
    EngineOverloadedError,
    Work,
)
from pagoda.engine.client import EngineCoreClient, EngineDeadError
from pagoda.engine.input_processor import InputProcessor, ProcessedPrompt, PromptType
from pagoda.engine.model_info import ModelInfo
from pagoda.engine.output_processor import OutputProcessor
from pagoda.errors import InvalidRequestError, PagodaError
from pagoda.logger import get_logger
from pagoda.lora.request import LoRAAdapterError
from pagoda.outputs import RequestOutput
from pagoda.sampling_params import SamplingParams
from pagoda.tokenizer.chat_template import Conversation, render_chat

logger = get_logger(__name__)


__all__ = ["AsyncEngine", "EngineOverloadedError", "OutputMailbox", "RequestStream"]
DEFAULT_STALL_TIMEOUT_S = 10.0


@dataclass(slots=True)
class RequestTiming:
    """Latency facts about one engine request, for metrics."""

    arrival: float
    num_prompt_tokens: int
    max_tokens: int = 0  # the most tokens the request may generate
    first_token: float | None = None
    last_token: float | None = None
    queue_time: float | None = None
    num_generation_tokens: int = 0
    inter_token_latencies: list[float] = field(default_factory=list)
    lora_name: str | None = None  # the LoRA adapter it ran with

    @property
    def scheduled(self) -> float | None:
        """When the engine first scheduled the request (None until it reports so)."""
        return None if self.queue_time is None else self.arrival + self.queue_time


class EngineObserver(Protocol):
    """Receives what metrics need; the server's Prometheus exporter implements it."""

    def on_model_info(self, info: ModelInfo) -> None:
        """The engine loaded its model with this cache configuration."""

    def on_stats(self, stats: SchedulerStats) -> None: ...

    def on_tokens(self, timing: RequestTiming, num_new_tokens: int) -> None:
        """A running request produced tokens (its first ones end its prefill)."""

    def on_request_finished(self, finish_reason: str, timing: RequestTiming) -> None: ...

    def forget(self) -> None:
        """The engine stopped: what it reported about its current state no longer holds."""


class OutputMailbox:
    """A request's outputs not yet read. Each RequestOutput holds everything the request has
    produced so far, so an unread one is replaced by the next rather than queued behind it:
    a reader that falls behind (a busy server, a slow client) gets the latest state in one
    read instead of catching up one engine step at a time. Errors stay, in order."""

    def __init__(self) -> None:
        self._items: deque[RequestOutput | Exception] = deque()
        self._ready = asyncio.Event()

    def put_nowait(self, item: RequestOutput | Exception) -> None:
        if isinstance(item, RequestOutput) and self._items \
                and isinstance(self._items[-1], RequestOutput):
            self._items[-1] = item
        else:
            self._items.append(item)
        self._ready.set()

    async def get(self) -> RequestOutput | Exception:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()


class RequestStream:
    """The outputs of one submitted request, as an async iterator. Closing it (or leaving
    it unfinished and unreferenced) aborts the request, whether or not it was ever read."""

    def __init__(self, engine: AsyncEngine, request_id: str, mailbox: OutputMailbox) -> None:
        self._engine = engine
        self.request_id = request_id
        self._mailbox = mailbox
        self._done = False
        self._loop = asyncio.get_running_loop()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._mailbox.get()
        except BaseException:
            self.close()
            raise
        if isinstance(item, Exception):
            self.close()
            raise item
        if item.finished:
            self._done = True
            self._engine._forget(self.request_id)
        return item

    def close(self) -> None:
        """Stop following the request; abort it in the engine if it has not finished."""
        if self._done:
            return
        self._done = True
        self._engine._forget(self.request_id)
        self._engine.abort(self.request_id)

    async def aclose(self) -> None:
        self.close()

    def __del__(self) -> None:
        if not self._done and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.close)


class AsyncEngine:
    """generate() admits and submits a request at once (EngineOverloadedError if it may
    not start) and returns a RequestStream of its outputs; closing the stream aborts it."""

    def __init__(self, client: EngineCoreClient, tokenizer: Any, max_pending: int = 4096,
                 observer: EngineObserver | None = None,
                 limits: AdmissionLimits | None = None,
                 stall_timeout: float = DEFAULT_STALL_TIMEOUT_S) -> None:
        self.client = client
        self.tokenizer = tokenizer
        self.model_info = client.model_info
        self.input_processor = InputProcessor(tokenizer, self.model_info)
        self.output_processor = OutputProcessor(tokenizer)
        limits = limits or AdmissionLimits(max_requests=max_pending)
        info = self.model_info
        self.admission = Admission(limits.resolve(info.max_num_seqs or 64,
                                                  info.kv_capacity_tokens),
                                   info.max_num_seqs or 64)
        self.stall_timeout = stall_timeout
        self.observer = observer
        self._mailboxes: dict[str, OutputMailbox] = {}
        self._timings: dict[str, RequestTiming] = {}
        self._handler: asyncio.Task[None] | None = None
        self.dead: BaseException | None = None
        self.stats = SchedulerStats()
        self.last_heard = time.monotonic()  # when the engine last sent a batch
        if observer is not None:
            observer.on_model_info(self.model_info)

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
        return len(self._mailboxes)

    @property
    def max_pending(self) -> int:
        return self.admission.limits.max_requests

    @property
    def is_ready(self) -> bool:
        return self.dead is None and self.client.is_alive() and not self.stalled

    @property
    def stalled(self) -> bool:
        """The engine sent nothing for stall_timeout seconds although it should have: it
        beats every second (MPClient) or it has work pending."""
        if self.dead is not None or self._handler is None:
            return False
        beats = getattr(self.client, "sends_heartbeats", False)
        silent = time.monotonic() - self.last_heard
        return silent > self.stall_timeout and (beats or self.num_in_flight > 0)

    @property
    def has_room(self) -> bool:
        """A one-sequence request would be admitted now."""
        try:
            self.admission.check(Work(1, 1, 1))
        except EngineOverloadedError:
            return False
        return True

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

    def generate(self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams,
                 priority: int = 0, arrival: float | None = None,
                 lora_name: str | None = None) -> RequestStream:
        """Admit and submit a request now (raises EngineOverloadedError, EngineDeadError
        before anything is queued); the returned stream yields its outputs."""
        mailbox = self._submit(request_id, prompt, params, priority,
                               arrival or time.monotonic(), lora_name)
        return RequestStream(self, request_id, mailbox)

    def _forget(self, request_id: str) -> None:
        if self._mailboxes.pop(request_id, None) is not None:
            self.admission.finish_request()

    def check_alive(self) -> None:
        """Raise EngineDeadError once the engine has died."""
        if self.dead is not None:
            raise EngineDeadError("the engine is not running")

    async def add_lora(self, name: str, path: str) -> int:
        """Load a LoRA adapter in the engine (LoRAAdapterError if it does not fit)."""
        return await self._lora_call("add_lora", name, path)

    async def remove_lora(self, name: str) -> bool:
        """Unload an adapter: new requests are refused, running ones finish."""
        return await self._lora_call("remove_lora", name)

    async def _lora_call(self, method: str, *args: str) -> Any:
        try:
            return await self.client.call(method, *args)
        except RuntimeError as exc:  # the engine process reports errors by type name
            _, sep, message = str(exc).partition(f"{LoRAAdapterError.__name__}: ")
            if sep:
                raise LoRAAdapterError(message) from None
            raise

    def _submit(self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams,
                priority: int, arrival: float,
                lora_name: str | None = None) -> OutputMailbox:
        self.check_alive()
        work = Work(params.n, len(prompt.token_ids), params.max_tokens or 0)
        self.admission.check(work)
        if request_id in self._mailboxes:
            raise PagodaError(f"request id {request_id!r} is already in use")
        children, core_requests = self.input_processor.fan_out(request_id, prompt, params,
                                                               priority, lora_name=lora_name)
        mailbox = OutputMailbox()
        self._mailboxes[request_id] = mailbox
        self.admission.admit([r.request_id for r in core_requests], work)
        self.output_processor.add_request(request_id, prompt.text, prompt.token_ids, children)
        for core_request in core_requests:
            self._timings[core_request.request_id] = RequestTiming(
                arrival, len(prompt.token_ids), self._max_tokens(params, len(prompt.token_ids)),
                lora_name=lora_name)
            self.client.add_request(core_request)
        return mailbox

    def _max_tokens(self, params: SamplingParams, num_prompt_tokens: int) -> int:
        limit = self.model_info.max_model_len - num_prompt_tokens
        return limit if params.max_tokens is None else min(params.max_tokens, limit)

    def abort(self, request_id: str) -> None:
        child_ids = self.output_processor.child_ids(request_id)
        self.output_processor.abort(request_id)
        for child_id in child_ids:
            self._finish_timing(child_id, "abort")
        if child_ids and self.dead is None:
            self.client.abort_requests(child_ids)

    def abort_all(self) -> None:
        """End every in-flight request with finish_reason 'abort' (used when draining)."""
        for request_id, mailbox in list(self._mailboxes.items()):
            child_ids = self.output_processor.child_ids(request_id)
            final = self.output_processor.abort(request_id)
            for child_id in child_ids:
                self._finish_timing(child_id, "abort")
            if self.dead is None and child_ids:
                self.client.abort_requests(child_ids)
            if final is not None:
                mailbox.put_nowait(final)

    # ---- output --------------------------------------------------------------------------------
    async def _output_loop(self) -> None:
        try:
            while True:
                batch = await self.client.get_outputs()
                self.last_heard = time.monotonic()
                self._reject(batch.errors)
                self._record_tokens(batch.outputs, batch.timestamp)
                results, stopped = self.output_processor.process(batch.outputs)
                if stopped:  # a stop string ended them: the core must stop too
                    self.client.abort_requests(stopped)
                    for child_id in stopped:
                        self._finish_timing(child_id, "stop")
                for result in results:
                    mailbox = self._mailboxes.get(result.request_id)
                    if mailbox is not None:
                        mailbox.put_nowait(result)
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
            mailbox = self._mailboxes.get(parent or "")
            if mailbox is None:
                continue
            if error.error_type in ("InvalidRequestError", "ContextLengthExceededError",
                                    "LoRANotLoadedError"):
                mailbox.put_nowait(InvalidRequestError(error.message))
            else:
                mailbox.put_nowait(PagodaError("the engine rejected the request"))
            self.abort(parent)

    def _fail_all(self, exc: BaseException) -> None:
        self.dead = exc
        logger.error("engine core failed: %s", exc)
        error = exc if isinstance(exc, EngineDeadError) else EngineDeadError("the engine failed")
        for mailbox in self._mailboxes.values():
            mailbox.put_nowait(error)

    def _record_tokens(self, outputs: list[EngineCoreOutput], sent_at: float) -> None:
        """Timings and admission's bookkeeping for a batch the engine sent at `sent_at`."""
        now = time.monotonic()
        self.admission.record_batch([(out.request_id, len(out.new_token_ids))
                                     for out in outputs], sent_at)
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
                if self.observer is not None:
                    self.observer.on_tokens(timing, len(out.new_token_ids))
            if out.finish_reason is not None:
                self._finish_timing(out.request_id, out.finish_reason)

    def _finish_timing(self, child_id: str, finish_reason: str) -> None:
        self.admission.finish_sequence(child_id, finish_reason in ("stop", "length"))
        timing = self._timings.pop(child_id, None)
        if timing is not None and self.observer is not None:
            self.observer.on_request_finished(finish_reason, timing)
