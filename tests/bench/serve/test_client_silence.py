"""Silence on a stream: before the first token it is queueing (measured, bounded only by the
request timeout); after it, a stall (failed after --stall-timeout). A scripted HTTP peer on a
real socket holds the silences exactly; test_faults.py covers the same against a real server."""

from __future__ import annotations

import asyncio
import time

import httpx

from pagoda.bench.serve.client import RequestSettings, send_request
from pagoda.bench.serve.datasets import ServeRequest

FIRST = 'data: {"choices":[{"text":"a"}]}\n\n'
LAST = ('data: {"choices":[{"text":"b","finish_reason":"length"}],'
        '"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\ndata: [DONE]\n\n')


def _chunk(text: str) -> bytes:
    data = text.encode()
    return b"%x\r\n" % len(data) + data + b"\r\n"


async def _timed(before_first: float, after_first: float):
    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")
        try:
            await asyncio.sleep(before_first)
            writer.write(_chunk(FIRST))
            await writer.drain()
            await asyncio.sleep(after_first)
            writer.write(_chunk(LAST) + b"0\r\n\r\n")
            await writer.drain()
        except (asyncio.CancelledError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(peer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = RequestSettings(url=f"http://127.0.0.1:{port}/v1/completions", model="m",
                               chat=False, stall_timeout_s=0.5, request_timeout_s=5)
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(0.5, read=5, pool=None)) as http:
            began = time.perf_counter()
            record = await send_request(http, settings, ServeRequest("x", 2, 1), 0, began)
            return record, time.perf_counter() - began
    finally:
        server.close()


def test_a_long_wait_for_the_first_token_is_measured_not_failed():
    record, _ = asyncio.run(_timed(before_first=1.5, after_first=0.05))
    assert record.success and record.error is None
    assert record.ttft_s >= 1.5 and record.output_tokens == 2


def test_silence_after_the_first_token_is_a_stall():
    record, took = asyncio.run(_timed(before_first=0.05, after_first=3.0))
    assert not record.success
    assert record.error == "stalled: no data for 0.5 s after its first token"
    assert took < 2.0
