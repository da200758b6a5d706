"""Microbenchmark of the fused MoE layer on CUDA against a dense SwiGLU layer of the same active
size, measured in one run (default shape: Qwen3-30B-A3B's, hidden 2048, 128 experts of 768,
top 8; the dense layer has intermediate 8 x 768).

For each token count: the MoE layer as the models run it (`FusedMoE.forward_with_router`: the
router's product, top-k, grouping, both grouped GEMMs, the top-k sum) and the dense layer
(cuBLAS gate/up, SiLU-and-mul, cuBLAS down), each captured in a CUDA graph
(triton.testing.do_bench_cudagraph medians); their ratio; the expert bytes the MoE layer
must read (the distinct experts its tokens picked) over its time, as a fraction of the
device-copy bandwidth measured in the same run. `--codes LAYOUT...` times beside them the
same layer with its experts held as codes (`FusedMoE.quantize_experts`): `float8` (a scale
a row, as `--quantization fp8` holds them, weight-only; `--float8` is the same), `float8-tc`
(the same on FP8 tensor cores, the activations quantized a row: the default since it was
timed, `PAGODA_MOE_FP8_FROM`), `int4-g128` (AWQ's and
GPTQ's 4 bits in groups of 128), `int4-g32` (GGUF Q4_K's), `int8-g32` (Q8_0's): each one's
time, its speed-up over the bf16 layer and its rate of the codes' bytes (scales and lows
left out). `--profile N` prints the kernel table of the MoE layer at N tokens
(torch.profiler; of the first layout's layer with `--codes`).

    PYTHONPATH=. python bench/kernels/moe_bench.py [--shape mixtral] [--codes float8 int4-g128]
        [--output-json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone

import torch
from torch.nn import functional as F
from triton.testing import do_bench_cudagraph

from pagoda.bench.roofline import measure_ceilings
from pagoda.layers.fused import silu_and_mul
from pagoda.layers.linear import ReplicatedLinear
from pagoda.layers.moe import triton_moe
from pagoda.layers.moe.layer import FusedMoE
from pagoda.layers.moe.triton_moe import moe_config

SHAPES = {  # hidden, one expert's intermediate, experts, top_k
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "mixtral-8x7b": (4096, 14336, 8, 2),
}
TOKENS = [1, 2, 4, 8, 16, 64, 256, 1024, 4096, 8192]
# each --codes layout: FusedMoE.quantize_experts' argument, and the codes' bytes a weight
CODES = {"float8": (None, 1.0), "float8-tc": (None, 1.0), "int4-g128": ((4, 128), 0.5),
         "int4-g32": ((4, 32), 0.5), "int8-g32": ((8, 32), 1.0)}


def moe_layer(hidden: int, inter: int, experts: int, top_k: int, codes: str | None = None):
    layer = FusedMoE(experts, top_k, hidden, inter, renormalize=True).cuda().to(torch.bfloat16)
    torch.nn.init.normal_(layer.gate_up_proj, std=hidden ** -0.5)
    torch.nn.init.normal_(layer.down_proj, std=inter ** -0.5)
    if codes is not None:
        layer.quantize_experts(CODES[codes][0])
    router = ReplicatedLinear(hidden, experts).cuda().to(torch.bfloat16)
    torch.nn.init.normal_(router.weight, std=0.02)
    tensor_cores_from = 1 if codes == "float8-tc" else None
    return lambda x: _fp8_tensor_cores_from(tensor_cores_from, layer.forward_with_router, x,
                                            router)


def _fp8_tensor_cores_from(tokens: int | None, call, *args):
    """call(*args) with float8 experts' calls of `tokens` or more on FP8 tensor cores (None:
    none, weight-only; PAGODA_MOE_FP8_FROM)."""
    saved = triton_moe.FP8_TENSOR_CORES_FROM
    triton_moe.FP8_TENSOR_CORES_FROM = tokens
    try:
        return call(*args)
    finally:
        triton_moe.FP8_TENSOR_CORES_FROM = saved


def dense_layer(hidden: int, inter: int):
    gate_up = torch.randn(2 * inter, hidden, device="cuda", dtype=torch.bfloat16) * 0.02
    down = torch.randn(hidden, inter, device="cuda", dtype=torch.bfloat16) * 0.02
    return lambda x: F.linear(silu_and_mul(F.linear(x, gate_up)), down)


def distinct_experts(tokens: int, experts: int, top_k: int) -> float:
    """Expected distinct experts per step under uniform routing (the random router's)."""
    return experts * (1 - (1 - top_k / experts) ** tokens)


def profile(fn, x: torch.Tensor) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    for _ in range(3):
        fn(x)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            fn(x)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))


def _codes_row(name: str, layer, x: torch.Tensor, bf16_ms: float, read: float,
               bandwidth: float) -> dict:
    """The layer with experts held as `name` codes timed at x, against the bf16 layer, and
    its rate of `read` bytes of codes (their scales left out), keyed by the layout's name
    (float8_us, bf16_over_float8, ...)."""
    ms = do_bench_cudagraph(lambda: layer(x), rep=200)
    rate = read / (ms / 1e3)
    print(f"{'':>7} {name} experts {ms * 1e3:>9.1f} us: {bf16_ms / ms:.2f}x the bf16 layer, "
          f"{rate / 1e9:.0f} GB/s of codes ({rate / bandwidth:.0%} of copy)")
    return {f"{name}_us": ms * 1e3, f"bf16_over_{name}": bf16_ms / ms,
            f"{name}_expert_gb_s": rate / 1e9, f"{name}_fraction_of_copy": rate / bandwidth}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-30b-a3b")
    parser.add_argument("--tokens", type=int, nargs="*", default=TOKENS)
    parser.add_argument("--profile", type=int, default=None, metavar="TOKENS")
    parser.add_argument("--codes", nargs="*", choices=sorted(CODES), default=[],
                        help="also the layer with its experts held as these codes")
    parser.add_argument("--float8", action="store_true", help="--codes float8")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    layouts = list(dict.fromkeys(args.codes + ["float8"] * args.float8))
    if not torch.cuda.is_available():
        print("moe_bench needs a CUDA device", file=sys.stderr)
        return 2
    hidden, inter, experts, top_k = SHAPES[args.shape]
    torch.manual_seed(0)
    moe = moe_layer(hidden, inter, experts, top_k)
    dense = dense_layer(hidden, top_k * inter)
    held = {name: moe_layer(hidden, inter, experts, top_k, name) for name in layouts}
    if args.profile:
        profile(held[layouts[0]] if layouts else moe,
                torch.randn(args.profile, hidden, device="cuda", dtype=torch.bfloat16))
        return 0
    bandwidth = measure_ceilings(torch.device("cuda")).bandwidth
    expert_bytes = 3 * hidden * inter * 2
    rows = []
    print(f"{args.shape}: hidden {hidden}, {experts} experts of {inter}, top {top_k}; "
          f"dense layer of intermediate {top_k * inter}; copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    print(f"{'tokens':>7} {'moe us':>9} {'dense us':>9} {'moe/dense':>9} {'expert GB/s':>11} "
          f"{'of copy':>8}  config")
    for tokens in args.tokens:
        x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
        moe_ms = do_bench_cudagraph(lambda x=x: moe(x), rep=200)
        dense_ms = do_bench_cudagraph(lambda x=x: dense(x), rep=200)
        read = distinct_experts(tokens, experts, top_k) * expert_bytes
        rate = read / (moe_ms / 1e3)
        config = moe_config(tokens, top_k, experts)
        rows.append({"tokens": tokens, "moe_us": moe_ms * 1e3, "dense_us": dense_ms * 1e3,
                     "moe_over_dense": moe_ms / dense_ms, "expert_gb_s": rate / 1e9,
                     "fraction_of_copy": rate / bandwidth, "config": str(config)})
        print(f"{tokens:>7} {moe_ms * 1e3:>9.1f} {dense_ms * 1e3:>9.1f} {moe_ms / dense_ms:>9.2f} "
              f"{rate / 1e9:>11.0f} {rate / bandwidth:>8.0%}  {config}")
        for name, layer in held.items():
            rows[-1] |= _codes_row(name, layer, x, moe_ms, read / 2 * CODES[name][1],
                                   bandwidth)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"shape": args.shape, "device": torch.cuda.get_device_name(),
                       "bandwidth_gb_s": bandwidth / 1e9, "rows": rows,
                       "date": datetime.now(timezone.utc).isoformat()}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
