"""The instructions of the planes kernel's main loop as a Hopper runs them, with no GPU: the
kernel compiled for sm_90 by Triton (its own ptxas, the integer arguments divisible by 16 as
Triton specializes them at run time), disassembled with the cuobjdump Triton ships, and the
loop (from its wait for the step's copies to its branch back) counted by opcode. One step
of the decode tile reads BLOCK_N x 32 int16 of codes (4 x 32 inputs for BLOCK_N outputs);
the figure that matters is bytes of weights per warp instruction, against what the memory
needs: at the roofline's bandwidth an H200 multiprocessor takes 3.82 TB/s / 132 = 29 GB/s,
and its four schedulers issue about 4 x 1.98 G warp instructions a second. Also printed: the
registers a thread and shared memory a program, which bound the programs a multiprocessor
holds.

    PYTHONPATH=. python bench/kernels/sass_census.py [--zero-points] [--block-n 64]
        [--warps 4] [--stages 3] [--weight-by-weight] [--group 128]
        [--bits 4|8] [--factored 0|1|2] [--shared-zero Z]

`--few-tokens LAYOUT` counts the few-token kernel's loop instead (`_few_tokens_kernel` with
8-bit codes in groups of 16, GGUF Q6_K's; in groups of 32 with mins, without (centred: GGUF
Q8_0's, the mins -128 times the scale); or float8 values with a scale a row; the products in
float16 from bfloat16 activations, as the kernel takes 8-bit codes and float8 values), its
tile named by --block-n, --block-t, --warps and --stages; a step is 16 inputs (int8-g16), 32
(int8-g32*) or 128 (fp8-row) of bytes.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pagoda.layers.quantization.group_gemm import (
    BYTE_PLANE_ROWS,
    BYTE_PLANE_STEP,
    PLANE_ROWS,
    PLANE_STEP,
)
from pagoda.layers.quantization.triton_group_gemm import _few_tokens_kernel, _planes_kernel

OPCODE = re.compile(r"^\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


# the W x^T kernels' norm_* arguments (unread: the kernels compiled without a norm)
NO_NORM = {"norm_ptr": "*bf16", "residual_ptr": "*bf16", "residual_out_ptr": "*bf16",
           "squares_ptr": "*fp32", "norm_tiles": "i32", "norm_width": "i32", "norm_eps": "fp32"}


def compile_planes(zero_points: bool, step_sums: bool, block_n: int, warps: int,
                   stages: int, group: int = 128, bits: int = 4, factored: int = 0,
                   shared_zero: int | None = None):
    """The planes kernel compiled for sm_90 at one token (8-token tiles), groups of `group`
    inputs, a 2048-input split of 2 (the 8B gate-up product's), bfloat16 activations;
    step_sums: mins applied to a step's (or in groups smaller than a step, a plane's) sums
    (the kernel's STEP_SUMS), not weight by weight; bits 8: codes in byte planes (its
    PLANE_BITS); factored 1 or 2: a GGUF k-quant's scales held factored (its FACTORED:
    words of sub-scales, and of sub-mins with 2, and a super-block's factor words);
    shared_zero: every group's zero point, the scales in pairs (its SHARED_ZERO,
    with zero points and step sums: GGUF Q6_K's layout, in byte planes in groups of 16)."""
    scales = "*i32" if step_sums else "*fp16"
    lows = "*u8" if zero_points else "*fp16"
    if factored or shared_zero is not None:
        scales, lows = "*i32", "*i32"
    signature = {"x_ptr": "*bf16", "codes_ptr": "*i16", "scale_ptr": scales,
                 "low_ptr": lows, "out_ptr": "*bf16",
                 "partial_ptr": "*fp32", "count_ptr": "*i32", **NO_NORM, "M": "i32",
                 "N": "i32", "stride_xm": "i32", "stride_om": "i32"}
    constants = {"K_SPLIT": 2048, "SPLITS": 2, "GROUP": group,
                 "STEP_IN_GROUP": group % (PLANE_STEP if bits == 4 else BYTE_PLANE_STEP) == 0,
                 "HAS_LOW": not zero_points, "ZERO_POINTS": zero_points,
                 "STEP_SUMS": step_sums, "BLOCK_N": block_n,
                 "BLOCK_T": 8, "DOT": 2, "ASM": True, "PDL": True, "PLANE_BITS": bits,
                 "FACTORED": factored, "SUPER": 256 if factored else 0,
                 "SHARED_ZERO": shared_zero}
    return _compile(_planes_kernel, signature, constants, warps, stages)


# the few-token layouts counted: codes' type, group, step, float8, the product's type (DOT),
# a min a group loaded, the zero point every group shares (int8-g32-centred: GGUF Q8_0's
# codes, their mins -128 times the scale computed, not loaded)
FEW_TOKEN_LAYOUTS = {"int8-g16": ("*u8", 16, 16, False, 3, True, None),
                     "int8-g32": ("*u8", 32, 32, False, 3, True, None),
                     "int8-g32-centred": ("*u8", 32, 32, False, 3, False, 128),
                     "fp8-row": ("*fp8e4nv", 2048, 128, True, 3, False, None)}


def compile_few_tokens(layout: str, block_n: int, block_t: int, warps: int, stages: int):
    """The few-token kernel compiled for sm_90 as compile_planes compiles the planes kernel,
    for one of FEW_TOKEN_LAYOUTS (a scale a row with float8)."""
    codes, group, step, float8, dot, has_low, shared_zero = FEW_TOKEN_LAYOUTS[layout]
    scales = "*fp32" if float8 else "*fp16"
    signature = {"x_ptr": "*bf16", "codes_ptr": codes, "scale_ptr": scales, "low_ptr": scales,
                 "out_ptr": "*bf16", "partial_ptr": "*fp32", "count_ptr": "*i32", **NO_NORM,
                 "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32",
                 "stride_om": "i32"}
    constants = {"K_SPLIT": 2048, "SPLITS": 2, "GROUP": group, "BITS": 8, "FLOAT8": float8,
                 "ROW_SCALE": float8, "HAS_LOW": has_low, "DOT": dot, "E4M3_BYTES": False,
                 "SHARED_ZERO": shared_zero,
                 "BLOCK_N": block_n, "BLOCK_T": block_t, "STEP": step, "PDL": True}
    return _compile(_few_tokens_kernel, signature, constants, warps, stages)


def _compile(kernel, signature: dict, constants: dict, warps: int, stages: int):
    """`kernel` compiled for sm_90, its pointers, N, K and the strides divisible by 16."""
    divisible = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]]
                 for name, kind in signature.items()
                 if kind.startswith("*") or name in ("N", "K", "stride_xm", "stride_om")}
    source = ASTSource(fn=kernel, constexprs=constants, attrs=divisible,
                       signature={**signature, **dict.fromkeys(constants, "constexpr")})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "num_stages": stages})


def cuobjdump(cubin: bytes, option: str = "-sass") -> str:
    """What the cuobjdump Triton ships prints for a compiled kernel's cubin with `option`
    (-sass: its SASS; -res-usage: registers a thread and shared memory)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
        return subprocess.run([tool, option, file.name], capture_output=True, text=True,
                              check=True).stdout


def planes_sass(zero_points: bool, step_sums: bool, block_n: int, warps: int,
                stages: int, group: int = 128, bits: int = 4, factored: int = 0,
                shared_zero: int | None = None) -> str:
    """compile_planes's SASS."""
    return cuobjdump(compile_planes(zero_points, step_sums, block_n, warps, stages,
                                    group, bits, factored, shared_zero).asm["cubin"])


def registers_and_stack(cubin: bytes) -> tuple[int, int]:
    """Registers a thread of a compiled kernel's cubin, and the bytes of stack a thread
    takes (what ptxas spilled, where it was held to fewer registers)."""
    found = re.search(r"REG:(\d+) STACK:(\d+)", cuobjdump(cubin, "-res-usage"))
    return int(found.group(1)), int(found.group(2))


def main_loop_lines(sass: str) -> list[str]:
    """The loop's instructions as disassembled (up to their ';'), from its wait for its
    step's copies (the first DEPBAR.LE with copies still in flight) to its branch back."""
    lines = [line.split(";")[0] for line in sass.splitlines()]
    start = next(i for i, line in enumerate(lines) if re.search(r"DEPBAR\.LE SB0, 0x[1-9a-f]",
                                                                 line))
    end = next(i for i in range(start, len(lines)) if re.search(r"\bBRA\b", lines[i]))
    return lines[start:end + 1]


def main_loop(sass: str) -> list[str]:
    """The opcodes of main_loop_lines."""
    return [m.group(1) for line in main_loop_lines(sass) if (m := OPCODE.match(line))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zero-points", action="store_true")
    parser.add_argument("--weight-by-weight", action="store_true",
                        help="mins applied to each weight (STEP_SUMS off)")
    parser.add_argument("--block-n", type=int, default=64)
    parser.add_argument("--warps", type=int, default=4)
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--group", type=int, default=128, help="inputs a group")
    parser.add_argument("--bits", type=int, choices=(4, 8), default=4,
                        help="8: codes in byte planes")
    parser.add_argument("--factored", type=int, choices=(0, 1, 2), default=0,
                        help="a GGUF k-quant's factored scales: 1 sub-scales (Q6_K), 2 with "
                        "sub-mins (Q4_K)")
    parser.add_argument("--shared-zero", type=int, default=None,
                        help="every group's zero point, the scales in pairs (with "
                        "--zero-points; Q6_K: --bits 8 --group 16 --shared-zero 32)")
    parser.add_argument("--few-tokens", choices=sorted(FEW_TOKEN_LAYOUTS), default=None,
                        help="count the few-token kernel's loop for this layout instead")
    parser.add_argument("--block-t", type=int, default=16, help="(--few-tokens) tokens a tile")
    args = parser.parse_args()
    if args.few_tokens:
        kernel = compile_few_tokens(args.few_tokens, args.block_n, args.block_t, args.warps,
                                    args.stages)
        step_bytes = args.block_n * FEW_TOKEN_LAYOUTS[args.few_tokens][2]  # a byte a code
    else:
        kernel = compile_planes(args.zero_points, not args.weight_by_weight, args.block_n,
                                args.warps, args.stages, args.group,
                                args.bits, args.factored, args.shared_zero)
        rows = PLANE_ROWS if args.bits == 4 else BYTE_PLANE_ROWS
        step_bytes = args.block_n * rows * 2  # int16 codes a program reads a step
    opcodes = main_loop(cuobjdump(kernel.asm["cubin"]))
    counts = collections.Counter(opcodes)
    threads = 32 * args.warps
    warp_instructions = len(opcodes) * args.warps
    print(f"loop: {len(opcodes)} instructions a thread a step, {warp_instructions} a program "
          f"({threads} threads) for {step_bytes} bytes of codes: "
          f"{step_bytes / warp_instructions:.2f} bytes a warp instruction")
    print("  " + ", ".join(f"{op} {n}" for op, n in counts.most_common()))
    registers, stack = registers_and_stack(kernel.asm["cubin"])
    print(f"  {registers} registers a thread ({stack} bytes of stack), "
          f"{kernel.metadata.shared} bytes of shared memory a program")


if __name__ == "__main__":
    main()
