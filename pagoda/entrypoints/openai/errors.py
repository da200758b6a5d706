"""The OpenAI error envelope and the mapping from exceptions to HTTP statuses (no app here).

Every error body is ``{"error": {"message", "type", "param", "code"}}`` with ``code`` a string
or null. Messages never carry ``repr()`` of internals, file paths or tracebacks: pagoda's own
request errors pass their message through, anything else gets a fixed, generic one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from pagoda.errors import InvalidRequestError, PagodaError

if TYPE_CHECKING:
    import pydantic
    from fastapi.exceptions import RequestValidationError

SERVER_ERROR_MESSAGE = "The server had an error while processing your request."
MAX_MESSAGE_CHARS = 512
MAX_PARAM_CHARS = 128

_DEFAULT_TYPES: Mapping[int, str] = MappingProxyType({
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
    422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
    503: "service_unavailable_error"})


class ErrorInfo(BaseModel):
    """The inside of the envelope; all four keys are always present."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """``{"error": ErrorInfo}``."""

    error: ErrorInfo


def default_error_type(status: int) -> str:
    """OpenAI's ``type`` for an HTTP status."""
    if status in _DEFAULT_TYPES:
        return _DEFAULT_TYPES[status]
    return "server_error" if status >= 500 else "invalid_request_error"


def error_body(status: int, message: str, type: str | None = None, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """The JSON body of an error response."""
    info = ErrorInfo(message=message, type=type or default_error_type(status), param=param,
                     code=code)
    return ErrorResponse(error=info).model_dump()


# --------------------------------------------------------------------------- HTTP-layer errors


class APIError(PagodaError):
    """An error raised by the HTTP layer that knows its status, type and code."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None
    default_message: str = SERVER_ERROR_MESSAGE

    def __init__(self, message: str | None = None, param: str | None = None,
                 retry_after: float | None = None) -> None:
        self.message = message or self.default_message
        super().__init__(self.message)
        self.param = param
        self.retry_after = retry_after


class AuthenticationError(APIError):
    """Missing or wrong API key (401)."""

    status, type, code = 401, "authentication_error", "invalid_api_key"
    default_message = "Invalid or missing API key."


class RequestTooLargeError(APIError):
    """The request body is over the server's byte limit (413)."""

    status, type, code = 413, "invalid_request_error", "request_too_large"
    default_message = "The request body is too large."


class RateLimitedError(APIError):
    """A per-key rate or quota limit was hit (429, retried by clients after Retry-After)."""

    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"
    default_message = "Rate limit reached; retry later."


class ServerOverloadedError(APIError):
    """The server is at capacity or draining (503, retried by clients after Retry-After)."""

    status, type, code = 503, "service_unavailable_error", "server_is_overloaded"
    default_message = "The server is overloaded; retry later."


class ServerShuttingDownError(APIError):
    """The server is draining after SIGTERM (503; retry on another replica)."""

    status, type, code = 503, "service_unavailable_error", "server_shutting_down"
    default_message = "The server is shutting down; retry on another instance."

    def __init__(self, message: str | None = None, retry_after: float = 5.0) -> None:
        super().__init__(message, retry_after=retry_after)


class ServerError(APIError):
    """An unexpected failure (500); its message is always the generic one."""

    def __init__(self) -> None:
        super().__init__(SERVER_ERROR_MESSAGE)


@dataclass(frozen=True, slots=True)
class ErrorKind:
    """How one exception class maps to HTTP: status, type, code, and whether its own
    message is safe to show (else ``message`` is used)."""

    status: int
    type: str
    code: str | None = None
    expose_message: bool = True
    message: str = SERVER_ERROR_MESSAGE


# Keyed by class name and matched along the exception's MRO (most derived first), so the
# engine's exceptions map without this module importing the engine.
_KINDS: Mapping[str, ErrorKind] = MappingProxyType({
    "ContextLengthExceededError": ErrorKind(400, "invalid_request_error",
                                            "context_length_exceeded"),
    "InvalidRequestError": ErrorKind(400, "invalid_request_error"),
    "ModelNotFoundError": ErrorKind(404, "invalid_request_error", "model_not_found",
                                    expose_message=False, message="The model does not exist."),
    "UnknownModelError": ErrorKind(404, "invalid_request_error", "model_not_found"),
    "LoRANotLoadedError": ErrorKind(404, "not_found_error", "lora_not_found"),
    "ModelUnavailableError": ErrorKind(503, "service_unavailable_error", "server_is_overloaded"),
    # a permanent misfit: 4xx so that clients do not retry (OpenAI's retry 409, 429 and 5xx)
    "ModelDoesNotFitError": ErrorKind(400, "invalid_request_error", "model_does_not_fit"),
    "ModelBusyError": ErrorKind(409, "invalid_request_error", "model_busy"),
    "UnsupportedModelError": ErrorKind(400, "invalid_request_error", "model_not_supported",
                                       expose_message=False,
                                       message="The model is not supported by this server."),
    "EngineOverloadedError": ErrorKind(503, "service_unavailable_error", "server_is_overloaded"),
    "EngineDeadError": ErrorKind(503, "service_unavailable_error", expose_message=False,
                                 message="The inference engine is not available."),
    "NotImplementedError": ErrorKind(400, "invalid_request_error", "unsupported",
                                     expose_message=False,
                                     message="This request uses an unsupported feature."),
})
_SERVER_ERROR = ErrorKind(500, "server_error", expose_message=False)


def classify_exception(exc: BaseException) -> ErrorKind:
    """The (status, type, code) an exception maps to; unknown ones are a generic 500."""
    if isinstance(exc, APIError):
        return ErrorKind(exc.status, exc.type, exc.code)
    for cls in type(exc).__mro__:
        kind = _KINDS.get(cls.__name__)
        if kind is not None:
            return kind
    return _SERVER_ERROR


def retry_after_headers(seconds: float | None) -> dict[str, str]:
    """``Retry-After`` (whole seconds) and ``retry-after-ms`` for a 429/503."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return {}
    return {"Retry-After": str(max(1, math.ceil(seconds))),
            "retry-after-ms": str(max(1, int(seconds * 1000)))}


def exception_to_response(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, body, headers) of the error response for an exception."""
    if _is_validation_error(exc):
        return 400, pydantic_error_to_body(exc), {}  # type: ignore[arg-type]
    kind = classify_exception(exc)
    message = _exception_message(exc) if kind.expose_message else kind.message
    param = getattr(exc, "param", None)
    code = getattr(exc, "code", None) or kind.code
    headers: dict[str, str] = {}
    if kind.status in (429, 503):
        headers = retry_after_headers(getattr(exc, "retry_after", None))
    body = error_body(kind.status, message, kind.type, param if isinstance(param, str) else None,
                      code if isinstance(code, str) else None)
    return kind.status, body, headers


def _exception_message(exc: BaseException) -> str:
    message = getattr(exc, "message", None)
    if not isinstance(message, str):
        message = str(exc.args[0]) if exc.args and isinstance(exc.args[0], str) else ""
    return _truncate(message) or SERVER_ERROR_MESSAGE


def _is_validation_error(exc: BaseException) -> bool:
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"ValidationError", "RequestValidationError"}) and hasattr(exc, "errors")


# --------------------------------------------------------------------------- validation errors

# Loc entries pydantic inserts that are not API fields: union members ("str", "list[int]",
# "function-after[...]"), model names of union members ("NamedToolChoice"), markers ("[key]").
_FIELD_NAME = re.compile(r"[a-z_][a-z0-9_]{0,63}\Z")
_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "bytes", "none", "list", "dict", "tuple",
                         "set", "frozenset", "any", "decimal", "literal", "union", "json"})
_REQUEST_PARTS = frozenset({"body", "query", "path", "header", "cookie"})
# Errors that only say "wrong type": a union reports one per member, the useful one is elsewhere.
_TYPE_MISMATCH = frozenset({"string_type", "int_type", "float_type", "bool_type", "list_type",
                            "dict_type", "model_type", "model_attributes_type", "literal_error",
                            "int_from_float", "int_parsing", "float_parsing", "bool_parsing",
                            "none_required", "is_instance_of"})
_BODY_SHAPE = _TYPE_MISMATCH | {"missing"}
_MSG_PREFIXES = ("Value error, ", "Assertion failed, ")


def clean_loc(loc: Sequence[int | str]) -> str | None:
    """A dotted API path (``messages.0.content``) from a pydantic ``loc``, internals removed."""
    parts: list[str] = []
    for i, item in enumerate(loc):
        if isinstance(item, int):
            parts.append(str(item))
        elif i == 0 and item in _REQUEST_PARTS:
            continue
        elif isinstance(item, str) and _FIELD_NAME.match(item) and item not in _TYPE_NAMES:
            parts.append(item)
    path = ".".join(parts)
    return path[:MAX_PARAM_CHARS] or None


def pydantic_error_to_body(
        exc: pydantic.ValidationError | RequestValidationError) -> dict[str, Any]:
    """A 400 body for a request that failed validation, built from ``exc.errors()`` only."""
    errors = list(exc.errors())
    if not errors:
        return error_body(400, "The request is invalid.")
    error = _pick_error(errors)
    if error.get("type") == "json_invalid":
        return error_body(400, _json_message(error))
    wrapped = (error.get("ctx") or {}).get("error")
    if isinstance(wrapped, InvalidRequestError):
        return error_body(400, _truncate(wrapped.message), param=wrapped.param or
                          clean_loc(error.get("loc", ())), code=wrapped.code)
    param = clean_loc(error.get("loc", ()))
    message = _clean_msg(error.get("msg", ""))
    if param and not message.startswith(param.split(".", 1)[0]):
        message = f"{param}: {message}"
    elif error.get("loc") in (("body",), ()) and error.get("type") in _BODY_SHAPE:
        message = "The request body must be a JSON object."
    return error_body(400, _truncate(message), param=param)


def _pick_error(errors: Iterable[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The most useful error of the first field that failed. A union reports one error per
    member, mostly "wrong type": prefer one that says what is wrong with the value, else the
    one from the member that got furthest into the value."""
    errors = list(errors)
    first_field = _top_field(errors[0])
    same_field = [e for e in errors if _top_field(e) == first_field]
    for error in same_field:
        if error.get("type") not in _TYPE_MISMATCH:
            return error
    return max(same_field, key=lambda error: len(clean_loc(error.get("loc", ())) or ""))


def _top_field(error: Mapping[str, Any]) -> str | None:
    param = clean_loc(error.get("loc", ()))
    return param.split(".", 1)[0] if param else None


def _clean_msg(msg: Any) -> str:
    text = msg if isinstance(msg, str) else ""
    for prefix in _MSG_PREFIXES:
        text = text.removeprefix(prefix)
    return text or "Invalid value."


def _json_message(error: Mapping[str, Any]) -> str:
    detail = (error.get("ctx") or {}).get("error")
    if isinstance(detail, str) and 0 < len(detail) <= 100:
        return f"The request body is not valid JSON ({detail})."
    return "The request body is not valid JSON."


def _truncate(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS - 3] + "..."
