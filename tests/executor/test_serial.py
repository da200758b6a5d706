"""A step's work and its result cross to worker processes as msgpack frames: both come back
equal to what was sent, and a frame that is not a valid step is refused."""

from __future__ import annotations

import msgspec
import pytest

from pagoda.config import CacheConfig, EngineConfig
from pagoda.executor import serial
from pagoda.sampling_params import SamplingParams
from pagoda.scheduler.output import (
    CachedRequestData,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)
from pagoda.structured_output.params import StructuredOutputsParams


def mixed_step() -> SchedulerOutput:
    """New and running requests, a preemption, a finish and a constrained row."""
    constrained = SamplingParams(max_tokens=8, temperature=0.7, top_p=0.9, seed=3,
                                 logit_bias={17: -2.5}, stop=["\n"], logprobs=2,
                                 structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
    return SchedulerOutput(
        new_requests=[
            NewRequestData("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=4), 2, [[1, 2]], 0),
            NewRequestData("b", [9] * 20, constrained, None, [[3, 4, 5], [0, 10, 11]], 16)],
        cached_requests=[CachedRequestData("c", [[6], [12]], 31), CachedRequestData("h", [], 9),
                         CachedRequestData("d", [[7, 8]], 0, resumed_from_preemption=True)],
        num_scheduled_tokens={"a": 5, "b": 4, "c": 1, "h": 1, "d": 12},
        total_num_scheduled_tokens=23,
        preempted_request_ids={"e"},
        finished_request_ids={"f", "g"},
        grammar_rows={"b": 0})


def test_a_scheduler_output_round_trips():
    step = mixed_step()
    decoded = serial.decode_scheduler_output(serial.encode(step))
    assert decoded == step
    assert isinstance(decoded.new_requests[1].sampling_params, SamplingParams)
    assert decoded.new_requests[1].sampling_params.structured_outputs.choice == ["yes", "no"]
    assert decoded.preempted_request_ids == {"e"}  # sets stay sets


def test_an_empty_step_round_trips():
    assert serial.decode_scheduler_output(serial.encode(SchedulerOutput())) == SchedulerOutput()


def test_a_runner_output_round_trips():
    out = ModelRunnerOutput(sampled_token_ids={"a": [7], "b": [3]},
                            logprobs={"a": ([[7, 1]], [[-0.25, -1.5]], [1])},
                            prompt_logprobs={"b": ([[4], [5]], [[-2.0], [-0.5]], [3, 1])})
    assert serial.decode_runner_output(serial.encode(out)) == out


def test_invalid_sampling_params_in_a_frame_are_refused():
    """The decoder rebuilds SamplingParams through its constructor, which validates."""
    frame = msgspec.msgpack.encode({"new_requests": [{
        "request_id": "x", "prompt_token_ids": [1], "sampling_params": {"temperature": -1.0},
        "eos_token_id": None, "block_ids": [[1]], "num_computed_tokens": 0}]})
    with pytest.raises(msgspec.MsgspecError):
        serial.decode_scheduler_output(frame)
    with pytest.raises(msgspec.MsgspecError):
        serial.decode_scheduler_output(b"\xc1")


def test_config_round_trips():
    config = EngineConfig(model="/m", dtype="float32", max_model_len=77,
                          cache=CacheConfig(block_size=8, kv_cache_memory=1 << 20))
    assert serial.decode_config(serial.encode_config(config)) == config
