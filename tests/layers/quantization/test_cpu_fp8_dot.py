"""pagoda's CPU float8 kernel, each build this machine runs (AVX-512, AVX2): every float8
byte decoded exactly, products against float64 ones of the weights the bytes and scales
stand for (per output row, per block of columns, one row to several sweeps of rows), the
same bits on any thread count, and the shapes it refuses."""

from __future__ import annotations

import pytest
import torch

from pagoda.layers.quantization import cpu_fp8_dot
from pagoda.layers.quantization.cpu_fp8_dot import Fp8DotWeight, fits
from tests.utils import on_thread_counts, pick_cpu_kernel_build

FP8 = torch.float8_e4m3fn


@pytest.fixture(params=list(cpu_fp8_dot.BUILDS))
def build(request, monkeypatch):
    return pick_cpu_kernel_build(cpu_fp8_dot, request, monkeypatch)


def random_layer(out_features: int, in_features: int, group: int, seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """float8 weights over their whole range (subnormals included) and positive scales."""
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(out_features, in_features, generator=gen) * 64).clamp(-448, 448)
    scale = torch.rand(out_features, in_features // group, generator=gen) + 1e-3
    return weight.to(FP8), scale


def dequantized(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out_features, in_features = weight.shape
    groups = scale.shape[1]
    values = weight.double().view(out_features, groups, in_features // groups)
    return (values * scale.double().unsqueeze(-1)).view(out_features, in_features)


def test_every_float8_byte_decodes_to_its_value(build):
    codes = torch.arange(256, dtype=torch.uint8).view(FP8)
    weight = torch.zeros(16, 256, dtype=torch.uint8).view(FP8)
    weight[3] = codes
    layer = Fp8DotWeight(weight, torch.ones(16, 1))
    decoded = layer(torch.eye(256))[:, 3]  # row i of the identity picks input i
    finite = codes.float().isfinite()
    assert torch.equal(decoded[finite], codes.float()[finite])
    assert (~finite).sum() == 2  # 0x7F and 0xFF: float8's NaN, which checkpoints do not hold


@pytest.mark.parametrize("out_features, in_features, group", [
    (16, 64, 64), (48, 256, 128), (96, 576, 576), (32, 1024, 4)])
@pytest.mark.parametrize("tokens", [1, 3, 4, 5, 16, 17, 40])
def test_products_match_the_dequantized_weights(build, out_features, in_features, group,
                                                tokens):
    weight, scale = random_layer(out_features, in_features, group, seed=tokens)
    x = torch.randn(tokens, in_features, generator=torch.Generator().manual_seed(1))
    got = Fp8DotWeight(weight, scale)(x)
    expected = x.double() @ dequantized(weight, scale).t()
    assert got.dtype == torch.float32 and got.shape == (tokens, out_features)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5,
                               atol=1e-5 * expected.abs().max().item())


def test_other_dtypes_and_leading_dims_come_back_as_given(build):
    weight, scale = random_layer(32, 128, 128)
    x = torch.randn(2, 3, 128).to(torch.bfloat16)
    got = Fp8DotWeight(weight, scale)(x)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 3, 32)
    expected = x.double().reshape(6, 128) @ dequantized(weight, scale).t()
    torch.testing.assert_close(got.double().reshape(6, 32), expected, rtol=2e-2, atol=2e-2 *
                               expected.abs().max().item())


def test_the_thread_count_never_changes_a_bit(build):
    weight, scale = random_layer(64, 256, 128)
    layer = Fp8DotWeight(weight, scale)
    x = torch.randn(20, 256)
    one, two = on_thread_counts(lambda: layer(x))
    assert torch.equal(one, two)


@pytest.mark.parametrize("out_features, in_features, group", [
    (40, 64, 64),   # outputs not whole tiles of 16
    (32, 64, 6),    # groups not of a multiple of 4 inputs
    (32, 96, 64),   # a group that does not divide the inputs
])
def test_shapes_it_does_not_hold_do_not_fit(out_features, in_features, group):
    assert not fits(out_features, in_features, group)


@pytest.mark.parametrize("out_features, in_features, groups", [(40, 64, 1), (32, 60, 10)])
def test_a_layer_of_a_shape_it_does_not_hold_is_refused(out_features, in_features, groups):
    weight = torch.zeros(out_features, in_features, dtype=torch.uint8).view(FP8)
    with pytest.raises(ValueError, match="no float8 kernel"):
        Fp8DotWeight(weight, torch.ones(out_features, groups))
