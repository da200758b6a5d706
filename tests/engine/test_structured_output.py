"""Constrained generation on SmolLM2, offline: outputs follow their schema, regex or choice,
and constrained requests share batches with free ones without changing them."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from pagoda import SamplingParams
from pagoda.errors import InvalidRequestError
from pagoda.structured_output.params import StructuredOutputsParams as Spec

SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "person": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 16},
            "address": {"type": "object", "properties": {"city": {"type": "string",
                                                                   "maxLength": 16}},
                        "required": ["city"], "additionalProperties": False}},
            "required": ["name", "address"], "additionalProperties": False}},
        "required": ["person"], "additionalProperties": False},
    "enum": {"type": "object", "properties": {
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
        "size": {"enum": ["S", "M", "L"]}},
        "required": ["color", "size"], "additionalProperties": False},
    "array": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                 "minItems": 1, "maxItems": 3}},
        "required": ["tags"], "additionalProperties": False},
    "bounded numbers": {"type": "object", "properties": {
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "score": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["age", "score"], "additionalProperties": False},
}


def constrained(spec: Spec, max_tokens: int = 80, **kwargs) -> SamplingParams:
    return SamplingParams(**{"max_tokens": max_tokens, "temperature": 0.0,
                             "structured_outputs": spec, **kwargs})


def test_json_schema_outputs_validate(smollm2_llm):
    names = list(SCHEMAS)
    outs = smollm2_llm.generate(
        [f"Reply with JSON ({name}):" for name in names],
        [constrained(Spec(json=json.dumps(SCHEMAS[name])), 100) for name in names])
    for name, out in zip(names, outs, strict=True):
        text = out.outputs[0].text
        assert out.outputs[0].finish_reason == "stop", (name, text)
        jsonschema.validate(json.loads(text), SCHEMAS[name])


def test_json_object_choice_and_regex(smollm2_llm):
    prompts = ["Some JSON:", "Is the sky blue?", "A US phone number:"]
    params = [constrained(Spec(json_object=True), 60),
              constrained(Spec(choice=["yes", "no", "maybe"])),
              constrained(Spec(regex=r"\(\d{3}\) \d{3}-\d{4}"))]
    a, b, c = [o.outputs[0] for o in smollm2_llm.generate(prompts, params)]
    if a.finish_reason == "stop":  # the grammar allows long objects; a finished one parses
        assert isinstance(json.loads(a.text), dict)
    assert b.text in ("yes", "no", "maybe") and b.finish_reason == "stop"
    assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", c.text) and c.finish_reason == "stop"


def test_constraints_mix_with_free_requests_in_one_batch(smollm2_llm):
    free = ["The capital of France is", "1, 2, 3,"]
    greedy = SamplingParams(max_tokens=24, temperature=0.0)
    alone = [o.outputs[0].token_ids for o in smollm2_llm.generate(free, greedy)]
    mixed = smollm2_llm.generate(
        [free[0], "Pick:", free[1], "Digits:"],
        [greedy, constrained(Spec(choice=["left", "right"])), greedy,
         constrained(Spec(regex="[0-9]{6}"), temperature=0.9, seed=3)])
    assert [mixed[0].outputs[0].token_ids, mixed[2].outputs[0].token_ids] == alone
    assert mixed[1].outputs[0].text in ("left", "right")
    assert re.fullmatch("[0-9]{6}", mixed[3].outputs[0].text)


def test_every_sample_of_n_follows_the_constraint(smollm2_llm):
    params = constrained(Spec(choice=["alpha", "beta", "gamma"]), n=4, temperature=1.0, seed=7)
    outs = smollm2_llm.generate(["Pick a letter name:"], params)[0].outputs
    assert len(outs) == 4 and all(o.text in ("alpha", "beta", "gamma") for o in outs)


def test_a_bad_constraint_is_refused_before_queueing(smollm2_llm):
    with pytest.raises(InvalidRequestError, match="regex"):
        smollm2_llm.generate(["x"], constrained(Spec(regex="(unclosed")))
    assert not smollm2_llm.engine.has_unfinished_requests()


def test_a_constraint_the_engine_cannot_compile_ends_that_request_alone(smollm2_llm):
    """Bypassing the frontend's check, a bad constraint reaches the engine: that request
    ends with finish_reason "error" and a reason; the engine keeps serving."""
    from pagoda.request import EngineCoreRequest

    core = smollm2_llm.engine.core
    bad = SamplingParams(max_tokens=4, structured_outputs=Spec(regex="(unclosed"))
    core.add_request(EngineCoreRequest("bad-constraint", [1, 2, 3], bad))
    outputs = []
    while core.has_unfinished_requests():
        outputs += core.step()
    assert [(o.request_id, o.finish_reason) for o in outputs] == [("bad-constraint", "error")]
    ((request_id, error),) = core.take_rejections()
    assert request_id == "bad-constraint" and "regex" in str(error)
    ok = smollm2_llm.generate(["Hi"], SamplingParams(max_tokens=3, temperature=0.0))
    assert len(ok[0].outputs[0].token_ids) == 3
