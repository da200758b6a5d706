"""What the GPU benchmark adds: transformers' continuous batching as a reference, the
fraction of wall time the GPU is busy, single-stream decode latency, and roofline bounds."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from pagoda.bench.datasets import BenchRequest
from pagoda.bench.roofline import (
    Ceilings,
    HeldWeights,
    ModelShape,
    decode_step_floor,
    measure_ceilings,
    workload_floor,
)


def run_hf_continuous_batching(model: Any, requests: list[BenchRequest], temperature: float,
                               figures_cls: type) -> Any:
    """The workload through transformers' generate_batch (its continuous batching)."""
    from transformers import GenerationConfig

    longest = max(r.output_len for r in requests)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else \
        {"do_sample": False}
    gen = GenerationConfig(max_new_tokens=longest, eos_token_id=None, pad_token_id=0,
                           **sampling)
    inputs = [r.prompt_token_ids for r in requests]
    warm = GenerationConfig(max_new_tokens=4, eos_token_id=None, pad_token_id=0, do_sample=False)
    model.generate_batch(inputs[:2], generation_config=warm)
    start = time.perf_counter()
    outputs = model.generate_batch(inputs, generation_config=gen)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    results = sorted(outputs.values(), key=lambda o: int(str(o.request_id).rsplit("_", 1)[-1]))
    failed = [o.request_id for o in results if o.error or not o.generated_tokens]
    if len(results) != len(requests) or failed:
        raise RuntimeError(f"transformers generate_batch failed {len(failed)} requests")
    useful = sum(min(len(o.generated_tokens), r.output_len) for o, r in zip(results, requests))
    return figures_cls("hf-cb", elapsed, len(requests),
                       sum(len(r.prompt_token_ids) for r in requests), useful)


def gpu_busy_fraction(run: Callable[[], Any]) -> dict[str, float]:
    """Runs `run` under the profiler; the union of kernel intervals over the wall time."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    intervals = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start)
    busy_us, cur_start, cur_end = 0.0, None, None
    for s, e in intervals:
        if cur_end is None or s > cur_end:
            if cur_end is not None:
                busy_us += cur_end - cur_start
            cur_start, cur_end = s, e
        else:
            cur_end = max(cur_end, e)
    if cur_end is not None:
        busy_us += cur_end - cur_start
    return {"gpu_busy_s": busy_us / 1e6, "wall_s": wall, "gpu_busy_fraction": busy_us / 1e6 / wall}


def single_stream_latency(llm: Any, request: BenchRequest) -> dict[str, float]:
    """TTFT and time per output token of one request alone (streamed): the mean over the
    decode, and the median and slowest gap between outputs (a mean raised by a few slow
    steps shows as a max far above the median)."""
    from pagoda.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=request.output_len, ignore_eos=True,
                            detokenize=False)
    stamps, start = [], time.perf_counter()
    for out in llm.stream({"prompt_token_ids": request.prompt_token_ids}, params):
        stamps.append((time.perf_counter(), len(out.outputs[0].token_ids)))
    return {"ttft_s": stamps[0][0] - start, **decode_gaps(stamps),
            "output_tokens": stamps[-1][1]}


def decode_gaps(stamps: list[tuple[float, int]]) -> dict[str, float]:
    """From (time, tokens so far) at each streamed output after the first: the mean time
    per token, and the median and largest time per token between consecutive outputs."""
    decode_tokens = stamps[-1][1] - stamps[0][1]
    gaps = sorted((t1 - t0) / (n1 - n0)
                  for (t0, n0), (t1, n1) in zip(stamps, stamps[1:]) if n1 > n0)
    if not gaps:
        return {"tpot_s": 0.0, "tpot_median_s": 0.0, "tpot_max_s": 0.0}
    return {"tpot_s": (stamps[-1][0] - stamps[0][0]) / decode_tokens,
            "tpot_median_s": gaps[len(gaps) // 2], "tpot_max_s": gaps[-1]}


def model_shape(hf_config: Any, dtype: torch.dtype, held: HeldWeights | None,
                kv_dtype: torch.dtype | None = None, float8: bool = False) -> ModelShape:
    """The roofline's shape of the model; `held`: the weights of a quantized model as
    the engine holds them (None: the model dtype's bytes); `kv_dtype`: the KV cache's
    element type (None: the model dtype); `float8`: its weights are float8 (an FP8
    model's), their products counted at the float8 rate."""
    shape = ModelShape.from_config(hf_config, dtype)
    if kv_dtype is not None:
        shape = shape.with_kv_dtype(kv_dtype)
    if float8:
        shape = shape.with_float8_products(hf_config)
    return shape if held is None else shape.holding(held, hf_config)


def bounds(hf_config: Any, dtype: torch.dtype, device: torch.device,
           requests: list[BenchRequest], max_batch: int,
           held: HeldWeights | None = None, kv_dtype: torch.dtype | None = None,
           float8: bool = False) -> dict[str, Any]:
    """Measured ceilings and this workload's floor (and the single-stream decode floor);
    `float8`: model_shape's, and the float8 products' rate measured too."""
    ceil = measure_ceilings(device, dtype, float8)
    shape = model_shape(hf_config, dtype, held, kv_dtype, float8)
    floor = workload_floor(shape, ceil, [len(r.prompt_token_ids) for r in requests],
                           [r.output_len for r in requests], max_batch)
    first = requests[0]
    mid_context = len(first.prompt_token_ids) + first.output_len // 2
    float8_rate = ceil.float8_matmul_flops
    return {"device": ceil.device, "bandwidth_gb_s": ceil.bandwidth / 1e9,
            "matmul_tflops": ceil.matmul_flops / 1e12,
            "float8_matmul_tflops": float8_rate / 1e12 if float8_rate else None,
            "max_batch": max_batch, "weight_gb_per_step": shape.weight_bytes_read / 1e9,
            "kv_bytes_per_token": shape.kv_bytes_per_token, "workload_floor": floor,
            "decode1_tpot_floor_s": decode_step_floor(shape, ceil, [mid_context])}


def ceilings_of(found: dict[str, Any]) -> Ceilings:
    """The ceilings `bounds` measured, from its figures."""
    float8_tflops = found.get("float8_matmul_tflops")
    return Ceilings(found["device"], found["bandwidth_gb_s"] * 1e9,
                    found["matmul_tflops"] * 1e12,
                    float8_tflops * 1e12 if float8_tflops else None)


def subset_floor(hf_config: Any, dtype: torch.dtype, ceil: Ceilings,
                 requests: list[BenchRequest], max_batch: int,
                 held: HeldWeights | None = None, kv_dtype: torch.dtype | None = None,
                 float8: bool = False) -> float:
    shape = model_shape(hf_config, dtype, held, kv_dtype, float8)
    return workload_floor(shape, ceil, [len(r.prompt_token_ids) for r in requests],
                          [r.output_len for r in requests], max_batch)["total_s"]
