"""Random weights for any config: benchmarks and tests of any model size."""

from __future__ import annotations

import torch
from torch import nn

from pagoda.layers.linear import LinearBase
from pagoda.layers.moe.layer import FusedMoE
from pagoda.layers.norm import RMSNorm


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Fill every parameter in place: norms with ones, everything else N(0, std); linear
    layers of a quantized format, and experts held as its codes, get random weights in that
    format's form."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    seen: set[int] = set()
    for module in model.modules():
        if (isinstance(module, LinearBase) and module.method.init_dummy(module, generator, std)
                or isinstance(module, FusedMoE) and module.init_dummy(generator, std)):
            seen.update(id(param) for param in module.parameters(recurse=False))
            continue
        for param in module.parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if isinstance(module, RMSNorm):
                param.fill_(1.0)
            else:
                param.normal_(0.0, std, generator=generator)
