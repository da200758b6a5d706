"""What Triton compiles for a CUDA device, where kernels must choose around it."""

from __future__ import annotations

E4M3_CAPABILITY = (8, 9)  # Ada and Hopper on


def has_e4m3(capability: tuple[int, int] | None) -> bool:
    """Whether Triton types float8 E4M3 (`tl.float8e4nv`) for a CUDA compute capability:
    from 8.9 on (before, it offers only E5M2 and its own E4M3 variant). None stands for the
    CPU interpreter, which has it."""
    return capability is None or capability >= E4M3_CAPABILITY
