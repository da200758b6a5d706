"""Zeroed int32 counters, one per output tile, with which a Triton kernel's programs find the
last of them to finish a tile (it then adds what the others stored: no second launch). Every
launch leaves its counters zero again, so one set per device serves every kernel and layer of
a stream. A larger call gets a larger set; a call under CUDA-graph capture that needs a new
one gets it from the graph's memory, zeroed in the graph."""

from __future__ import annotations

import torch

# every counter set ever handed out, per device: a captured CUDA graph keeps the address of
# the one it was captured with, so none may be freed (they are a few KiB)
COUNTERS: dict[torch.device, list[torch.Tensor]] = {}


def tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """At least `tiles` zeroed counters on `device`."""
    held = COUNTERS.setdefault(device, [])
    if held and held[-1].numel() >= tiles:
        return held[-1]
    held.append(torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device))
    return held[-1]


def nonzero_counters() -> int:
    """Counters left non-zero on any device (a launch that did not reset its own)."""
    return sum(int(counters.count_nonzero()) for held in COUNTERS.values() for counters in held)
