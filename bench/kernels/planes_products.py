"""Each of an 8B layer's four products alone at one token in 4-bit planes (groups of 128),
against a kernel that only reads the same bytes (the same number of programs, 16-byte loads,
no arithmetic, one store a program) and an empty launch: how much of a product's time is
reading its weights and how much is fixed cost. Each product runs as the split kernel
(`_planes_kernel`) and as the stream-K one (`_planes_stream_kernel`, at `--stream-per-sm`
programs a multiprocessor), with mins and with zero points, the variants alternated in one
process and each checked against the split kernel's products. CUDA-graph medians over LAYERS
copies (more than L2 holds), PDL as the engine launches.

    PYTHONPATH=. python bench/kernels/planes_products.py [--stream-per-sm 2 4 8]
        [--rounds 2] [--output-json P]
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl

from pagoda.layers.dependent_launch import dependent_launch, wait_for_previous_kernel
from pagoda.layers.quantization import triton_group_gemm
from pagoda.layers.quantization.group_gemm import GroupQuantWeight

PROJECTIONS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
               "down": (4096, 14336)}
LAYERS = 8


@triton.jit
def _read_kernel(src_ptr, out_ptr, WORDS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Sum (xor) of WORDS int32 from this program's slice: the bytes read, nothing else."""
    wait_for_previous_kernel(PDL)
    base = src_ptr + tl.program_id(0).to(tl.int64) * WORDS
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    for offset in range(0, WORDS, BLOCK):
        acc ^= tl.load(base + offset + tl.arange(0, BLOCK))
    tl.store(out_ptr + tl.program_id(0), tl.xor_sum(acc, axis=0))


@triton.jit
def _empty_kernel(out_ptr, PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    if tl.program_id(0) == 0:
        tl.store(out_ptr, 1)


def median_us(calls) -> float:
    from triton.testing import do_bench_cudagraph
    return do_bench_cudagraph(calls, rep=200) * 1000


def product_weights(outputs: int, inputs: int, zero_points: bool) -> list[GroupQuantWeight]:
    """LAYERS random weights (seeded: both forms hold the same codes and scales)."""
    generator = torch.Generator(device="cuda").manual_seed(outputs + inputs)
    weights = []
    for _ in range(LAYERS):
        codes = torch.randint(0, 16, (outputs, inputs), device="cuda", dtype=torch.uint8,
                              generator=generator)
        scale = torch.rand(outputs, inputs // 128, device="cuda", generator=generator)
        scale = scale * 2e-3 + 1e-3
        weights.append(GroupQuantWeight(codes, scale, -8 * scale, 128, 4, planes=True,
                                        zero_points=zero_points))
    return weights


def run_as(stream_per_sm: int | None, calls):
    """calls() with the planes' few-token products by the split kernel (None) or by the
    stream-K kernel at that many programs a multiprocessor."""
    shipped = triton_group_gemm.STREAM_PLANES, triton_group_gemm.PLANES_STREAM
    triton_group_gemm.STREAM_PLANES = stream_per_sm is not None
    if stream_per_sm is not None:
        triton_group_gemm.PLANES_STREAM = (*shipped[1][:3], stream_per_sm)
    try:
        return calls()
    finally:
        triton_group_gemm.STREAM_PLANES, triton_group_gemm.PLANES_STREAM = shipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stream-per-sm", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output-json")
    args = parser.parse_args()
    launch = dependent_launch(torch.device("cuda"))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = torch.zeros(sms * 64, dtype=torch.int32, device="cuda")
    rows = []
    empty = median_us(lambda: [_empty_kernel[(sms,)](out, **launch) for _ in range(LAYERS)])
    print(f"empty launch: {empty / LAYERS:.2f} us")
    rows.append({"kernel": "empty", "us": empty / LAYERS})
    kernels = {"split": None, **{f"stream {n}/SM": n for n in args.stream_per_sm}}
    for name, (outputs, inputs) in PROJECTIONS.items():
        x = torch.randn(1, inputs, device="cuda", dtype=torch.bfloat16)
        forms = {form: product_weights(outputs, inputs, form == "zero points")
                 for form in ("mins", "zero points")}
        for form, weights in forms.items():  # each kernel's products against the split one's
            for label, per_sm in kernels.items():
                for weight in weights:
                    got = run_as(per_sm, lambda: triton_group_gemm.group_gemm(x, weight))
                    expected = triton_group_gemm.group_gemm(x, weight).float()
                    error = (got.float() - expected).abs().max() / expected.abs().max()
                    assert error < 1e-2, (name, form, label, error.item())
        first = forms["mins"]
        nbytes = first[0].codes.numel() * 2 + 4 * first[0].scale.numel()
        config = triton_group_gemm.planes_config(1, first[0], sms)
        programs = triton.cdiv(outputs, config["BLOCK_N"]) * config["splits"]
        times = {(form, label): [] for form in forms for label in kernels}
        for _ in range(args.rounds):  # alternated
            for form, label in times:
                weights, per_sm = forms[form], kernels[label]
                times[form, label].append(run_as(per_sm, lambda: median_us(
                    lambda: [triton_group_gemm.group_gemm(x, w) for w in weights])) / LAYERS)
        words = first[0].codes.numel() // 2  # int32 words of codes
        reads = {}
        for grid in (programs, sms * 4):
            per = words // grid // 512 * 512
            reads[grid] = median_us(lambda: [_read_kernel[(grid,)](
                w.codes.view(torch.int32), out, WORDS=per, BLOCK=512, num_warps=4, **launch)
                for w in first]) / LAYERS
        row = {"projection": name, "bytes": nbytes, "splits": config["splits"],
               "programs": programs, "read_same_programs_us": reads[programs],
               "read_4_per_sm_us": reads[sms * 4],
               "products_us": {f"{label}, {form}": us for (form, label), us in times.items()}}
        rows.append(row)
        print(f"{name:8s} {nbytes / 1e6:6.1f} MB {programs:5d} programs: read alone "
              f"{reads[programs]:6.2f} us, read by {sms * 4} programs {reads[sms * 4]:6.2f} us")
        for label, us in row["products_us"].items():
            print(f"    {label:28s} " + " ".join(f"{u:6.2f}" for u in us)
                  + f" us ({nbytes / min(us) / 1e3:5.0f} GB/s at best)")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
