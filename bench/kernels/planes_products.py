"""Each of an 8B layer's four products alone at one token in 4-bit planes (groups of 128),
against a kernel that only reads the same bytes (the same number of programs, 16-byte loads,
no arithmetic, one store a program) and an empty launch: how much of a product's time is
reading its weights and how much is fixed cost. Each product runs in each of FORMS (mins
applied weight by weight or to a step's sums, zero points), alternated in one process. The
read kernel runs at the product's program count and at 4 a multiprocessor, with its
programs' slices end to end (most of these shapes then put them a power of two bytes
apart) and with 512 words between them. CUDA-graph medians over
LAYERS copies (more than L2 holds), PDL as the engine launches.

    PYTHONPATH=. python bench/kernels/planes_products.py [--rounds 2] [--output-json P]

`--eager PROJECTION` only calls that product three times outside graphs (for a profiler:
`bash bench/gpu/run.sh profile-planes`).
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
def _read_kernel(src_ptr, out_ptr, WORDS: tl.constexpr, STRIDE: tl.constexpr,
                 BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Sum (xor) of WORDS int32 from this program's slice (STRIDE words after the previous
    program's): the bytes read, nothing else."""
    wait_for_previous_kernel(PDL)
    base = src_ptr + tl.program_id(0).to(tl.int64) * STRIDE
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


# how a product's mins are held and applied: as mins or integer zero points, to each
# weight (no step words) or to a step's sums (the default)
FORMS = {"mins, weight by weight": (False, False), "mins, step sums": (False, True),
         "zero points, step sums": (True, True)}


def product_weights(outputs: int, inputs: int, zero_points: bool,
                    step_sums: bool = True) -> list[GroupQuantWeight]:
    """LAYERS random weights (seeded: every form holds the same codes and scales)."""
    generator = torch.Generator(device="cuda").manual_seed(outputs + inputs)
    weights = []
    for _ in range(LAYERS):
        codes = torch.randint(0, 16, (outputs, inputs), device="cuda", dtype=torch.uint8,
                              generator=generator)
        scale = torch.rand(outputs, inputs // 128, device="cuda", generator=generator)
        scale = scale * 2e-3 + 1e-3
        weights.append(GroupQuantWeight(codes, scale, -8 * scale, 128, 4, planes=True,
                                        zero_points=zero_points, step_sums=step_sums))
    return weights


def read_us(weights: list[GroupQuantWeight], grid: int, stride_pad: int, out, launch) -> float:
    """The read kernel over each weight's codes by `grid` programs, the slices `stride_pad`
    words more than their length apart (the same words read either way)."""
    words = weights[0].codes.numel() // 2  # int32 words of codes
    per = (words // grid - stride_pad) // 512 * 512
    return median_us(lambda: [_read_kernel[(grid,)](
        w.codes.view(torch.int32), out, WORDS=per, STRIDE=per + stride_pad, BLOCK=512,
        num_warps=4, **launch) for w in weights]) / LAYERS


def call_eagerly(outputs: int, inputs: int, calls: int = 3) -> None:
    """One product with mins at one token, `calls` times, outside graphs."""
    weight = product_weights(outputs, inputs, zero_points=False)[0]
    x = torch.randn(1, inputs, device="cuda", dtype=torch.bfloat16)
    for _ in range(calls):
        triton_group_gemm.group_gemm(x, weight)
    torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output-json")
    parser.add_argument("--eager", choices=sorted(PROJECTIONS))
    args = parser.parse_args()
    if args.eager:
        call_eagerly(*PROJECTIONS[args.eager])
        return
    launch = dependent_launch(torch.device("cuda"))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = torch.zeros(sms * 64, dtype=torch.int32, device="cuda")
    rows = []
    empty = median_us(lambda: [_empty_kernel[(sms,)](out, **launch) for _ in range(LAYERS)])
    print(f"empty launch: {empty / LAYERS:.2f} us")
    rows.append({"kernel": "empty", "us": empty / LAYERS})
    for name, (outputs, inputs) in PROJECTIONS.items():
        x = torch.randn(1, inputs, device="cuda", dtype=torch.bfloat16)
        variants = {form: product_weights(outputs, inputs, *held)
                    for form, held in FORMS.items()}
        first = variants["mins, weight by weight"]
        nbytes = first[0].codes.numel() * 2 + 4 * first[0].scale.numel()  # (+ mins)
        config = triton_group_gemm.planes_config(1, first[0], sms)
        programs = triton.cdiv(outputs, config["BLOCK_N"]) * config["splits"]
        times = {variant: [] for variant in variants}
        for _ in range(args.rounds):  # alternated
            for variant, weights in variants.items():
                times[variant].append(median_us(
                    lambda: [triton_group_gemm.group_gemm(x, w) for w in weights]) / LAYERS)
        reads = {f"{grid} programs, {stride_pad} words between slices": read_us(
                     first, grid, stride_pad, out, launch)
                 for grid in (programs, sms * 4) for stride_pad in (0, 512)}
        row = {"projection": name, "bytes": nbytes, "splits": config["splits"],
               "programs": programs, "reads_us": reads, "products_us": times}
        rows.append(row)
        print(f"{name:8s} {nbytes / 1e6:6.1f} MB {programs:5d} programs")
        for label, us in {**row["products_us"], **{f"read, {k}": [v] for k, v in
                                                     reads.items()}}.items():
            print(f"    {label:44s} " + " ".join(f"{u:6.2f}" for u in us)
                  + f" us ({nbytes / min(us) / 1e3:5.0f} GB/s at best)")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
