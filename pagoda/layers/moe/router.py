"""Top-k expert selection from router logits.

Qwen3-MoE takes a softmax in float32 over all experts, keeps the top k and renormalises them
to sum to one when `norm_topk_prob` is set. Mixtral takes a softmax over the top-k logits,
which is the same as the renormalised top k of the full softmax (the softmax is monotonic
and its normaliser cancels), so both are one function."""

from __future__ import annotations

import torch


def select_experts(router_logits: torch.Tensor, top_k: int,
                   renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 weights [tokens, top_k], int32 expert ids [tokens, top_k]) of each token."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)
