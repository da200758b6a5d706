"""The attention-backend interface: build step metadata once, then run each layer."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pagoda.layers.attention.metadata import CommonAttentionMetadata

if TYPE_CHECKING:
    from pagoda.layers.norm import RMSNorm


@dataclass(frozen=True, slots=True)
class KVScales:
    """The per-tensor scales of a float8 KV cache: it holds K / k and V / v (a checkpoint's
    calibrated `k_scale` and `v_scale`; 1.0 without them). Caches of 16 or 32 bits hold K and
    V as they are."""

    k: float = 1.0
    v: float = 1.0

    @property
    def is_unit(self) -> bool:
        return self.k == 1.0 and self.v == 1.0


UNIT_SCALES = KVScales()


class AttentionBackend(ABC):
    """Paged attention over a KV cache of shape [2, num_blocks, block_size, kv_heads, head_dim].

    sliding_window (per layer, per call): None is full causal attention; an int W >= 1 lets
    the query at position p see only the keys at positions (p - W, p] (transformers'
    sliding-window causal mask). One step's metadata serves layers of any window."""

    name: str = "abstract"

    @abstractmethod
    def build_metadata(self, common: CommonAttentionMetadata) -> Any:
        """Precompute whatever this backend needs for the step (shared across layers)."""

    def build_group_metadata(self, groups: Sequence[CommonAttentionMetadata]) -> list[Any]:
        """Each KV group's metadata, in group order (the groups differ only in block tables
        and slot mappings; a backend may share the rest)."""
        return [self.build_metadata(common) for common in groups]

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, metadata: Any, scale: float,
                sliding_window: int | None = None,
                kv_scales: KVScales = UNIT_SCALES) -> torch.Tensor:
        """Write k/v ([tokens, kv_heads, dim]) into the cache at the step's slots (divided by
        kv_scales), then attend q ([tokens, heads, dim]) over each sequence's cached context
        (multiplied by them) with causal masking (and the sliding window, when given)."""

    def forward_rotary(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor, rotary: Any, kv_cache: torch.Tensor, metadata: Any,
                       scale: float, sliding_window: int | None = None,
                       qk_norm: tuple[RMSNorm, RMSNorm] | None = None,
                       kv_scales: KVScales = UNIT_SCALES) -> torch.Tensor:
        """Each head of q and k normed by qk_norm's q and k norm (when given), RoPE on them
        at `positions` (rotary: a RotaryEmbedding), then forward(). A backend may fuse the
        norm and the rotation into its KV store."""
        if qk_norm is not None:
            q, k = qk_norm[0].heads(q), qk_norm[1].heads(k)
        q, k = rotary(positions, q, k)
        return self.forward(q, k, v, kv_cache, metadata, scale, sliding_window, kv_scales)

