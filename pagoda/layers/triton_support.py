"""What Triton compiles for a CUDA device, where kernels must choose around it; and the
device's compute capability, asked once per device."""

from __future__ import annotations

import functools

import torch

E4M3_CAPABILITY = (8, 9)  # Ada and Hopper on (also where FP8 tensor cores start)


@functools.cache
def cuda_capability(device_index: int) -> tuple[int, int]:
    """A CUDA device's compute capability (one driver query per device)."""
    return torch.cuda.get_device_capability(device_index)


def device_index(device: torch.device | str) -> int:
    """A CUDA device's index (the current device for a bare "cuda")."""
    device = torch.device(device)
    return device.index if device.index is not None else torch.cuda.current_device()


def has_e4m3(capability: tuple[int, int] | None) -> bool:
    """Whether Triton types float8 E4M3 (`tl.float8e4nv`) for a CUDA compute capability:
    from 8.9 on (before, it offers only E5M2 and its own E4M3 variant). None stands for the
    CPU interpreter, which has it."""
    return capability is None or capability >= E4M3_CAPABILITY
