"""Each API's own error body, built from the OpenAI envelope the server makes: Ollama's
``{"error": message}`` under /api/, Anthropic's ``{"type": "error", "error": {type, message}}``
under /v1/messages, OpenAI's envelope everywhere else."""

from __future__ import annotations

from typing import Any

OLLAMA_PREFIX = "/api/"
ANTHROPIC_PREFIX = "/v1/messages"

_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                    403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                    429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}


def protocol_of(path: str) -> str:
    """"ollama", "anthropic" or "openai": whose error shape a path answers with."""
    if path.startswith(OLLAMA_PREFIX):
        return "ollama"
    if path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/"):
        return "anthropic"
    return "openai"


def ollama_error(message: str) -> dict[str, Any]:
    return {"error": message}


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    kind = _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def reshape(path: str, status: int, body: dict[str, Any]) -> dict[str, Any]:
    """The error body for `path`, from the OpenAI envelope `body`."""
    protocol = protocol_of(path)
    if protocol == "openai":
        return body
    error = body.get("error", {})
    message = str(error.get("message", "error"))
    param = error.get("param")
    if param and param.split(".")[-1] not in message:
        message = f"{param}: {message}"
    return ollama_error(message) if protocol == "ollama" else anthropic_error(status, message)
