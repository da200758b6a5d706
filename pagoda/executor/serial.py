"""msgpack frames between the executor and workers in other processes (never pickle).

The same approach as engine/serial.py: one encoder, and a typed decoder per message type, so a
frame can only become the type asked for, its dataclasses rebuilt through their constructors
(SamplingParams validates again). A malformed frame raises `msgspec.MsgspecError`.
"""

from __future__ import annotations

import msgspec

from pagoda.scheduler.output import ModelRunnerOutput, SchedulerOutput

_encoder = msgspec.msgpack.Encoder()
_scheduler_output_decoder = msgspec.msgpack.Decoder(SchedulerOutput)
_runner_output_decoder = msgspec.msgpack.Decoder(ModelRunnerOutput)


def encode(message: SchedulerOutput | ModelRunnerOutput) -> bytes:
    """One frame for a step's work (to the workers) or its result (back)."""
    return _encoder.encode(message)


def decode_scheduler_output(data: bytes) -> SchedulerOutput:
    return _scheduler_output_decoder.decode(data)


def decode_runner_output(data: bytes) -> ModelRunnerOutput:
    return _runner_output_decoder.decode(data)
