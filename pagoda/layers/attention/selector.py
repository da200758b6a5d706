"""Chooses an attention backend for a device and the user's preference."""

from __future__ import annotations

import torch

from pagoda.errors import ConfigError
from pagoda.layers.attention.backend import AttentionBackend
from pagoda.layers.attention.torch_ref import TorchAttentionBackend


def select_backend(name: str, device: torch.device) -> AttentionBackend:
    if name in ("auto", "torch"):
        return TorchAttentionBackend()
    raise ConfigError(f"unknown attention backend {name!r} (available: torch)")
