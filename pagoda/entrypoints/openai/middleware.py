"""Pure-ASGI middleware: request ids, API-key auth, body size limit. Pure ASGI (not
BaseHTTPMiddleware) so streaming responses and disconnect detection pass through untouched."""

from __future__ import annotations

import hmac
import json
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from starlette.exceptions import HTTPException

from pagoda.entrypoints.error_shapes import reshape
from pagoda.entrypoints.openai.errors import error_body

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REQUEST_ID_HEADER = b"x-request-id"
MAX_REQUEST_ID_CHARS = 128


async def send_json(send: Send, status: int, body: dict[str, Any],
                    headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()), *headers]})
    await send({"type": "http.response.body", "body": payload})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value
    return None


class RequestIdMiddleware:
    """Echo a sane client X-Request-Id or mint one; expose it in scope['state']."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = _header(scope, REQUEST_ID_HEADER)
        request_id = _clean_request_id(given) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0] != REQUEST_ID_HEADER]
                message["headers"] = headers + [(REQUEST_ID_HEADER, request_id.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


def _clean_request_id(raw: bytes | None) -> str | None:
    if not raw or len(raw) > MAX_REQUEST_ID_CHARS:
        return None
    text = raw.decode("ascii", "ignore")
    return text if text and all(c.isalnum() or c in "-_.:" for c in text) else None


class ApiKeyMiddleware:
    """Bearer-token auth (or Anthropic's ``x-api-key`` header) on every route except the
    open ones; constant-time comparison."""

    def __init__(self, app: ASGIApp, api_keys: list[str],
                 open_paths: frozenset[str] = frozenset({"/health", "/live", "/ready"})
                 ) -> None:
        self.app = app
        self.keys = [k.encode() for k in api_keys]
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.open_paths:
            return await self.app(scope, receive, send)
        if not self._authorized(_header(scope, b"authorization"), _header(scope, b"x-api-key")):
            body = error_body(401, "Invalid or missing API key.", "authentication_error",
                              code="invalid_api_key")
            return await send_json(send, 401, reshape(scope.get("path", ""), 401, body),
                                   [(b"www-authenticate", b"Bearer")])
        await self.app(scope, receive, send)

    def _authorized(self, header: bytes | None, api_key: bytes | None) -> bool:
        token = b""
        if header and header[:7].lower() == b"bearer ":
            token = header[7:].strip()
        elif api_key:
            token = api_key.strip()
        ok = False
        for key in self.keys:  # compare against every key so timing reveals nothing
            ok |= hmac.compare_digest(token, key)
        return ok


class JsonBodyMiddleware:
    """Every body this API takes is JSON: one sent without a JSON Content-Type (curl -d sends
    application/x-www-form-urlencoded; some clients send none or text/plain) is read as JSON
    rather than refused as "not a JSON object"."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") in ("POST", "PUT", "PATCH"):
            kind = (_header(scope, b"content-type") or b"").split(b";", 1)[0].strip().lower()
            if not kind.endswith(b"json") and not kind.startswith(b"multipart/"):
                headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                scope = dict(scope, headers=[*headers, (b"content-type", b"application/json")])
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Reject request bodies over max_bytes with 413, by header or while streaming in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await send_json(send, 413, reshape(scope.get("path", ""), 413, self._body()))
        received = 0

        async def limited_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLargeError(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)

    def _body(self) -> dict[str, Any]:
        return error_body(413, f"Request body is larger than the limit of {self.max_bytes} bytes.",
                          "invalid_request_error", code="request_too_large")


class BodyTooLargeError(HTTPException):
    """Raised inside receive() when a body without Content-Length passes the limit; an
    HTTPException so the framework's body parser lets it through to the 413 handler."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"Request body is larger than the limit of {max_bytes} bytes.")
