"""Chooses an attention backend for a device and the user's preference."""

from __future__ import annotations

import importlib.util

import torch

from pagoda.errors import ConfigError
from pagoda.layers.attention.backend import AttentionBackend
from pagoda.layers.attention.torch_ref import TorchAttentionBackend
from pagoda.layers.triton_support import (
    E4M3_CAPABILITY,
    cuda_capability,
    device_index,
    has_e4m3,
)

BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    """Whether the triton package can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def float8_cache_error(capability: tuple[int, int], cache_dtype: torch.dtype | None
                       ) -> str | None:
    """Why the Triton kernels cannot hold and read a KV cache of `cache_dtype` on a GPU of
    this compute capability, or None if they can: an E4M3 cache needs Triton's E4M3 type."""
    if cache_dtype != torch.float8_e4m3fn or has_e4m3(capability):
        return None
    major, minor = capability
    return (f"--kv-cache-dtype fp8 (E4M3) needs a GPU of compute capability "
            f"{'.'.join(map(str, E4M3_CAPABILITY))} or later for the Triton attention kernels; "
            f"this one is {major}.{minor}: use --kv-cache-dtype fp8_e5m2, or "
            f"--attention-backend torch")


def holds_e4m3_cache(name: str, device: torch.device | str) -> bool:
    """Whether the attention backend `name` chooses on `device` holds a float8 E4M3 KV cache
    (the Triton kernels: from compute capability 8.9 on; the torch backend: anywhere)."""
    device = torch.device(device)
    if device.type != "cuda" or name == "torch" or (name == "auto" and not triton_available()):
        return True
    return has_e4m3(cuda_capability(device_index(device)))


def select_backend(name: str, device: torch.device | str,
                   cache_dtype: torch.dtype | None = None) -> AttentionBackend:
    """"auto": triton on CUDA when importable, else torch; "torch" / "triton": that one.
    `cache_dtype`: the KV cache's element type, when it is not the model's."""
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
        problem = float8_cache_error(cuda_capability(device_index(device)), cache_dtype)
        if problem:
            raise ConfigError(problem)
        from pagoda.layers.attention.triton_backend import TritonAttentionBackend
        return TritonAttentionBackend()
    raise ConfigError(f"unknown attention backend {name!r} (choose from {', '.join(BACKENDS)})")
