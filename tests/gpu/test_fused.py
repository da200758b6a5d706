"""Fused kernels against the torch paths on CUDA, at real widths (device only)."""

from __future__ import annotations

import pytest
import torch

from tests.layers.test_fused import compare_all

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 5])
def test_fused_kernels_match_torch(dtype, tokens, gpu_report):
    errors = compare_all("cuda", dtype, tokens)
    gpu_report(dtype=str(dtype).removeprefix("torch."), tokens=tokens, **errors)
    for name, error in errors.items():
        assert error <= TOLERANCE[dtype], (name, error)
