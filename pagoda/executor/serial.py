"""msgpack frames between the executor and workers in other processes (never pickle).

The same approach as engine/serial.py: one encoder, and a typed decoder per message type, so a
frame can only become the type asked for, its dataclasses rebuilt through their constructors
(SamplingParams validates again). A malformed frame raises `msgspec.MsgspecError`.

Each executor call is one `WorkerCall` frame to every worker, and every worker answers every
call with one `WorkerReply` in order: its value (raw, decoded by the caller as the type the
method returns) or the error it raised.
"""

from __future__ import annotations

from typing import Any

import msgspec

from pagoda.config import EngineConfig
from pagoda.executor.base import KVCacheSizing, LoadedModelInfo
from pagoda.lora.request import LoRARequest
from pagoda.scheduler.output import ModelRunnerOutput, SchedulerOutput

_encoder = msgspec.msgpack.Encoder()
_config_decoder = msgspec.msgpack.Decoder(EngineConfig)
_scheduler_output_decoder = msgspec.msgpack.Decoder(SchedulerOutput)
_runner_output_decoder = msgspec.msgpack.Decoder(ModelRunnerOutput)


def encode(message: Any) -> bytes:
    """One frame for a step's work (to the workers), its result (back), or a call or reply."""
    return _encoder.encode(message)


def decode_scheduler_output(data: bytes) -> SchedulerOutput:
    return _scheduler_output_decoder.decode(data)


def decode_runner_output(data: bytes) -> ModelRunnerOutput:
    return _runner_output_decoder.decode(data)


# ---- calls and replies ------------------------------------------------------------------------

class PlainCall(msgspec.Struct, tag="call"):
    """A method without arguments (init_device, load_model, sleep, collect_output, ...)."""

    method: str


class InitKVCache(msgspec.Struct, tag="init_kv"):
    num_blocks: int


class ExecuteModel(msgspec.Struct, tag="execute"):
    sched_out: SchedulerOutput


class SampleTokens(msgspec.Struct, tag="sample"):
    """The grammar bitmask as raw int32 bytes of shape [rows, words] (None: no grammar)."""

    bitmask: bytes | None = None
    rows: int = 0
    words: int = 0


class AddLoRA(msgspec.Struct, tag="add_lora"):
    request: LoRARequest


class RemoveLoRA(msgspec.Struct, tag="remove_lora"):
    lora_id: int


WorkerCall = PlainCall | InitKVCache | ExecuteModel | SampleTokens | AddLoRA | RemoveLoRA

PLAIN_METHODS = frozenset({"init_device", "load_model", "determine_kv_cache_size",
                           "capture_decode_graphs", "collect_output", "sleep", "wake_up",
                           "prepare_sleep", "shutdown"})


class WorkerReply(msgspec.Struct):
    """A call's value, or the error it raised (its type's name and message)."""

    value: msgspec.Raw
    error_type: str | None = None
    error: str | None = None


_call_decoder = msgspec.msgpack.Decoder(WorkerCall)
_reply_decoder = msgspec.msgpack.Decoder(WorkerReply)
_NONE = msgspec.Raw(_encoder.encode(None))

RESULT_TYPES: dict[str, Any] = {
    "load_model": LoadedModelInfo, "determine_kv_cache_size": KVCacheSizing,
    "initialize_kv_cache": int, "capture_decode_graphs": bool,
    "collect_output": ModelRunnerOutput | None, "add_lora": int, "wake_up": bool,
    "prepare_sleep": bool,
}
_result_decoders = {name: msgspec.msgpack.Decoder(t) for name, t in RESULT_TYPES.items()}


def method_of(call: WorkerCall) -> str:
    """The Worker method a call runs."""
    if isinstance(call, PlainCall):
        return call.method
    return {InitKVCache: "initialize_kv_cache", ExecuteModel: "execute_model",
            SampleTokens: "sample_tokens", AddLoRA: "add_lora",
            RemoveLoRA: "remove_lora"}[type(call)]


def decode_call(data: bytes) -> WorkerCall:
    call = _call_decoder.decode(data)
    if isinstance(call, PlainCall) and call.method not in PLAIN_METHODS:
        raise msgspec.ValidationError(f"unknown worker method {call.method!r}")
    return call


def encode_reply(value: Any = None, error: BaseException | None = None) -> bytes:
    if error is not None:
        return _encoder.encode(WorkerReply(_NONE, type(error).__name__, str(error)))
    return _encoder.encode(WorkerReply(msgspec.Raw(_encoder.encode(value))))


def decode_reply(data: bytes) -> WorkerReply:
    return _reply_decoder.decode(data)


def decode_value(method: str, raw: msgspec.Raw) -> Any:
    """A reply's value, as the type `method` returns (None for methods that return none)."""
    decoder = _result_decoders.get(method)
    return decoder.decode(raw) if decoder is not None else None


def encode_config(config: EngineConfig) -> bytes:
    return _encoder.encode(config)


def decode_config(data: bytes) -> EngineConfig:
    return _config_decoder.decode(data)
