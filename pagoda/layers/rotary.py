"""Rotary position embedding (rotate-half layout) with the config's rope scaling."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

from pagoda.errors import UnsupportedModelError
from pagoda.layers import cpu_fused
from pagoda.layers.custom_op import DeviceDispatch


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def _yarn_mscale(scale: float, m: float = 1.0) -> float:
    return 0.1 * m * math.log(scale) + 1.0 if scale > 1 else 1.0


def _yarn(base: float, dim: int, p: dict[str, Any], max_pos: int) -> tuple[torch.Tensor, float]:
    factor = p["factor"]
    old_len = p.get("original_max_position_embeddings") or max_pos
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation = _base_inv_freq(base, dim)
    inv_freq = extrapolation / factor * ramp + extrapolation * (1 - ramp)
    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all = p.get("mscale"), p.get("mscale_all_dim")
        if mscale and mscale_all:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
        else:
            attention_factor = _yarn_mscale(factor)
    return inv_freq, float(attention_factor)


# the tables built so far for the model being built (shared_rotary_tables), by parameters
_SHARED_TABLES: ContextVar[dict[str, torch.Tensor] | None] = ContextVar(
    "shared_rotary_tables", default=None)


@contextmanager
def shared_rotary_tables() -> Iterator[None]:
    """Rotary embeddings built inside share one cos/sin table per distinct configuration
    instead of one a layer: the tables are [max_position, rotary_dim] float32 each (64 MiB
    a layer for a 128-wide head at 131,072 positions). Scope it to one model: a sleeping
    model's tables leave the device with it."""
    token = _SHARED_TABLES.set({})
    try:
        yield
    finally:
        _SHARED_TABLES.reset(token)


def cos_sin_table(params: dict[str, Any], rotary_dim: int, max_position: int) -> torch.Tensor:
    """[max_position, rotary_dim] float32: each position's cos then sin of its angles (times
    the configuration's scale), on the default device; shared inside shared_rotary_tables."""
    shared = _SHARED_TABLES.get()
    key = json.dumps([params, rotary_dim, max_position], sort_keys=True, default=str)
    if shared is not None and key in shared:
        return shared[key]
    inv_freq, scale = inv_freq_for(params, rotary_dim, max_position)
    angles = torch.outer(torch.arange(max_position, dtype=torch.float64), inv_freq)
    table = torch.cat([angles.cos() * scale, angles.sin() * scale], dim=-1).float()
    if shared is not None:
        shared[key] = table
    return table


def inv_freq_for(p: dict[str, Any], dim: int, max_pos: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (float64) and the cos/sin scale for a rope configuration."""
    base, kind = float(p["rope_theta"]), p["rope_type"]
    if kind == "default":
        return _base_inv_freq(base, dim), 1.0
    if kind == "linear":
        return _base_inv_freq(base, dim) / p["factor"], 1.0
    if kind == "llama3":
        return _llama3_inv_freq(_base_inv_freq(base, dim), p), 1.0
    if kind == "yarn":
        return _yarn(base, dim, p, max_pos)
    raise UnsupportedModelError(f"rope scaling type {kind!r} is not supported")


class RotaryEmbedding(DeviceDispatch):
    """Applies RoPE to q and k of shape [tokens, heads, head_dim] at given positions and
    returns them: in place on CUDA and on CPU's fused kernel (cpu_fused), into new tensors on
    the torch path."""

    def __init__(self, head_dim: int, max_position: int, params: dict[str, Any],
                 rotary_dim: int | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim or head_dim
        self.register_buffer("cos_sin", cos_sin_table(params, self.rotary_dim, max_position),
                             persistent=False)

    def forward_cuda(self, positions: torch.Tensor, q: torch.Tensor,
                     k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from pagoda.layers.fused import rope_qk_
        rope_qk_(positions, q, k, self.cos_sin, self.rotary_dim)  # in place
        return q, k

    def forward_cpu(self, positions: torch.Tensor, q: torch.Tensor,
                    k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if cpu_fused.takes_rope(positions, q, k, self.cos_sin):
            cpu_fused.rope_(positions, q, k, self.cos_sin, self.rotary_dim)  # in place
            return q, k
        return self.forward_native(positions, q, k)

    def forward_native(self, positions: torch.Tensor, q: torch.Tensor,
                       k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.cos_sin.index_select(0, positions).unsqueeze(1).chunk(2, dim=-1)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., :self.rotary_dim], x[..., self.rotary_dim:]
        x1, x2 = rot.float().chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
        return torch.cat([out, rest], dim=-1) if rest.numel() else out
