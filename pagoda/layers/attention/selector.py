"""Chooses an attention backend for a device and the user's preference."""

from __future__ import annotations

import importlib.util

import torch

from pagoda.errors import ConfigError
from pagoda.layers.attention.backend import AttentionBackend
from pagoda.layers.attention.torch_ref import TorchAttentionBackend

BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    """Whether the triton package can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def select_backend(name: str, device: torch.device | str) -> AttentionBackend:
    """"auto": triton on CUDA when importable, else torch; "torch" / "triton": that one."""
    device = torch.device(device)
    if name == "auto":
        name = "triton" if device.type == "cuda" and triton_available() else "torch"
    if name == "torch":
        return TorchAttentionBackend()
    if name == "triton":
        if device.type != "cuda":
            raise ConfigError(f"attention backend 'triton' needs a CUDA device, not {device}")
        if not triton_available():
            raise ConfigError("attention backend 'triton' needs the triton package")
        from pagoda.layers.attention.triton_backend import TritonAttentionBackend
        return TritonAttentionBackend()
    raise ConfigError(f"unknown attention backend {name!r} (choose from {', '.join(BACKENDS)})")
