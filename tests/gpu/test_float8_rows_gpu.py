"""Float8 rows handed to FP8 products on tensor cores by the kernels that write them
(`pagoda.layers.float8_rows`): at the 8B's widths the norm's and the gated activations'
float8 rows are bit for bit what fp8_rows makes of their plain rows, and end to end an FP8
model (quantized at load, bfloat16) computes the same greedy tokens with them as without,
with one fp8_rows launch a layer (the output projection's) where there were four."""

from __future__ import annotations

import pytest
import torch

from pagoda.layers import fused
from pagoda.layers.float8_rows import FLOAT8_MAX, Float8Rows
from pagoda.layers.quantization import fp8, triton_group_gemm
from pagoda.layers.quantization.triton_group_gemm import fp8_rows
from tests.gpu.test_quantized_checkpoints_gpu import greedy
from tests.models.parity import random_prompts
from tests.models.test_quantized_checkpoints import CONFIG
from tests.utils import save_random_checkpoint


def _same_as_fp8_rows(rows: Float8Rows, plain: torch.Tensor) -> None:
    values, scale = fp8_rows(plain, FLOAT8_MAX)
    assert rows.dtype == plain.dtype
    assert torch.equal(rows.values.view(torch.uint8), values.view(torch.uint8))
    assert torch.equal(rows.scale, scale)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("tokens", [33, 300])
def test_the_norms_float8_rows_are_fp8_rows_of_its_output(tokens, residual):
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, 4096, device="cuda", generator=gen).to(torch.bfloat16)
    res = torch.randn(tokens, 4096, device="cuda", generator=gen).to(torch.bfloat16) \
        if residual else None
    weight = (torch.rand(4096, device="cuda", generator=gen) + 0.5).to(torch.bfloat16)
    rows, new_residual = fused.add_rms_norm_float8(x, res, weight, 1e-5)
    out, expected_residual = fused.add_rms_norm(x, res, weight, 1e-5)
    _same_as_fp8_rows(rows, out)
    assert torch.equal(new_residual, expected_residual)


@pytest.mark.parametrize("gelu_tanh", [False, True])
@pytest.mark.parametrize("tokens", [33, 300])
def test_the_gated_activations_float8_rows_are_fp8_rows_of_its_output(tokens, gelu_tanh):
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    gate_up = (torch.randn(tokens, 2 * 14336, device="cuda", generator=gen) * 3).to(
        torch.bfloat16)
    plain = fused.gelu_tanh_and_mul(gate_up) if gelu_tanh else fused.silu_and_mul(gate_up)
    _same_as_fp8_rows(fused.gated_act_float8(gate_up, gelu_tanh), plain)


def test_an_fp8_model_computes_the_same_tokens_with_float8_rows_handed_over(tmp_path,
                                                                            monkeypatch):
    source = save_random_checkpoint(CONFIG, tmp_path / "model", None)
    prompts = random_prompts(CONFIG.vocab_size, (40, 70, 130))  # prefills on tensor cores
    launches = []
    real = triton_group_gemm.fp8_rows

    def counted(x, fp8_max):
        launches.append(x.shape[0])
        return real(x, fp8_max)
    monkeypatch.setattr(triton_group_gemm, "fp8_rows", counted)
    options = {"dtype": "bfloat16", "quantization": "fp8"}
    monkeypatch.setattr(fp8, "FLOAT8_ROWS_HANDED_OVER", True)
    handed_over = greedy(source, prompts, **options)
    with_rows = len(launches)
    monkeypatch.setattr(fp8, "FLOAT8_ROWS_HANDED_OVER", False)
    launches.clear()
    without = greedy(source, prompts, **options)
    assert handed_over == without
    assert with_rows and len(launches) == 4 * with_rows
