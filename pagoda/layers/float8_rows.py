"""Activations handed to an FP8 product already as float8: the kernel that writes them (an
RMSNorm, a gated activation) stores each row as float8 values and a scale, in place of the
16-bit row that the product's own quantization (`triton_group_gemm.fp8_rows`) would read
back and write again, a launch of its own. The values are those fp8_rows makes of the
16-bit row, bit for bit."""

from __future__ import annotations

from dataclasses import dataclass

import torch

FLOAT8 = torch.float8_e4m3fn
FLOAT8_MAX = torch.finfo(FLOAT8).max


@dataclass(frozen=True, slots=True)
class Float8Rows:
    """Rows as float8 `values` [rows, width] times each row's float32 `scale` [rows, 1]; the
    rows' own type `dtype` (the product's output type)."""

    values: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    @classmethod
    def empty(cls, rows: int, width: int, dtype: torch.dtype,
              device: torch.device) -> Float8Rows:
        return cls(torch.empty(rows, width, dtype=FLOAT8, device=device),
                   torch.empty(rows, 1, dtype=torch.float32, device=device), dtype)

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def materialize(self) -> torch.Tensor:
        """The rows in their own type (values times scales), for a product that takes no
        float8 rows."""
        return (self.values.float() * self.scale).to(self.dtype)
