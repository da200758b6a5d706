"""The attention module a model holds: bound to its layer's KV cache view and a backend."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pagoda.errors import UnsupportedModelError
from pagoda.layers.attention.backend import UNIT_SCALES, AttentionBackend, KVScales

if TYPE_CHECKING:
    from pagoda.layers.norm import RMSNorm


class Attention(nn.Module):
    """Paged attention for one layer; the runner binds kv_cache, kv_group and backend before
    use. sliding_window: None for full causal attention, else W >= 1: the query at position p
    sees the keys at (p - W, p] (see AttentionBackend). The step's attn_metadata holds one
    entry per KV group; the layer reads its group's. A float8 cache holds K and V divided by
    the checkpoint's scales (`load_kv_scale`; 1.0 without them)."""

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
        self.kv_scales = UNIT_SCALES

    def load_kv_scale(self, which: str, tensor: torch.Tensor, name: str) -> None:
        """Take checkpoint tensor `name` as the float8 cache's scale of K ("k") or V ("v"):
        one per tensor, or one per KV head (llm-compressor's attn_head strategy), of which
        the largest serves every head (no head's values then leave float8's range)."""
        values = tensor.detach().float().reshape(-1)
        if values.numel() == 0 or not bool(torch.isfinite(values).all()) \
                or not bool((values > 0).all()):
            raise UnsupportedModelError(f"checkpoint tensor {name!r}: a KV cache scale must "
                                        f"be positive and finite, got {values.tolist()[:8]}")
        value = float(values.max())
        k, v = self.kv_scales.k, self.kv_scales.v
        self.kv_scales = KVScales(value if which == "k" else k, value if which == "v" else v)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn_metadata: Sequence[Any], positions: torch.Tensor, rotary: Any,
                qk_norm: tuple[RMSNorm, RMSNorm] | None = None) -> torch.Tensor:
        """Each head of q and k normed by qk_norm (q's norm, k's norm) when given, q and k
        rotated at `positions` by `rotary` (a RotaryEmbedding; the backend may fuse both into
        its KV store), k and v stored, then q's attention over the cache."""
        assert self.kv_cache is not None and self.backend is not None, "KV cache not bound"
        scales = self.kv_scales if self.kv_cache.element_size() == 1 else UNIT_SCALES
        out = self.backend.forward_rotary(positions, q.view(-1, self.num_heads, self.head_dim),
                                          k.view(-1, self.num_kv_heads, self.head_dim),
                                          v.view(-1, self.num_kv_heads, self.head_dim), rotary,
                                          self.kv_cache, attn_metadata[self.kv_group],
                                          self.scale, self.sliding_window, qk_norm, scales)
        return out.view(-1, self.num_heads * self.head_dim)

    def extra_repr(self) -> str:
        window = f", sliding_window={self.sliding_window}" if self.sliding_window else ""
        scales = "" if self.kv_scales.is_unit else \
            f", kv_scales=({self.kv_scales.k:g}, {self.kv_scales.v:g})"
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}{window}{scales}")
