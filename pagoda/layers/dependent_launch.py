"""Programmatic dependent launch (Hopper and later) for the Triton kernels of a forward pass.

A kernel launched with it may be scheduled while the kernel before it in the stream is still
finishing, instead of after that kernel's end has gone through the stream: at decode sizes a
layer is a chain of short kernels, and each launch's latency is a fixed cost of every step.
Each kernel that takes it has a PDL constexpr; with PDL set its programs wait for the
previous kernel (`griddepcontrol.wait`: that kernel complete and its writes visible) before
they touch anything a kernel writes, so nothing races with it (only weights may be read
before: the one-token 4-bit GEMV requests its first tile of them first, and with
PAGODA_WEIGHT_PREFETCH=N the planes and float8 few-token kernels ask L2 for their first N
steps of them, `prefetch_to_l2`), and then let the next kernel launch
(`griddepcontrol.launch_dependents`). CUDA graphs capture the dependency as a programmatic
edge. Off elsewhere (CPU, Triton's interpreter, GPUs before Hopper, ROCm) and with
PAGODA_PDL=0. LoRA's shrink and expand kernels launch as usual: a kernel launched
without it waits for the whole of the one before, PDL or not.
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


def prefetched_steps(device: torch.device) -> int:
    """How many of its first steps of weights a kernel launched with PDL on `device` asks
    of L2 before it waits (`prefetch_to_l2`): PAGODA_WEIGHT_PREFETCH (default 0, none). On
    the H200 all of them (a split's whole weights) made AWQ decode-1 2.56 -> 3.43 ms a token
    and FP8 3.25 -> 5.23 (`bash bench/gpu/run.sh prefetch-decode1`)."""
    steps = int(os.environ.get("PAGODA_WEIGHT_PREFETCH", "0"))
    return steps if dependent_launch(device)["PDL"] else 0


@triton.jit
def prefetch_to_l2(base, ROWS: tl.constexpr, row_bytes, LINES: tl.constexpr, steps, step_bytes):
    """Ask L2 (`prefetch.global.L2`) for the 128-byte lines at byte offsets
    r row_bytes + l 128 + s step_bytes from `base` (r < ROWS, l < LINES, s < steps): a
    kernel's weights, which no kernel writes, asked for before it waits for the previous
    one, so that their reads start while that one finishes. A GPU only (inline PTX)."""
    base = base.to(tl.pointer_type(tl.int8))
    at = (tl.arange(0, ROWS).to(tl.int64) * row_bytes)[:, None] \
        + (tl.arange(0, LINES) * 128)[None, :]
    for step in range(steps):
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l",
                                  [base + at + step * step_bytes], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    """A kernel's first statement: with PDL, wait until the previous kernel in the stream
    is complete, then let the next one launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
