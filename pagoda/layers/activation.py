"""Gated activations."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from pagoda.layers import cpu_fused
from pagoda.layers.custom_op import DeviceDispatch
from pagoda.layers.float8_rows import Float8Rows


class GatedActivation(DeviceDispatch):
    """act(gate) * up, for an input laid out as [gate | up] on the last dim."""

    kernel_kind = 0  # what the gate-up product kernels that apply it to their outputs call it

    def float8_rows(self, x: torch.Tensor) -> Float8Rows:
        """The activation of x [tokens, 2 d] (on a GPU) as Float8Rows, for an FP8 product
        on tensor cores: quantized in the activation's own launch."""
        from pagoda.layers.fused import gated_act_float8
        return gated_act_float8(x, gelu_tanh=self.kernel_kind == 2)


class SiluAndMul(GatedActivation):
    """silu(gate) * up, for an input laid out as [gate | up] on the last dim."""

    kernel_kind = 1

    def forward_cuda(self, x: torch.Tensor) -> torch.Tensor:
        from pagoda.layers.fused import silu_and_mul
        return silu_and_mul(x)

    def forward_cpu(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_fused.gated("silu", x) if cpu_fused.takes_gated(x) \
            else self.forward_native(x)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluTanhAndMul(GatedActivation):
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
