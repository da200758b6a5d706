"""4-bit weights on CPU through torch's weight-packed matmul
(`aten._weight_int4pack_mm_for_cpu`): codes 0..15 with a scale and a zero per group of input
columns, weight = (code - 8) * scale + zero. Every 4-bit format whose weights are
code * scale + min per group (GGUF Q4_0/Q4_1/Q4_K, AWQ, GPTQ) packs into it exactly, up to
the kernel's bfloat16 scales and activations (its float32 path is a slow reference)."""

from __future__ import annotations

import torch
from torch import nn

COMPUTE_DTYPE = torch.bfloat16
GROUP_SIZES = (32, 64, 128, 256)
_INNER_K_TILES = 2


def int4_packable(device: torch.device, in_features: int, group_size: int) -> bool:
    """Whether the CPU kernel can run this shape: on CPU, a supported group that divides the
    input width."""
    return (device.type == "cpu" and group_size in GROUP_SIZES
            and in_features % group_size == 0 and hasattr(torch.ops.aten,
                                                          "_weight_int4pack_mm_for_cpu"))


class Int4PackedWeight(nn.Module):
    """[out, in] 4-bit weights packed for the CPU kernel; `__call__(x)` is x W^T."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor,
                 group_size: int) -> None:
        """`codes` [out, in] in 0..15; `scale`, `low` [out, in / group_size]: each weight is
        code * scale + low."""
        super().__init__()
        self.group_size = group_size
        self.out_features, self.in_features = codes.shape
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            codes.to(torch.int32).contiguous(), _INNER_K_TILES)
        zero = low + 8.0 * scale  # the kernel subtracts 8 from every code
        scales_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(COMPUTE_DTYPE)
        self.packed = nn.Parameter(packed, requires_grad=False)
        self.scales_zeros = nn.Parameter(scales_zeros.contiguous(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(COMPUTE_DTYPE)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size,
                                                        self.scales_zeros)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
