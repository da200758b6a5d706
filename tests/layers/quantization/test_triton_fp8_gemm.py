"""pagoda's FP8 tensor-core kernel: its products equal float32 products of the same float8
operands under Triton's CPU interpreter (in a subprocess: TRITON_INTERPRET=1 must be set
before triton is imported), at whole and partial tiles and at every input split; which calls
it takes and how it splits them; and it compiles to Hopper's FP8 tensor-core instructions.
Real sizes, against torch._scaled_mm, run on the GPU in tests/gpu/test_quantized_gpu.py."""

from __future__ import annotations

import json

import pytest
import torch

from tests.utils import compile_for_cuda, interpreter_report

MARKER = "FP8_GEMM_ERRORS "
# (tokens, outputs, inputs, splits): whole tiles, partial tiles of tokens and outputs, splits
CASES = [(64, 128, 256, 1), (33, 200, 512, 2), (70, 64, 512, 4), (5, 72, 128, 1)]


def product_errors() -> dict[str, float]:
    """Per case: the largest difference from the float32 product, over its largest value."""
    from pagoda.layers.quantization.triton_fp8_gemm import FP8_TILE, fp8_gemm
    generator = torch.Generator().manual_seed(0)
    block_m, block_n, block_k, warps, stages = FP8_TILE
    errors = {}
    for tokens, outputs, inputs, splits in CASES:
        a = torch.randn(tokens, inputs, generator=generator).to(torch.float8_e4m3fn)
        w = torch.randn(outputs, inputs, generator=generator).to(torch.float8_e4m3fn)
        a_scale = torch.rand(tokens, 1, generator=generator) + 0.5
        w_scale = torch.rand(outputs, generator=generator) + 0.5
        config = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
                  "num_warps": warps, "num_stages": stages, "splits": splits}
        got = fp8_gemm(a, a_scale, w, w_scale, torch.float32, config)
        expected = (a.float() @ w.float().t()) * a_scale * w_scale
        errors[f"{tokens}x{outputs}x{inputs}/{splits}"] = (
            (got - expected).abs().max() / expected.abs().max()).item()
    return errors


def test_the_kernel_matches_the_float32_product_under_the_interpreter():
    errors = interpreter_report("tests.layers.quantization.test_triton_fp8_gemm", MARKER)
    assert len(errors) == len(CASES)
    for name, error in errors.items():
        assert error < 1e-6, (name, error)  # float32 sums of exact float8 products


def test_calls_of_33_to_64_tokens_take_it(monkeypatch):
    from pagoda.layers.quantization import triton_fp8_gemm
    from pagoda.layers.quantization.triton_fp8_gemm import takes
    monkeypatch.setattr(triton_fp8_gemm, "CHOSEN", "")  # PAGODA_FP8_GEMM unset
    assert [takes(tokens, 4096) for tokens in (32, 33, 64, 65, 256)] == \
        [False, True, True, False, False]
    assert not takes(48, 4096 + 64)  # inputs not whole steps of 128
    monkeypatch.setattr(triton_fp8_gemm, "CHOSEN", "triton")
    assert takes(2048, 4096) and not takes(2048, 4096 + 64)
    monkeypatch.setattr(triton_fp8_gemm, "CHOSEN", "cublas")
    assert not takes(48, 4096)


def test_the_startup_log_names_the_kernels_the_calls_take(monkeypatch):
    from pagoda.layers.quantization import triton_fp8_gemm
    from pagoda.layers.quantization.triton_fp8_gemm import kernels_above_few_tokens
    monkeypatch.setattr(triton_fp8_gemm, "CHOSEN", "")
    assert kernels_above_few_tokens(4096) == \
        "triton fp8 tensor-core kernel to 64 tokens, torch._scaled_mm above"
    assert kernels_above_few_tokens(4096 + 64) == "torch._scaled_mm"
    monkeypatch.setattr(triton_fp8_gemm, "CHOSEN", "cublas")
    assert kernels_above_few_tokens(4096) == "torch._scaled_mm"
    monkeypatch.setattr(triton_fp8_gemm, "CHOSEN", "triton")
    assert kernels_above_few_tokens(4096) == "triton fp8 tensor-core kernel"


def test_inputs_are_split_while_the_tiles_leave_multiprocessors_idle():
    from pagoda.layers.quantization.triton_fp8_gemm import fp8_config
    splits = {name: fp8_config(64, outputs, inputs, 132)["splits"] for name, (outputs, inputs)
              in {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
                  "down": (4096, 14336)}.items()}
    assert splits == {"qkv": 1, "o": 2, "gate_up": 1, "down": 2}  # the H100's fastest
    assert fp8_config(64, 256, 4096, 132)["splits"] == 4  # at most MAX_SPLITS
    assert fp8_config(64, 256, 384, 132)["splits"] == 1  # 384 inputs: no whole halves


def test_a_split_of_partial_steps_is_one_clear_error():
    from pagoda.layers.quantization.triton_fp8_gemm import fp8_gemm
    a = torch.zeros(40, 384).to(torch.float8_e4m3fn)
    config = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4,
              "splits": 2}
    with pytest.raises(ValueError, match="384 inputs are not 2 splits"):
        fp8_gemm(a, torch.ones(40, 1), a[:8], torch.ones(8), torch.bfloat16, config)


@pytest.mark.parametrize("splits", [1, 2])
def test_the_kernel_compiles_to_fp8_tensor_core_instructions(splits):
    from pagoda.layers.quantization.triton_fp8_gemm import FP8_TILE, _fp8_gemm_kernel
    block_m, block_n, block_k, _, _ = FP8_TILE
    asm = compile_for_cuda(_fp8_gemm_kernel, {
        "a_ptr": "*fp8e4nv", "w_ptr": "*fp8e4nv", "a_scale_ptr": "*fp32",
        "w_scale_ptr": "*fp32", "out_ptr": "*bf16", "partial_ptr": "*fp32",
        "count_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32"}, {
        "K_SPLIT": 4096 // splits, "SPLITS": splits, "BLOCK_M": block_m, "BLOCK_N": block_n,
        "BLOCK_K": block_k, "PDL": True})
    assert "wgmma.mma_async.sync.aligned" in asm["ptx"] and ".e4m3.e4m3" in asm["ptx"]


if __name__ == "__main__":
    print(MARKER + json.dumps(product_errors()))
