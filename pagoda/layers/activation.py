"""Gated activations."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from pagoda.layers import cpu_fused
from pagoda.layers.custom_op import DeviceDispatch


class SiluAndMul(DeviceDispatch):
    """silu(gate) * up, for an input laid out as [gate | up] on the last dim."""

    kernel_kind = 1  # what the gate-up product kernels that apply it to their outputs call it

    def forward_cuda(self, x: torch.Tensor) -> torch.Tensor:
        from pagoda.layers.fused import silu_and_mul
        return silu_and_mul(x)

    def forward_cpu(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_fused.gated("silu", x) if cpu_fused.takes_gated(x) \
            else self.forward_native(x)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluTanhAndMul(DeviceDispatch):
    """gelu_tanh(gate) * up (Gemma's gelu_pytorch_tanh), for [gate | up] on the last dim."""

    kernel_kind = 2

    def forward_cuda(self, x: torch.Tensor) -> torch.Tensor:
        from pagoda.layers.fused import gelu_tanh_and_mul
        return gelu_tanh_and_mul(x)

    def forward_cpu(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_fused.gated("gelu_tanh", x) if cpu_fused.takes_gated(x) \
            else self.forward_native(x)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up
