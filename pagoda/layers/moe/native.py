"""The experts in plain torch: each expert's tokens gathered, run through its SwiGLU MLP,
weighted and added back. The CPU path, and the reference the Triton kernel is tested
against."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F


def fused_moe_native(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                     topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """sum_j weight[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)) with e = ids[t, j].

    x [tokens, hidden]; w13 [experts, 2 * inter, hidden] (gate rows, then up rows);
    w2 [experts, hidden, inter]; ids are local expert indices, -1 for an expert that is not
    on this rank (it adds nothing here). Each expert's product is rounded to x's dtype before
    the sum, as transformers does."""
    return moe_by_expert(x, lambda e, rows: F.linear(rows, w13[e]),
                         lambda e, rows: F.linear(rows, w2[e]), topk_weights, topk_ids,
                         w13.shape[0])


def moe_by_expert(x: torch.Tensor, gate_up: Callable[[int, torch.Tensor], torch.Tensor],
                  down: Callable[[int, torch.Tensor], torch.Tensor],
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                  num_experts: int) -> torch.Tensor:
    """As fused_moe_native, each expert's products given as functions of (expert, its
    tokens' rows): gate_up's output holds the gate columns, then the up ones."""
    out = torch.zeros_like(x)
    flat_ids = topk_ids.flatten().long()
    local = flat_ids >= 0
    counts = torch.bincount(flat_ids[local], minlength=num_experts).tolist()
    top_k = topk_ids.shape[1]
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        slots = torch.nonzero(flat_ids == expert).squeeze(1)
        tokens = slots // top_k
        gate, up = gate_up(expert, x[tokens]).chunk(2, dim=-1)
        y = down(expert, F.silu(gate) * up)
        y = y * topk_weights.flatten()[slots, None].to(y.dtype)
        out.index_add_(0, tokens, y.to(out.dtype))
    return out
