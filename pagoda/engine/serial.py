"""Typed msgpack messages between the frontend and the engine process (never pickle).

Every message that crosses the process boundary is one msgspec Struct of a tagged union,
encoded as one msgpack frame. Decoding is typed (`msgspec.msgpack.Decoder(type=...)`), so a
frame can only ever become one of the types below; dataclass payloads are rebuilt through
their constructors, which re-runs `SamplingParams.__post_init__` validation. A malformed or
invalid frame raises `msgspec.MsgspecError` (`DecodeError` / `ValidationError`), which every
receiver catches: a bad frame is dropped or answered, it never kills the process.
"""

from __future__ import annotations

from typing import Any

import msgspec

from pagoda.core_outputs import EngineCoreOutput, SchedulerStats
from pagoda.engine.model_info import ModelInfo
from pagoda.request import EngineCoreRequest

# Utility methods the client may call on the engine, and the type each one returns.
UTILITY_METHODS: dict[str, Any] = {
    "reset_prefix_cache": bool,
    "stats": SchedulerStats,
    "sleep": float,
    "prepare_sleep": bool,
    "wake_up": float,
    "is_sleeping": bool,
    "add_lora": int,
    "remove_lora": bool,
    "list_loras": list[str],
}

UtilityArg = bool | int | float | str | None


# ---- frontend -> engine ----------------------------------------------------------------------
class AddRequest(msgspec.Struct, tag="add"):
    """Queue one validated request."""

    request: EngineCoreRequest


class AbortRequests(msgspec.Struct, tag="abort"):
    """End these requests now and free their blocks (unknown ids are ignored)."""

    request_ids: list[str]


class UtilityCall(msgspec.Struct, tag="call"):
    """Run one of UTILITY_METHODS; answered by a UtilityResult with the same call_id."""

    call_id: int
    method: str
    args: list[UtilityArg] = []


class Shutdown(msgspec.Struct, tag="shutdown"):
    """Leave the engine loop and exit with status 0."""


EngineInput = AddRequest | AbortRequests | UtilityCall | Shutdown


# ---- engine -> frontend ----------------------------------------------------------------------
class Ready(msgspec.Struct, tag="ready"):
    """The model is loaded and the engine loop is about to start."""

    model_info: ModelInfo


class StartupFailed(msgspec.Struct, tag="startup_error"):
    """Loading raised; the engine process exits right after sending this."""

    error_type: str
    message: str


class RequestError(msgspec.Struct):
    """Why the engine rejected one incoming message (request_id None: not attributable)."""

    request_id: str | None
    error_type: str
    message: str


class EngineCoreOutputs(msgspec.Struct, tag="outputs"):
    """One engine step's outputs, the scheduler counters after it, and rejected requests.

    A rejected request also appears in `outputs` as an EngineCoreOutput with no tokens and
    finish_reason "error", so a consumer that only reads `outputs` still ends its stream;
    `errors` says why. `timestamp` is `time.monotonic()` in the engine process (the same
    system-wide clock as `EngineCoreRequest.arrival_time` on Linux).
    """

    outputs: list[EngineCoreOutput]
    stats: SchedulerStats
    timestamp: float
    errors: list[RequestError] = []


class UtilityResult(msgspec.Struct, tag="result"):
    """The answer to one UtilityCall: `result` stays raw until the caller decodes it by type."""

    call_id: int
    result: msgspec.Raw
    error: str | None = None


class EngineDead(msgspec.Struct, tag="dead"):
    """The engine hit a fatal error and is exiting."""

    message: str


EngineOutput = Ready | StartupFailed | EngineCoreOutputs | UtilityResult | EngineDead

_encoder = msgspec.msgpack.Encoder()
_input_decoder = msgspec.msgpack.Decoder(EngineInput)
_output_decoder = msgspec.msgpack.Decoder(EngineOutput)
_result_decoders = {name: msgspec.msgpack.Decoder(t) for name, t in UTILITY_METHODS.items()}
_NONE = msgspec.Raw(_encoder.encode(None))


def encode(message: Any) -> bytes:
    """One frame for any message above (or an EngineConfig)."""
    return _encoder.encode(message)


def decode_input(data: bytes) -> EngineInput:
    """Raises msgspec.MsgspecError on a malformed or invalid frame."""
    return _input_decoder.decode(data)


def decode_output(data: bytes) -> EngineOutput:
    """Raises msgspec.MsgspecError on a malformed or invalid frame."""
    return _output_decoder.decode(data)


def make_result(call_id: int, value: Any = None, error: str | None = None) -> UtilityResult:
    raw = _NONE if error is not None else msgspec.Raw(_encoder.encode(value))
    return UtilityResult(call_id, raw, error)


def decode_result(method: str, result: msgspec.Raw) -> Any:
    """A utility call's return value, decoded as the type UTILITY_METHODS names for it."""
    return _result_decoders[method].decode(result)


def request_id_of(data: bytes) -> str | None:
    """Best effort: the request id inside an undecodable AddRequest frame, for the error report."""
    try:
        message = msgspec.msgpack.decode(data)
    except msgspec.MsgspecError:
        return None
    request = message.get("request") if isinstance(message, dict) else None
    request_id = request.get("request_id") if isinstance(request, dict) else None
    return request_id if isinstance(request_id, str) else None
