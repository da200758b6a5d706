"""How a stream's chunks are read: token events, usage, and what makes a response fail."""

from __future__ import annotations

import json

import pytest

from pagoda.bench.serve.client import (
    RequestFailed,
    RequestRecord,
    RequestSettings,
    StreamTimer,
    _check_complete,
    _decode,
    _read_chunk,
)
from pagoda.bench.serve.datasets import ServeRequest


def record() -> RequestRecord:
    return RequestRecord(0, 8, None)


def test_payloads_for_both_endpoints():
    request = ServeRequest("hi", 5)
    completion = RequestSettings("u", "m", chat=False, ignore_eos=True, extra_body={"top_k": 3})
    body = completion.payload(request)
    assert body["prompt"] == "hi" and body["max_tokens"] == 5 and body["ignore_eos"] is True
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["top_k"] == 3
    chat = RequestSettings("u", "m", chat=True, api_key="k").payload(request)
    assert chat["messages"] == [{"role": "user", "content": "hi"}] and "prompt" not in chat
    assert RequestSettings("u", "m", chat=True, api_key="k").headers() == {
        "Authorization": "Bearer k"}


@pytest.mark.parametrize("chunk, produced", [
    ({"choices": [{"index": 0, "text": "a"}]}, True),
    ({"choices": [{"index": 0, "text": ""}]}, False),
    ({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}, False),
    ({"choices": [{"index": 0, "delta": {"content": "x"}}]}, True),
    ({"choices": [{"index": 0, "delta": {"reasoning_content": "hmm"}}]}, True),
    ({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0}]}}]}, True),
    ({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}, False),
])
def test_token_events(chunk, produced):
    assert _read_chunk(chunk, record()) is produced


def test_usage_and_finish_reason_are_kept():
    r = record()
    _read_chunk({"choices": [{"index": 0, "text": "ab", "finish_reason": "length"}]}, r)
    _read_chunk({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}, r)
    assert (r.finish_reason, r.prompt_tokens, r.output_tokens, r.output_chars) == \
        ("length", 3, 2, 2)
    _check_complete(r, done=True)


@pytest.mark.parametrize("finish, usage, done, message", [
    ("stop", True, False, "before \\[DONE\\]"),
    (None, True, True, "without a finish reason"),
    ("stop", False, True, "no usage"),
])
def test_incomplete_streams_fail(finish, usage, done, message):
    r = record()
    r.finish_reason = finish
    r.output_tokens = 4 if usage else None
    with pytest.raises(RequestFailed, match=message):
        _check_complete(r, done)


def test_error_events_and_garbage_fail():
    with pytest.raises(RequestFailed, match="error event: boom"):
        _decode('{"error": {"message": "boom", "type": "x"}}')
    with pytest.raises(RequestFailed, match="malformed"):
        _decode("{not json")
    with pytest.raises(RequestFailed, match="malformed"):
        _decode("[1, 2]")


def test_stream_timings():
    r = record()
    timer = StreamTimer(r, start=10.0)
    events = [(10.5, {"choices": [{"index": 0, "text": "a"}]}),
              (10.6, {"choices": [{"index": 0, "text": ""}]}),  # no text: not a token event
              (10.8, {"choices": [{"index": 0, "text": "b", "finish_reason": "length"}]}),
              (10.9, {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}})]
    for now, chunk in events:
        assert not timer.on_data(json.dumps(chunk), now)
    assert timer.on_data("[DONE]", 11.0) and timer.done
    assert r.ttft_s == pytest.approx(0.5) and r.itl_s == [pytest.approx(0.3)]


def test_a_response_without_visible_text_has_its_finish_as_first_token():
    """Special tokens only: no chunk carries text, yet the request succeeded."""
    r = record()
    timer = StreamTimer(r, start=1.0)
    timer.on_data(json.dumps({"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}),
                  1.25)
    assert r.ttft_s == pytest.approx(0.25) and r.itl_s == []
