"""What the CPU kernels are handed: float32 rows one after another, without a copy where the
activations already are."""

from __future__ import annotations

import torch

from pagoda.layers.cpu_kernels import float32_rows


def test_contiguous_float32_activations_are_read_in_place():
    x = torch.randn(2, 3, 8)
    assert float32_rows(x) is x


def test_other_dtypes_and_strided_views_are_copied_to_contiguous_float32():
    for x in (torch.randn(3, 8).to(torch.bfloat16), torch.randn(3, 16)[:, ::2]):
        rows = float32_rows(x)
        assert rows.dtype == torch.float32 and rows.is_contiguous()
        assert torch.equal(rows, x.float())
