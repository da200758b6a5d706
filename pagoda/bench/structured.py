"""`pagoda bench structured`: what grammar masking costs, in one process, same tokens.

Every request first runs under an output constraint (a JSON schema by default); then the
same prompts run free, each with max_tokens set to the length its constrained run produced
and ignore_eos, so both runs generate exactly the same number of tokens. The ratio of their
output token rates is the cost of compiling, masking and matching. Prefix caching is off so
the second run gains nothing from the first.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

from pagoda.bench.throughput import (
    ThroughputConfig,
    build_llm,
    environment,
    git_info,
    make_requests,
    warm_up,
)
from pagoda.sampling_params import SamplingParams
from pagoda.structured_output.params import StructuredOutputsParams

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "maxLength": 60},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 4},
        "address": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 30},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "email", "tags", "address"],
    "additionalProperties": False,
}
CONSTRAINTS = {"json-schema": lambda: StructuredOutputsParams(json=json.dumps(PERSON_SCHEMA)),
               "json-object": lambda: StructuredOutputsParams(json_object=True)}


def run_structured(cfg: ThroughputConfig, constraint: str = "json-schema") -> dict[str, Any]:
    cfg = replace(cfg, engine_kwargs={"enable_prefix_caching": False} | cfg.engine_kwargs)
    llm = build_llm(cfg)
    requests = make_requests(cfg, llm.engine.model_info.vocab_size, llm.get_tokenizer())
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    spec = CONSTRAINTS[constraint]()
    warm_up(llm, cfg, requests[0])
    llm.generate(prompts[:1], SamplingParams(max_tokens=4, structured_outputs=spec))

    constrained = [SamplingParams(max_tokens=r.output_len, temperature=cfg.temperature,
                                  seed=cfg.seed + i, structured_outputs=spec,
                                  detokenize=cfg.detokenize) for i, r in enumerate(requests)]
    c_elapsed, c_outputs = _timed(llm, prompts, constrained)
    lengths = [len(o.outputs[0].token_ids) for o in c_outputs]
    free = [SamplingParams(max_tokens=n, temperature=cfg.temperature, seed=cfg.seed + i,
                           ignore_eos=True, detokenize=cfg.detokenize)
            for i, n in enumerate(lengths)]
    f_elapsed, f_outputs = _timed(llm, prompts, free)
    if [len(o.outputs[0].token_ids) for o in f_outputs] != lengths:
        raise RuntimeError("the free run did not generate the constrained run's lengths")
    tokens = sum(lengths)
    return {
        "benchmark": "structured-output-overhead", "model": cfg.model, "constraint": constraint,
        "git": git_info(), "environment": environment(), "command": cfg.command,
        "notes": cfg.notes, "engine_kwargs": cfg.engine_kwargs,
        "workload": {"num_prompts": len(requests), "input_len": cfg.input_len,
                     "max_tokens": cfg.output_len, "output_tokens": tokens,
                     "finished_by_grammar": sum(o.outputs[0].finish_reason == "stop"
                                                for o in c_outputs)},
        "constrained": {"elapsed_s": c_elapsed, "output_tokens_per_s": tokens / c_elapsed},
        "free": {"elapsed_s": f_elapsed, "output_tokens_per_s": tokens / f_elapsed},
        "constrained_over_free": f_elapsed / c_elapsed,
    }


def _timed(llm: Any, prompts: list[dict[str, Any]],
           params: list[SamplingParams]) -> tuple[float, list[Any]]:
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    return time.perf_counter() - start, outputs


def print_result(result: dict[str, Any]) -> None:
    w = result["workload"]
    print(f"{w['num_prompts']} requests, {w['output_tokens']} output tokens each way "
          f"({w['finished_by_grammar']} finished by their grammar)")
    for name in ("constrained", "free"):
        figures = result[name]
        print(f"{name:12s} {figures['output_tokens_per_s']:10.1f} output tok/s "
              f"({figures['elapsed_s']:.2f} s)")
    print(f"constrained / free throughput: {result['constrained_over_free']:.3f}")
