"""One streamed request to an OpenAI-compatible server, timed token by token.

A chunk counts as a token event when it carries generated text (completion `text`, chat
`content`, `reasoning_content`/`reasoning`, or tool-call deltas). The first event gives the
time to first token; the gaps between later events are the inter-token latencies. A response
whose tokens all decode to nothing (special tokens only) has its finish as first token. Token
counts come only from the server's usage report (`stream_options.include_usage`): a
response without one fails, as does any error event, HTTP error, missing finish reason,
stream cut short, a stall (silence after the first token) or the request timeout. Silence
before the first token is queueing: it is measured (as TTFT), not failed.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import msgspec

from pagoda.bench.serve.datasets import ServeRequest

MAX_ERROR_BODY_BYTES = 4096


@dataclass(slots=True)
class RequestSettings:
    """What every request of a run sends, and how long it may take."""

    url: str  # the full endpoint URL
    model: str
    chat: bool  # /v1/chat/completions (True) or /v1/completions
    api_key: str | None = None
    ignore_eos: bool = False
    temperature: float = 0.0
    top_p: float | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)
    request_timeout_s: float = 600.0  # whole request
    stall_timeout_s: float = 60.0  # longest silence between two reads after the first token

    def payload(self, request: ServeRequest) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": request.max_tokens,
                                "temperature": self.temperature, "stream": True,
                                "stream_options": {"include_usage": True}}
        if self.chat:
            body["messages"] = [{"role": "user", "content": request.prompt}]
        else:
            body["prompt"] = request.prompt
        if self.top_p is not None:
            body["top_p"] = self.top_p
        if self.ignore_eos:
            body["ignore_eos"] = True
        body.update(self.extra_body)
        return body

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass(slots=True)
class RequestRecord:
    """Everything measured about one request; times in seconds."""

    index: int
    max_tokens: int
    expected_prompt_len: int | None
    start_s: float = 0.0  # send time, from the start of the run
    success: bool = False
    error: str | None = None
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2el_s: float | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    finish_reason: str | None = None
    output_chars: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class RequestFailed(Exception):
    """The server answered, but not with a complete streamed response."""


async def send_request(http: httpx.AsyncClient, settings: RequestSettings,
                       request: ServeRequest, index: int, run_start: float) -> RequestRecord:
    """Send one streamed request and time it; never raises for a server-side failure."""
    record = RequestRecord(index, request.max_tokens, request.prompt_len)
    start = time.perf_counter()
    record.start_s = start - run_start
    try:
        await asyncio.wait_for(_stream(http, settings, request, record, start),
                               settings.request_timeout_s)
        record.success = True
    except Stalled:
        record.error = f"stalled: no data for {settings.stall_timeout_s:g} s after its first token"
    except TimeoutError:
        waiting = " (no first token yet: queued)" if record.ttft_s is None else ""
        record.error = f"timed out after {settings.request_timeout_s:g} s{waiting}"
    except httpx.TimeoutException as exc:
        record.error = f"stalled: no data for {settings.stall_timeout_s:g} s ({type(exc).__name__})"
    except httpx.HTTPError as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    except RequestFailed as exc:
        record.error = str(exc)
    if record.success:
        record.e2el_s = time.perf_counter() - start
    return record


async def _stream(http: httpx.AsyncClient, settings: RequestSettings, request: ServeRequest,
                  record: RequestRecord, start: float) -> None:
    async with http.stream("POST", settings.url, json=settings.payload(request),
                           headers=settings.headers()) as response:
        if response.status_code != 200:
            raise RequestFailed(await _http_error(response))
        timer = StreamTimer(record, start)
        lines = response.aiter_lines()
        while (line := await _next_line(lines, record, settings.stall_timeout_s)) is not None:
            if line.startswith("data:") and timer.on_data(line[5:].strip(), time.perf_counter()):
                break
    _check_complete(record, timer.done)


class Stalled(Exception):
    """No data for stall_timeout_s after the first token."""


async def _next_line(lines: Any, record: RequestRecord, stall_s: float) -> str | None:
    """The stream's next line (None at its end). Silence before the first token is a queued
    request, bounded only by the request timeout; after it, silence is a stall."""
    try:
        if record.ttft_s is None:
            return await anext(lines)
        async with asyncio.timeout(stall_s):
            return await anext(lines)
    except StopAsyncIteration:
        return None
    except TimeoutError:
        raise Stalled from None


class StreamTimer:
    """Folds a stream's `data:` payloads, as they arrive, into a request's timings."""

    def __init__(self, record: RequestRecord, start: float) -> None:
        self.record = record
        self.start = start
        self.last_event = start
        self.done = False

    def on_data(self, data: str, now: float) -> bool:
        """Take one payload received at `now`; True once the stream says [DONE]."""
        if data == "[DONE]":
            self.done = True
            return True
        record = self.record
        if _read_chunk(_decode(data), record):
            if record.ttft_s is None:
                record.ttft_s = now - self.start
            else:
                record.itl_s.append(now - self.last_event)
            self.last_event = now
        elif record.ttft_s is None and record.finish_reason is not None:
            record.ttft_s = now - self.start  # finished without visible text (only EOS, say)
        return False


def _decode(data: str) -> dict[str, Any]:
    try:
        chunk = msgspec.json.decode(data)
    except msgspec.DecodeError:
        raise RequestFailed(f"malformed stream chunk: {data[:200]!r}") from None
    if not isinstance(chunk, dict):
        raise RequestFailed(f"malformed stream chunk: {data[:200]!r}")
    if "error" in chunk:
        raise RequestFailed(f"error event: {_error_message(chunk)}")
    return chunk


def _read_chunk(chunk: dict[str, Any], record: RequestRecord) -> bool:
    """Fold one chunk into `record`; True when it carried generated output."""
    usage = chunk.get("usage")
    if isinstance(usage, dict) and "completion_tokens" in usage:
        record.prompt_tokens = usage.get("prompt_tokens")
        record.output_tokens = usage["completion_tokens"]
    choices = chunk.get("choices") or []
    produced = False
    for choice in choices:
        if choice.get("finish_reason"):
            record.finish_reason = choice["finish_reason"]
        text = _choice_output(choice)
        if text:
            record.output_chars += len(text)
            produced = True
    return produced


def _choice_output(choice: dict[str, Any]) -> str:
    if "text" in choice:
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    parts = [delta.get("content"), delta.get("reasoning_content"), delta.get("reasoning")]
    text = "".join(p for p in parts if isinstance(p, str))
    if delta.get("tool_calls"):
        text += msgspec.json.encode(delta["tool_calls"]).decode()
    return text


def _check_complete(record: RequestRecord, done: bool) -> None:
    if not done:
        raise RequestFailed("stream ended before [DONE]")
    if record.finish_reason is None:
        raise RequestFailed("stream ended without a finish reason")
    if record.output_tokens is None:
        raise RequestFailed("the server sent no usage (stream_options.include_usage)")


async def _http_error(response: httpx.Response) -> str:
    body = b""
    async for piece in response.aiter_bytes():
        body += piece
        if len(body) >= MAX_ERROR_BODY_BYTES:
            break
    try:
        message = _error_message(msgspec.json.decode(body))
    except msgspec.DecodeError:
        message = body[:200].decode(errors="replace")
    return f"HTTP {response.status_code}: {message}"


def _error_message(payload: Any) -> str:
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        return str(error.get("message", error))[:500]
    return str(error if error is not None else payload)[:500]
