"""pagoda's fused CPU layers (`cpu_fused.cpp`), each build this CPU runs (AVX-512, AVX2,
generic), against the layers' torch paths: RMSNorm with and without the residual add, and
RoPE in place on q and k views of one qkv row (partial rotary dims, positions past the
first); row counts on one thread and on several; and where they step aside."""

from __future__ import annotations

import pytest
import torch

from pagoda.layers import cpu_fused
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
