"""The attention module a model holds: bound to its layer's KV cache view and a backend."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pagoda.layers.attention.backend import AttentionBackend

if TYPE_CHECKING:
    from pagoda.layers.norm import RMSNorm


class Attention(nn.Module):
    """Paged attention for one layer; the runner binds kv_cache, kv_group and backend before
    use. sliding_window: None for full causal attention, else W >= 1: the query at position p
    sees the keys at (p - W, p] (see AttentionBackend). The step's attn_metadata holds one
    entry per KV group; the layer reads its group's."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None) -> None:
        super().__init__()
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be None or >= 1, got {sliding_window}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.kv_cache: torch.Tensor | None = None
        self.kv_group = 0
        self.backend: AttentionBackend | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn_metadata: Sequence[Any], positions: torch.Tensor, rotary: Any,
                qk_norm: tuple[RMSNorm, RMSNorm] | None = None) -> torch.Tensor:
        """Each head of q and k normed by qk_norm (q's norm, k's norm) when given, q and k
        rotated at `positions` by `rotary` (a RotaryEmbedding; the backend may fuse both into
        its KV store), k and v stored, then q's attention over the cache."""
        assert self.kv_cache is not None and self.backend is not None, "KV cache not bound"
        out = self.backend.forward_rotary(positions, q.view(-1, self.num_heads, self.head_dim),
                                          k.view(-1, self.num_kv_heads, self.head_dim),
                                          v.view(-1, self.num_kv_heads, self.head_dim), rotary,
                                          self.kv_cache, attn_metadata[self.kv_group],
                                          self.scale, self.sliding_window, qk_norm)
        return out.view(-1, self.num_heads * self.head_dim)

    def extra_repr(self) -> str:
        window = f", sliding_window={self.sliding_window}" if self.sliding_window else ""
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}{window}")
