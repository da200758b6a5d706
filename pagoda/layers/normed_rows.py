"""An RMSNorm's output left for the product after it to finish: a product whose outputs feed
the norm (an output projection before a block's MLP) stores the new residual times the norm's
weight and each row's sums of squares, and the product that takes the rows (the gate-up
projection) divides its own sums by the rows' rms. The norm's launch, and its wait for the
product before it, leave the decode step (pagoda.layers.norm.product_then_norm)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class NormedRows:
    """Rows x times the norm's weight, not yet divided by their rms (`values` [..., width]),
    each row's sums of x's squares by the writing product's output tile (`squares`
    [tiles, rows], float32) and the norm's `eps`."""

    values: torch.Tensor
    squares: torch.Tensor
    eps: float

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def inverse_rms(self) -> torch.Tensor:
        """Each row's 1 / sqrt(mean square + eps) [rows], float32."""
        return torch.rsqrt(self.squares.sum(0) / self.values.shape[-1] + self.eps)

    def materialize(self) -> torch.Tensor:
        """The normed rows themselves, for a product that cannot finish the norm."""
        rows = self.values.reshape(-1, self.values.shape[-1]).float()
        return (rows * self.inverse_rms()[:, None]).to(self.values.dtype).view(self.shape)
