"""A table's lookup in one launch (triton_rows) against GroupQuantWeight's torch decoding of
the same rows, under Triton's CPU interpreter (TRITON_INTERPRET=1 must be set before triton
is imported, hence a subprocess): every layout the kernel takes, with and without the table's
scale, in float32 and float16; and which layouts it takes. On a GPU:
tests/gpu/test_quantized_gpu.py."""

from __future__ import annotations

import json

import pytest
import torch

from pagoda.layers.quantization.group_gemm import FP8, GroupQuantWeight
from tests.utils import compile_for_cuda, interpreter_report

MARKER = "TRITON-ROWS-ERRORS "
# name -> (outputs, inputs, group, bits, mins ("zero points": integer ones; "shared zero":
# 32 in every group, GGUF Q6_K's, its scales in pairs; "centred": mins of -2^(bits - 1)
# times the scale, held without them, GGUF Q8_0's and Q4_0's), planes, step words)
LAYOUTS = {
    "int4-planes-g128-words": (40, 512, 128, 4, True, True, True),
    "int4-planes-g32": (40, 256, 32, 4, True, True, False),
    "int4-planes-zero-points-words": (40, 256, 128, 4, "zero points", True, True),
    "int4-planes-zero-points": (40, 256, 64, 4, "zero points", True, False),
    "int4-planes-no-min": (24, 256, 128, 4, False, True, False),
    "bytes-planes-g16-words": (40, 256, 16, 8, True, True, True),
    "bytes-planes-g16-scale-pairs": (40, 256, 16, 8, "shared zero", True, True),
    "bytes-each-g32": (40, 256, 32, 8, True, False, False),
    "bytes-each-per-row": (40, 160, 160, 8, False, False, False),
    "bytes-each-centred": (40, 256, 32, 8, "centred", False, False),
    "int4-planes-g32-centred": (40, 256, 32, 4, "centred", True, False),
}


def layout_weight(outputs: int, inputs: int, group: int, bits: int, mins: bool | str,
                  planes: bool, words: bool, generator: torch.Generator) -> GroupQuantWeight:
    top = 2 ** bits if bits == 4 or not planes else 64  # byte planes hold up to 7 bits
    codes = torch.randint(0, top, (outputs, inputs), generator=generator)
    scale = (torch.rand(outputs, inputs // group, generator=generator) * 0.01 + 0.001).half()
    if mins == "zero points":
        low = -torch.randint(0, top, scale.shape, generator=generator) * scale.float()
    elif mins == "shared zero":
        low = -32 * scale.float()
    elif mins == "centred":
        low = -2 ** (bits - 1) * scale.float()
    else:
        low = -torch.rand(scale.shape, generator=generator) * 0.05 if mins else None
    weight = GroupQuantWeight(codes, scale.float(), low, group, bits, planes,
                              zero_points=mins == "zero points", step_sums=words)
    assert (weight.scale_pairs is not None) == (mins == "shared zero")
    assert (weight.shared_zero == 2 ** (bits - 1)) == (mins == "centred")
    return weight


def errors() -> dict[str, float]:
    """Per layout, scale and dtype: the largest |kernel - torch| over rows looked up in an
    order with repeats (torch: GroupQuantWeight.rows on CPU, which never takes the kernel)."""
    from pagoda.layers.quantization.triton_rows import looked_up_rows, takes_rows
    generator = torch.Generator().manual_seed(0)
    found = {}
    for name, layout in LAYOUTS.items():
        weight = layout_weight(*layout, generator)
        assert takes_rows(weight), name
        index = torch.tensor([3, 0, layout[0] - 1, 3, 17])
        for scale in (None, 2.5):
            for dtype in (torch.float32, torch.float16):
                got = looked_up_rows(weight, index, scale, dtype)
                expected = weight.rows(index, scale, dtype)
                assert got.dtype == expected.dtype == dtype, name
                found[f"{name}-{scale}-{str(dtype)[6:]}"] = \
                    (got.float() - expected.float()).abs().max().item()
    empty = looked_up_rows(weight, torch.zeros(0, dtype=torch.int64), None, torch.float32)
    found["no-rows"] = float(empty.shape != (0, weight.in_features))
    return found


def test_the_kernel_decodes_rows_as_torch_does_under_the_interpreter():
    found = interpreter_report("tests.layers.quantization.test_triton_rows", MARKER)
    assert len(found) == 4 * len(LAYOUTS) + 1
    assert all(error == 0.0 for error in found.values()), found


def test_the_kernel_takes_planes_and_bytes_but_not_halves_or_float8():
    from pagoda.layers.quantization.triton_rows import takes_rows
    generator = torch.Generator().manual_seed(1)
    halves = layout_weight(40, 192, 64, 4, True, False, False, generator)
    float8 = GroupQuantWeight(torch.randn(40, 256).to(FP8), torch.ones(40, 2), None, 128, 8)
    planes = layout_weight(*LAYOUTS["int4-planes-g32"], generator)
    assert takes_rows(planes) and not takes_rows(halves) and not takes_rows(float8)


@pytest.mark.parametrize(("plane_bits", "words", "zero_points", "shared_zero"), [
    (4, True, False, None), (4, False, True, None), (8, True, False, None),
    (0, False, False, None), (8, True, True, 32)])
def test_the_kernel_compiles_for_hopper(plane_bits, words, zero_points, shared_zero):
    from pagoda.layers.quantization.triton_rows import _rows_kernel
    lows = "*u8" if zero_points and not words else "*fp16"
    compile_for_cuda(_rows_kernel, {
        "codes_ptr": "*u8" if plane_bits == 0 else "*i16",
        "scale_ptr": "*i32" if words else "*fp16", "low_ptr": "*i32" if words else lows,
        "index_ptr": "*i64", "out_ptr": "*bf16", "N": "i32", "K": "i32",
        "table_scale": "fp32"}, {
        "PLANE_BITS": plane_bits, "GROUP": 32 if shared_zero is None else 16, "WORDS": words,
        "HAS_LOW": not zero_points, "ZERO_POINTS": zero_points, "SCALED": True,
        "SHARED_ZERO": shared_zero, "BLOCK": 1024}, 90, num_warps=4)


if __name__ == "__main__":
    print(MARKER + json.dumps(errors()))
