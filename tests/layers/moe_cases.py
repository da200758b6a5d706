"""Shared by the CPU (interpreted Triton) and GPU tests of the fused MoE kernel: random
experts and routing, and the kernel's error against the torch reference."""

from __future__ import annotations

import torch

from pagoda.layers.moe.native import fused_moe_native
from pagoda.layers.moe.router import select_experts


def random_moe(tokens: int, experts: int, top_k: int, hidden: int, inter: int,
               dtype: torch.dtype, device: str, seed: int = 0):
    """(x, w13, w2, weights, ids): weights scaled so activations stay near unit size."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    x = randn(tokens, hidden)
    w13 = randn(experts, 2 * inter, hidden, scale=hidden ** -0.5)
    w2 = randn(experts, hidden, inter, scale=inter ** -0.5)
    logits = randn(tokens, experts).float()
    weights, ids = select_experts(logits, top_k, renormalize=True)
    return x, w13, w2, weights, ids


def kernel_error(tokens: int, experts: int, top_k: int, hidden: int, inter: int,
                 dtype: torch.dtype, device: str, drop_experts: bool = False) -> float:
    """Max |triton - reference| / (1 + max |reference|). The reference runs in float32 on
    the same (rounded) inputs. `drop_experts`: the upper half of the experts live on another
    rank (ids -1)."""
    from pagoda.layers.moe.triton_moe import fused_moe_triton
    x, w13, w2, weights, ids = random_moe(tokens, experts, top_k, hidden, inter, dtype, device)
    if drop_experts:
        ids = torch.where(ids < experts // 2, ids, torch.full_like(ids, -1))
    ours = fused_moe_triton(x, w13, w2, weights, ids, partial=drop_experts).float()
    ref = fused_moe_native(x.float(), w13.float(), w2.float(), weights, ids)
    return ((ours - ref).abs().max() / (1 + ref.abs().max())).item()
