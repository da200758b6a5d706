"""pagoda's fused CPU layers (`cpu_fused.cpp`), each build this CPU runs (AVX-512, AVX2,
generic), against the layers' torch paths: RMSNorm with and without the residual add and of
q's heads read in place, RoPE
in place on q and k views of one qkv row (partial rotary dims, positions past the first),
and the gated activations (against float64 and torch); row counts on one thread and on
several; and where they step aside."""

from __future__ import annotations

import pytest
import torch

from pagoda.layers import cpu_fused
from pagoda.layers.activation import GeluTanhAndMul, SiluAndMul
from pagoda.layers.norm import RMSNorm
from pagoda.layers.rotary import RotaryEmbedding
from tests.utils import pick_cpu_kernel_build

ROPE = {"rope_theta": 10000.0, "rope_type": "default"}


@pytest.fixture(params=list(cpu_fused.BUILDS))
def build(request, monkeypatch):
    return pick_cpu_kernel_build(cpu_fused, request, monkeypatch)


@pytest.mark.parametrize("rows", [1, 7, 300])
@pytest.mark.parametrize("cols", [576, 100, 2048])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm_is_the_torch_paths(build, rows, cols, with_residual):
    gen = torch.Generator().manual_seed(rows * cols)
    norm = RMSNorm(cols, eps=1e-5)
    norm.weight.data = torch.rand(cols, generator=gen) + 0.5
    x = torch.randn(rows, cols, generator=gen) * 3
    residual = torch.randn(rows, cols, generator=gen) if with_residual else None
    expected, expected_residual = norm.forward_native(x, residual)
    assert cpu_fused.takes_norm(x, residual)
    got, got_residual = norm.forward_cpu(x, residual)
    assert torch.equal(got_residual, expected_residual)  # the add: the same rounding
    # the sum of squares in another order: within a few float32 steps
    torch.testing.assert_close(got, expected, rtol=4e-7, atol=1e-7)
    if not with_residual:
        assert got_residual is x


@pytest.mark.parametrize("tokens", [1, 5, 200])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "rotary_dim"),
                         [(9, 3, 64, None), (4, 1, 128, 64), (2, 2, 256, None)])
def test_rope_rotates_q_and_k_in_place_as_the_torch_path(build, tokens, heads, kv_heads,
                                                        head_dim, rotary_dim):
    gen = torch.Generator().manual_seed(tokens + heads)
    rotary = RotaryEmbedding(head_dim, 4096, ROPE, rotary_dim)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)
    positions = torch.randint(0, 4096, (tokens,), generator=gen)
    expected_q, expected_k = rotary.forward_native(positions, q.clone(), k.clone())
    assert cpu_fused.takes_rope(positions, q, k, rotary.cos_sin)
    got_q, got_k = rotary.forward_cpu(positions, q, k)
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr()
    assert torch.equal(got_q, expected_q) and torch.equal(got_k, expected_k)


@pytest.mark.parametrize("tokens", [1, 6])
def test_head_norms_read_q_in_place_as_the_row_kernel_reads_a_copy(build, tokens):
    gen = torch.Generator().manual_seed(tokens)
    norm = RMSNorm(64, eps=1e-6)
    norm.weight.data = torch.rand(64, generator=gen) + 0.5
    qkv = torch.randn(tokens, (4 + 2 * 2) * 64, generator=gen)
    q = qkv[:, :4 * 64].view(tokens, 4, 64)  # tokens 512 floats apart
    assert cpu_fused.takes_heads(q)
    got = norm.heads(q)
    assert got.shape == q.shape and got.is_contiguous()
    rows, _ = cpu_fused.add_rms_norm(q.reshape(-1, 64), None, norm.weight, norm.eps)
    assert torch.equal(got, rows.view(q.shape))
    torch.testing.assert_close(got, norm.forward_native(q.reshape(-1, 64))[0].view(q.shape),
                               rtol=4e-7, atol=1e-7)


def float64_gated(activation: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """activation(gate) * up in float64, and how far float32 arithmetic may stray from it
    (GELU's argument u = sqrt(2 / pi) (x + 0.044715 x^3) is rounded before its sigmoid, which
    multiplies u's relative error by 2 |u| (1 - sigmoid(2u)))."""
    gate, up = x.double().chunk(2, dim=-1)
    eps = 2.0 ** -23
    if activation == "silu":
        return gate * torch.sigmoid(gate) * up, 4 * eps * torch.ones_like(gate)
    u = (2 / torch.pi) ** 0.5 * (gate + 0.044715 * gate ** 3)
    sensitivity = 2 * u.abs() * (1 - torch.sigmoid(2 * u))
    return gate * torch.sigmoid(2 * u) * up, 4 * eps * (1 + 3 * sensitivity)


@pytest.mark.parametrize("layer, activation", [(SiluAndMul, "silu"),
                                               (GeluTanhAndMul, "gelu_tanh")])
@pytest.mark.parametrize("shape", [(1, 3072), (5, 2, 96), (300, 22)])
def test_gated_activations_are_float64s_to_a_few_steps(build, layer, activation, shape):
    gen = torch.Generator().manual_seed(shape[0])
    x = torch.randn(*shape, generator=gen) * 6  # gates from about -25 to 25
    assert cpu_fused.takes_gated(x)
    got = layer().forward_cpu(x)
    assert got.shape == (*shape[:-1], shape[-1] // 2)
    exact, steps = float64_gated(activation, x)
    # each value within a few float32 steps (where the exponential is clamped, at e^-87,
    # values below 1e-30 may be kept where float64's are smaller still)
    assert bool(((got.double() - exact).abs() <= steps * exact.abs() + 1e-30).all())


def test_gated_rows_may_be_strided():
    x = torch.randn(4, 80)[:, :64]  # rows 80 floats apart: [gate (32) | up (32)]
    assert cpu_fused.takes_gated(x)
    torch.testing.assert_close(cpu_fused.gated("silu", x), SiluAndMul().forward_native(x),
                               rtol=3e-7, atol=1e-7)


def test_other_dtypes_and_layouts_take_the_torch_path():
    x = torch.randn(4, 64)
    assert not cpu_fused.takes_norm(x.bfloat16(), None)
    assert not cpu_fused.takes_norm(x.t(), None)  # not contiguous
    assert not cpu_fused.takes_norm(x, torch.randn(4, 64).bfloat16())
    q = torch.randn(3, 2, 64)
    positions = torch.arange(3)
    table = RotaryEmbedding(64, 16, ROPE).cos_sin
    assert not cpu_fused.takes_rope(positions.int(), q, q, table)
    assert not cpu_fused.takes_rope(positions, q.bfloat16(), q.bfloat16(), table)
    assert not cpu_fused.takes_rope(positions, q.transpose(0, 1), q, table)
    assert not cpu_fused.takes_heads(q.bfloat16())
    assert not cpu_fused.takes_heads(q.transpose(1, 2))  # a token's heads not contiguous
    assert not cpu_fused.takes_gated(x.bfloat16())
    assert not cpu_fused.takes_gated(torch.randn(4, 3, 64)[:, :2])  # leading dims strided
    assert not cpu_fused.takes_gated(torch.randn(4, 63))  # no even split
    norm = RMSNorm(64)  # a bfloat16 model: the torch path, same results
    torch.testing.assert_close(norm.forward_cpu(x.bfloat16())[0], norm.forward_native(
        x.bfloat16())[0], rtol=0, atol=0)


def test_with_the_variable_at_0_the_layers_take_the_torch_path(monkeypatch):
    monkeypatch.setenv(cpu_fused.VARIABLE, "0")
    cpu_fused._library.cache_clear()
    try:
        x, q = torch.randn(2, 64), torch.randn(3, 2, 64)
        assert not cpu_fused.takes_norm(x, None)
        rotary = RotaryEmbedding(64, 16, ROPE)
        assert not cpu_fused.takes_rope(torch.arange(3), q, q, rotary.cos_sin)
        assert torch.equal(RMSNorm(64).forward_cpu(x)[0], RMSNorm(64).forward_native(x)[0])
    finally:
        cpu_fused._library.cache_clear()
