"""Programmatic dependent launch (Hopper and later) for the Triton kernels of a forward pass.

A kernel launched with it may be scheduled while the kernel before it in the stream is still
finishing, instead of after that kernel's end has gone through the stream: at decode sizes a
layer is a chain of short kernels, and each launch's latency is a fixed cost of every step.
Each kernel that takes it has a PDL constexpr; with PDL set its programs wait for the
previous kernel (`griddepcontrol.wait`: that kernel complete and its writes visible) before
they touch anything a kernel writes, so nothing races with it (only weights may be read
before: the one-token 4-bit GEMV requests its first tile of them first), and then let the
next kernel launch (`griddepcontrol.launch_dependents`). CUDA graphs capture the dependency
as a programmatic edge. Off elsewhere (CPU, Triton's interpreter, GPUs before Hopper, ROCm)
and with PAGODA_PDL=0. LoRA's shrink and expand kernels launch as usual: a kernel launched
without it waits for the whole of the one before, PDL or not. (Asking L2 for a product's
weights before the wait, all of them or their first steps, made quantized decode slower on
the H200 and the H100: bench/results/README.md.)
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from pagoda.layers.triton_support import cuda_capability

OFF = {"PDL": False}
ON = {"PDL": True, "launch_pdl": True}


def dependent_launch(device: torch.device) -> dict[str, bool]:
    """The launch arguments of a kernel that takes PDL, for a launch on `device`."""
    if device.type != "cuda":
        return OFF
    index = device.index if device.index is not None else torch.cuda.current_device()
    return ON if _enabled(index) else OFF


@functools.cache
def _enabled(device_index: int) -> bool:
    return (os.environ.get("PAGODA_PDL", "1") != "0" and torch.version.hip is None
            and cuda_capability(device_index) >= (9, 0))


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr, LAUNCH_NEXT: tl.constexpr = True):
    """A kernel's first statement: with PDL, wait until the previous kernel in the stream
    is complete, then (unless LAUNCH_NEXT is off: the kernel calls launch_next_kernel later)
    let the next one launch."""
    if PDL:
        gdc_wait()
        if LAUNCH_NEXT:
            gdc_launch_dependents()


@triton.jit
def launch_next_kernel(PDL: tl.constexpr):
    """With PDL, let the next kernel launch (for a kernel that waited without doing so)."""
    if PDL:
        gdc_launch_dependents()
