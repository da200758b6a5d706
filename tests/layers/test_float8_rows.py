"""Float8Rows, and how the linear layers route them: a product that takes float8 rows gets
them from the gated activation before it; one that does not, the activation's plain rows.
(The kernels that write them: tests/layers/test_fused.py under the interpreter and
tests/gpu/test_float8_rows_gpu.py on a GPU, where the FP8 products take them.)"""

from __future__ import annotations

import torch

from pagoda.layers.activation import SiluAndMul
from pagoda.layers.float8_rows import FLOAT8, Float8Rows
from pagoda.layers.linear import (
    MergedColumnParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from pagoda.layers.quantization.fp8 import quantize_per_channel


def test_materialized_rows_are_their_values_times_their_scales():
    rows = torch.randn(3, 64)
    values, scale = quantize_per_channel(rows)
    held = Float8Rows(values, scale, torch.bfloat16)
    assert held.shape == (3, 64)
    got = held.materialize()
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), (values.float() * scale).to(torch.bfloat16).float())
    # float8's 3 mantissa bits: within 1/16 of each value (plus bfloat16's rounding)
    assert ((got.float() - rows).abs() <= rows.abs() / 16 + 1e-2).all()


def test_empty_rows_have_a_float32_scale_per_row():
    held = Float8Rows.empty(5, 32, torch.float16, torch.device("cpu"))
    assert held.values.shape == (5, 32) and held.values.dtype == FLOAT8
    assert held.scale.shape == (5, 1) and held.scale.dtype == torch.float32
    assert held.dtype == torch.float16


class _TakesFloat8Rows(UnquantizedLinearMethod):
    """16-bit weights that say they take float8 rows, recording what they were given."""

    def __init__(self) -> None:
        self.given: list[object] = []

    def takes_float8_rows(self, layer, rows) -> bool:
        return True

    def apply_float8_rows(self, layer, rows, bias=None):
        self.given.append(rows)
        return super().apply_float8_rows(layer, rows, bias)


class _ActivationRows(SiluAndMul):
    """SiLU-and-mul whose float8 rows come from torch (no GPU here)."""

    def float8_rows(self, x: torch.Tensor) -> Float8Rows:
        plain = self.forward_native(x)
        return Float8Rows(*quantize_per_channel(plain), plain.dtype)


def _layers(method) -> tuple[MergedColumnParallelLinear, RowParallelLinear]:
    torch.manual_seed(0)
    gate_up = MergedColumnParallelLinear(16, [32, 32])
    down = RowParallelLinear(32, 16, method=method)
    for layer in (gate_up, down):
        layer.weight.data = torch.randn_like(layer.weight) / 4
    return gate_up, down


def test_a_product_that_takes_float8_rows_gets_them_from_the_activation():
    method = _TakesFloat8Rows()
    gate_up, down = _layers(method)
    x = torch.randn(4, 16)
    activated = gate_up(x, activation=_ActivationRows(), float8_for=down)
    assert isinstance(activated, Float8Rows)
    y = down(activated)
    assert method.given == [activated]
    plain = SiluAndMul().forward_native(gate_up(x))
    torch.testing.assert_close(y, down(plain), atol=0.05, rtol=0.1)


def test_a_product_that_takes_none_gets_the_activations_plain_rows():
    gate_up, down = _layers(UnquantizedLinearMethod())
    x = torch.randn(4, 16)
    activated = gate_up(x, activation=_ActivationRows(), float8_for=down)
    assert isinstance(activated, torch.Tensor)
    torch.testing.assert_close(activated, SiluAndMul().forward_native(gate_up(x)))
