"""Long calls on codes in planes decode the weights and multiply with cuBLAS: the decoding
kernel writes exactly GroupQuantWeight.dequantize's weights (under Triton's CPU interpreter,
in a subprocess: TRITON_INTERPRET=1 must be set before triton is imported) for 4-bit planes
and byte planes, with mins, zero points, no min and step words, slice by slice; the product
through it equals the dense one, and group_gemm takes it past the threshold; and the kernel
compiles for sm_90. Real sizes run on the GPU in tests/gpu/test_quantized_gpu.py."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn import functional as F

from tests.layers.quantization.test_group_gemm import byte_plane_weight, random_weight
from tests.utils import compile_for_cuda, interpreter_report

MARKER = "PLANE_DECODE_ERRORS "
# name -> (bits, outputs, inputs, group, with a min (or "zero points", or "shared zero":
# GGUF Q6_K's 32 in every group, the scales in pairs), step words)
CASES = {
    "nibbles-g128-mins": (4, 384, 512, 128, True, True),
    "nibbles-g128-mins-scale-tensors": (4, 384, 512, 128, True, False),
    "nibbles-g128-zero-points": (4, 256, 384, 128, "zero points", True),
    "nibbles-g32-mins": (4, 200, 256, 32, True, True),  # a last slice narrower than a block
    "nibbles-g64-no-min": (4, 256, 256, 64, False, True),
    "bytes-g16-mins": (8, 384, 256, 16, True, True),
    "bytes-g32-zero-points": (8, 256, 256, 32, "zero points", True),
    "bytes-g16-no-min": (8, 136, 128, 16, False, False),
    "bytes-g16-scale-pairs": (8, 256, 256, 16, "shared zero", True),
}
SLICE_OUTPUTS = 128  # the slices the product decodes here: several a weight


def case_weight(name: str, generator: torch.Generator):
    bits, outputs, inputs, group, with_min, words = CASES[name]
    if bits == 8:
        weight = byte_plane_weight(outputs, inputs, group, with_min, generator, words)
    else:
        weight = random_weight(outputs, inputs, group, 4, with_min, False, generator,
                               planes=True, step_sums=words)
    assert weight.holds_zero_points == (with_min in ("zero points", "shared zero"))
    assert (weight.step_words is not None or weight.scale_pairs is not None) == words
    return weight


def decode_errors() -> dict[str, float]:
    """For every case and activation type: the largest difference between the decoded
    weights and `dequantize`'s (whole and from output 64 on), and the product's largest
    error relative to the dense product's largest output."""
    from pagoda.layers.quantization import group_gemm, triton_group_gemm
    from pagoda.layers.quantization import triton_plane_decode as decode
    generator = torch.Generator().manual_seed(0)
    errors = {}
    for name in CASES:
        weight = case_weight(name, generator)
        outputs, inputs = weight.out_features, weight.in_features
        assert weight.planes
        for dtype in (torch.float32, torch.float16):
            suffix = "" if dtype == torch.float32 else "-fp16"
            expected = weight.dequantize(dtype)
            workspace = torch.empty(outputs * inputs, dtype=dtype)
            scales = weight.scales_and_mins()
            whole = decode.decode_slice(weight, 0, outputs, workspace, scales)
            errors[f"{name}{suffix}-whole"] = (whole.t() - expected).abs().max().item()
            tail = decode.decode_slice(weight, 64, outputs - 64, workspace, scales)
            errors[f"{name}{suffix}-tail"] = (tail.t() - expected[64:]).abs().max().item()
            group_gemm.DECODED_SLICE_BYTES = SLICE_OUTPUTS * inputs * dtype.itemsize
            x = torch.randn(5, inputs, generator=generator).to(dtype)
            out = torch.full((5, outputs), float("nan"), dtype=dtype)
            decode.decoded_product(x, weight, out)
            dense = F.linear(x.float(), expected.float())
            errors[f"{name}{suffix}-product"] = ((out.float() - dense).abs().max()
                                                 / dense.abs().max()).item()
            group_gemm.DECODE_FROM_ALL = 5  # the call below decodes first
            dispatched = triton_group_gemm.group_gemm(x, weight)
            group_gemm.DECODE_FROM_ALL = None
            errors[f"{name}{suffix}-dispatched"] = (dispatched - out).abs().max().item()
    return errors


def test_the_decoding_kernel_matches_dequantize_under_the_interpreter():
    errors = interpreter_report("tests.layers.quantization.test_triton_plane_decode", MARKER)
    assert len(errors) == len(CASES) * 2 * 4
    for name, error in errors.items():
        if name.endswith(("-whole", "-tail", "-dispatched")):
            assert error == 0.0, (name, error)  # the same float32 formula, rounded once;
            # group_gemm's call the same as decoded_product's
        else:  # float16 products round their inputs' products to float16 in cuBLAS's place
            assert error < (2e-3 if "-fp16" in name else 1e-5), (name, error)


def test_a_weight_decodes_in_slices_of_bounded_bytes(monkeypatch):
    from pagoda.layers.quantization import group_gemm
    from pagoda.layers.quantization import triton_plane_decode as decode
    weight = case_weight("nibbles-g128-mins", torch.Generator().manual_seed(1))
    monkeypatch.setattr(group_gemm, "DECODED_SLICE_BYTES", 130 * 512 * 2)
    assert decode.slice_width(weight, 2) == 128  # whole blocks of outputs only
    monkeypatch.setattr(group_gemm, "DECODED_SLICE_BYTES", 1)
    assert decode.slice_width(weight, 2) == decode.DECODE_BLOCK_N  # at least one block
    monkeypatch.setattr(group_gemm, "DECODED_SLICE_BYTES", 64 << 20)
    assert decode.slice_width(weight, 4) == weight.out_features  # all of a small weight


def test_which_calls_decode_first(monkeypatch):
    from pagoda.layers.quantization import group_gemm
    from pagoda.layers.quantization.triton_plane_decode import decodes_first
    generator = torch.Generator().manual_seed(2)
    g128 = case_weight("nibbles-g128-mins", generator)
    g32 = case_weight("nibbles-g32-mins", generator)
    g16 = case_weight("bytes-g16-mins", generator)
    bytes_g32 = case_weight("bytes-g32-zero-points", generator)
    for weight, layout in ((g128, (4, True)), (g32, (4, False)), (g16, (8, False)),
                           (bytes_g32, (8, True))):
        threshold = group_gemm.DECODE_FROM[layout]
        assert weight.decoded_from == threshold
        assert decodes_first(threshold, weight) and not decodes_first(threshold - 1, weight)
        assert f"; from {threshold} tokens: decoded to 16 bits for cuBLAS" in \
            weight.kernel_name()
    halves = random_weight(64, 192, 64, 4, True, False, generator)  # not whole steps
    assert not halves.planes and halves.decoded_from is None
    assert not decodes_first(1 << 20, halves) and "decoded" not in halves.kernel_name()
    monkeypatch.setattr(group_gemm, "DECODE_FROM_ALL", 0)  # PAGODA_DECODE_FROM=0: never
    assert g128.decoded_from is None and not decodes_first(1 << 20, g128)
    monkeypatch.setattr(group_gemm, "DECODE_FROM_ALL", 3)
    assert decodes_first(3, g16) and not decodes_first(2, g128)


@pytest.mark.parametrize("given", ["-1", "many", "2.5"])
def test_a_wrong_decode_threshold_is_one_clear_error(monkeypatch, given):
    from pagoda.layers.quantization import group_gemm
    monkeypatch.setenv("PAGODA_DECODE_FROM", given)
    with pytest.raises(ValueError, match="PAGODA_DECODE_FROM"):
        group_gemm._decode_from_environment()


@pytest.mark.parametrize(("bits", "group", "out", "has_low", "zeros"), [
    (4, 128, "bf16", True, False), (4, 32, "fp16", True, False), (4, 128, "bf16", False, True),
    (8, 16, "bf16", True, False), (8, 32, "fp32", False, False)])
def test_the_decoding_kernel_compiles_for_cuda(bits, group, out, has_low, zeros):
    from pagoda.layers.quantization.group_gemm import BYTE_PLANE_ROWS, PLANE_ROWS
    from pagoda.layers.quantization.triton_plane_decode import (
        DECODE_BLOCK_N,
        _decode_planes_kernel,
    )
    compile_for_cuda(_decode_planes_kernel, {
        "codes_ptr": "*i16", "scale_ptr": "*fp16", "low_ptr": "*fp16", "zeros_ptr": "*u8",
        "w_ptr": f"*{out}", "N": "i32", "first": "i32", "width": "i32"}, {
        "GROUP": group, "PLANE_BITS": bits, "HAS_LOW": has_low, "HAS_ZEROS": zeros,
        "ROWS": PLANE_ROWS if bits == 4 else BYTE_PLANE_ROWS, "BLOCK_N": DECODE_BLOCK_N})


if __name__ == "__main__":
    print(MARKER + json.dumps(decode_errors()))
