"""NormedRows (an RMSNorm left for the next product to finish) on the CPU: finished by
torch, they are the norm's rows; a layer whose method cannot finish them takes them so;
and `product_then_norm` falls back to the products and the norm's own kernel where no
kernel can do the norm (the CPU, a 16-bit layer). The kernels that do it run under the
interpreter in tests/layers/quantization/test_group_gemm.py and on a GPU in
tests/gpu/test_norm_in_products_gpu.py."""

from __future__ import annotations

import torch

from pagoda.layers.activation import SiluAndMul
from pagoda.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from pagoda.layers.norm import RMSNorm, product_then_norm
from pagoda.layers.normed_rows import NormedRows


def _normed_rows(rows: torch.Tensor, norm: RMSNorm, tiles: int) -> NormedRows:
    """rows [tokens, width] as a product that normed them would leave them: times the norm's
    weight, with their squares summed by `tiles` tiles of outputs."""
    squares = rows.pow(2).reshape(rows.shape[0], tiles, -1).sum(-1).t().contiguous()
    return NormedRows(rows * norm.weight, squares, norm.eps)


def test_normed_rows_finished_by_torch_are_the_norms_rows():
    generator = torch.Generator().manual_seed(0)
    norm = RMSNorm(64, 1e-5)
    norm.weight.data = torch.rand(64, generator=generator) + 0.5
    rows = torch.randn(3, 64, generator=generator) * 3
    normed = _normed_rows(rows, norm, tiles=4)
    assert normed.shape == rows.shape
    torch.testing.assert_close(normed.materialize(), norm.forward_native(rows)[0])


def test_a_layer_that_cannot_finish_a_norm_takes_the_rows_finished():
    generator = torch.Generator().manual_seed(1)
    norm = RMSNorm(64, 1e-6)
    norm.weight.data = torch.rand(64, generator=generator) + 0.5
    gate_up = MergedColumnParallelLinear(64, [32, 32])
    gate_up.weight.data = torch.randn(64, 64, generator=generator)
    rows = torch.randn(5, 64, generator=generator)
    normed = _normed_rows(rows, norm, tiles=2)
    assert not gate_up.finishes_norm(5)
    activation = SiluAndMul()
    torch.testing.assert_close(gate_up(normed, activation=activation),
                               gate_up(normed.materialize(), activation=activation))


def test_without_a_kernel_for_it_the_norm_runs_between_the_products():
    generator = torch.Generator().manual_seed(2)
    norm = RMSNorm(64, 1e-6)
    norm.weight.data = torch.rand(64, generator=generator) + 0.5
    output = RowParallelLinear(48, 64)
    output.weight.data = torch.randn(64, 48, generator=generator)
    gate_up = MergedColumnParallelLinear(64, [32, 32])
    x = torch.randn(2, 48, generator=generator)
    residual = torch.randn(2, 64, generator=generator)
    assert output.then_norm(x, norm.weight, norm.eps, residual) is None
    normed, new_residual = product_then_norm(output, x, norm, residual, gate_up)
    expected, expected_residual = norm(output(x), residual)
    assert torch.equal(normed, expected) and torch.equal(new_residual, expected_residual)


def test_the_products_do_the_norm_by_default_only_where_kernels_launch_without_pdl(
        monkeypatch):
    from pagoda.layers import norm as norms
    from pagoda.layers.dependent_launch import dependent_launch
    cpu = torch.device("cpu")
    assert not dependent_launch(cpu)["PDL"]
    assert norms._norm_in_products_on(cpu)  # "auto": no PDL here
    monkeypatch.setattr(norms, "NORM_IN_PRODUCTS", "0")
    assert not norms._norm_in_products_on(cpu)
    monkeypatch.setattr(norms, "NORM_IN_PRODUCTS", "1")
    assert norms._norm_in_products_on(cpu)
