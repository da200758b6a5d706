"""Each API's error body from the OpenAI envelope."""

from __future__ import annotations

from pagoda.entrypoints.error_shapes import protocol_of, reshape
from pagoda.entrypoints.openai.errors import error_body


def test_paths_pick_their_protocol():
    assert protocol_of("/api/chat") == "ollama"
    assert protocol_of("/v1/messages") == "anthropic"
    assert protocol_of("/v1/messages/count_tokens") == "anthropic"
    assert protocol_of("/v1/messagesx") == "openai"
    assert protocol_of("/v1/responses") == "openai"


def test_shapes():
    body = error_body(400, "must be positive", param="max_tokens")
    assert reshape("/v1/chat/completions", 400, body) is body
    assert reshape("/api/chat", 400, body) == {"error": "max_tokens: must be positive"}
    assert reshape("/v1/messages", 404, error_body(404, "no model")) == {
        "type": "error", "error": {"type": "not_found_error", "message": "no model"}}
    assert reshape("/v1/messages", 503, error_body(503, "busy"))["error"]["type"] == \
        "overloaded_error"
    assert reshape("/v1/messages", 500, error_body(500, "x"))["error"]["type"] == "api_error"
