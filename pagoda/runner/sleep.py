"""Sleep and wake for a model's device memory.

Sleeping copies the weights to one pinned host buffer (once: weights never change, so later
sleeps reuse the copy) and hands their device memory back; waking copies them back in one
transfer. On a GPU with the driver's virtual memory API the weights come back to a
`DeviceArena` at fixed addresses, so after the first wake every later wake finds its CUDA
graphs still valid. Without it, or on the first wake, the caller re-captures (see
`address_fingerprint`). On CPU the weights already live in host memory: nothing moves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pagoda.runner.device_arena import DeviceArena, arenas_supported

ALIGN = 256  # bytes: every tensor starts on a boundary any dtype and kernel is happy with


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def model_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Each distinct parameter and buffer of the model once (tied weights count once)."""
    seen: set[int] = set()
    tensors = []
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            tensors.append(tensor)
    return tensors


@dataclass(slots=True)
class _Layout:
    """Where each tensor sits in the flat buffers (same offsets on host and device)."""

    offsets: list[int]
    nbytes: int

    @classmethod
    def of(cls, tensors: list[torch.Tensor]) -> _Layout:
        offsets, total = [], 0
        for t in tensors:
            offsets.append(total)
            total += _aligned(t.numel() * t.element_size())
        return cls(offsets, total)


def _view(flat: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    nbytes = like.numel() * like.element_size()
    return flat[offset:offset + nbytes].view(like.dtype).view(like.shape)


class WeightSleeper:
    """Moves a model's weights between the device and a host copy; tensors keep their Python
    identity (only `.data` changes), so every module and captured reference stays wired."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.device = device
        self.tensors = model_tensors(model)
        self.layout = _Layout.of(self.tensors)
        self.host: torch.Tensor | None = None  # flat pinned copy, made on the first sleep
        self.arena: DeviceArena | None = None
        self._use_arena = arenas_supported(device)

    def prepare(self) -> bool:
        """Make the host copy now (pinning gigabytes takes seconds and stalls the device
        meanwhile), so that the first sleep is as quick as the later ones. Returns whether
        there is a copy to make (GPU only)."""
        if self.device.type != "cuda":
            return False
        if self.host is None:
            self.host = self._copy_to_host()
        return True

    def sleep(self) -> None:
        """Hand the weights' device memory back (a no-op on CPU)."""
        if not self.prepare():
            return
        for tensor, offset in zip(self.tensors, self.layout.offsets, strict=True):
            tensor.data = _view(self.host, offset, tensor)
        if self.arena is not None:
            self.arena.release()
        torch.cuda.empty_cache()

    def wake(self) -> None:
        """Bring the weights back to the device in one copy."""
        if self.device.type != "cuda" or self.host is None:
            return
        flat = self._device_buffer()
        flat[:self.layout.nbytes].copy_(self.host, non_blocking=True)
        for tensor, offset in zip(self.tensors, self.layout.offsets, strict=True):
            tensor.data = _view(flat, offset, tensor)
        torch.cuda.synchronize(self.device)

    def _copy_to_host(self) -> torch.Tensor:
        host = torch.empty(self.layout.nbytes, dtype=torch.uint8, pin_memory=True)
        for tensor, offset in zip(self.tensors, self.layout.offsets, strict=True):
            _view(host, offset, tensor).copy_(tensor, non_blocking=True)
        torch.cuda.synchronize(self.device)
        return host

    def _device_buffer(self) -> torch.Tensor:
        if not self._use_arena:
            return torch.empty(self.layout.nbytes, dtype=torch.uint8, device=self.device)
        if self.arena is None:
            self.arena = DeviceArena(self.layout.nbytes, self.device)
        else:
            self.arena.remap()
        return self.arena.tensor


class KVArena:
    """The KV cache's device memory, at fixed addresses across sleeps where the driver
    allows it (else a fresh tensor each wake)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.arena: DeviceArena | None = None

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if not arenas_supported(self.device):
            return torch.empty(shape, dtype=dtype, device=self.device)
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if self.arena is None:
            self.arena = DeviceArena(nbytes, self.device)
        else:
            self.arena.remap()
        return self.arena.view(0, shape, dtype)

    def release(self) -> None:
        if self.arena is not None:
            self.arena.release()


def address_fingerprint(tensors: list[torch.Tensor], kv_cache: torch.Tensor | None) -> tuple:
    """The device addresses a captured CUDA graph depends on."""
    return (tuple(t.data_ptr() for t in tensors),
            kv_cache.data_ptr() if kv_cache is not None else None)
