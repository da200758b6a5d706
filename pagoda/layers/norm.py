"""RMSNorm, with the residual add fused in (returns the new residual too)."""

from __future__ import annotations

import os

import torch
from torch import nn

from pagoda.layers import cpu_fused
from pagoda.layers.custom_op import DeviceDispatch
from pagoda.layers.float8_rows import Float8Rows
from pagoda.layers.linear import LinearBase, RowParallelLinear, copy_checked
from pagoda.layers.normed_rows import NormedRows

# whether an RMSNorm between two products that can do it runs in their kernels
# (norm_in_products): PAGODA_NORM_IN_PRODUCTS=1 always, 0 never, auto (the default) where
# the kernels launch without programmatic dependent launch (GPUs before Hopper, PAGODA_PDL=0).
# On an H100 (8B, AWQ decode-1) it saved 0.10 ms a token without PDL and cost 0.07 with it,
# where the norm's launch is already hidden (bench/results/README.md); read once
NORM_IN_PRODUCTS = os.environ.get("PAGODA_NORM_IN_PRODUCTS", "auto")
if NORM_IN_PRODUCTS not in ("auto", "0", "1"):
    raise ValueError(f"PAGODA_NORM_IN_PRODUCTS={NORM_IN_PRODUCTS!r}: auto, 0 or 1")


class RMSNorm(DeviceDispatch):
    """x / rms(x) * weight, computed in float32; with a residual, the add is fused in."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward_cuda(self, x: torch.Tensor,
                     residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        from pagoda.layers.fused import add_rms_norm
        return add_rms_norm(x, residual, self.weight, self.eps)

    def forward_cpu(self, x: torch.Tensor,
                    residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if cpu_fused.takes_norm(x, residual):
            return cpu_fused.add_rms_norm(x, residual, self.weight, self.eps)
        return self.forward_native(x, residual)

    def float8_rows(self, x: torch.Tensor, residual: torch.Tensor | None = None
                    ) -> tuple[Float8Rows, torch.Tensor]:
        """This norm of x (+ residual) on a GPU as Float8Rows, for an FP8 product on tensor
        cores (quantized in the norm's own launch), and the new residual."""
        from pagoda.layers.fused import add_rms_norm_float8
        return add_rms_norm_float8(x, residual, self.weight, self.eps)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """This norm over the last dim of x [tokens, heads, dim] (q's or k's heads, a view
        of a qkv row): on CPU read in place by the fused kernel, else through a copy."""
        if cpu_fused.takes_heads(x):
            return cpu_fused.rms_norm_heads(x, self.weight, self.eps)
        return self(x.reshape(-1, x.shape[-1]))[0].view(x.shape)

    def forward_native(self, x: torch.Tensor,
                       residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            x = x + residual
        residual = x
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * self.weight.float()).to(x.dtype), residual


class GemmaRMSNorm(RMSNorm):
    """Gemma's x / rms(x) * (1 + w): the parameter holds 1 + w (added at load), so the same
    kernels run it. Random or missing weights (w = 0) are ones, as for RMSNorm."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__(hidden_size, eps)
        self.weight.weight_loader = self._load_shifted

    @staticmethod
    def _load_shifted(param: nn.Parameter, tensor: torch.Tensor, shard: int | None = None) -> None:
        copy_checked(param, tensor.float() + 1.0)


def norm_add_norm(x: torch.Tensor, residual: torch.Tensor | None, first: RMSNorm | None,
                  second: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """`second(first(x) + residual)` and the new residual: a block's output norm (none when
    `first` is None), the residual add and the next pre-norm, one kernel on CUDA."""
    if first is None:
        return second(x, residual)
    if x.is_cuda and residual is not None:
        from pagoda.layers.fused import norm_add_rms_norm
        return norm_add_rms_norm(x, residual, first.weight, first.eps, second.weight,
                                 second.eps)
    return second(first(x)[0], residual)


def norm_for_product(norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None,
                     consumer: LinearBase | None
                     ) -> tuple[torch.Tensor | Float8Rows, torch.Tensor]:
    """`norm(x, residual)`: the normed rows, as Float8Rows where the product they feed
    (`consumer`) multiplies them as float8, and the new residual."""
    if consumer is not None and consumer.takes_float8_rows(x):
        return norm.float8_rows(x, residual)
    return norm(x, residual)


def product_then_norm(product: RowParallelLinear, x: torch.Tensor, norm: RMSNorm,
                      residual: torch.Tensor | None, consumer: LinearBase | None
                      ) -> tuple[torch.Tensor | NormedRows | Float8Rows, torch.Tensor]:
    """`norm(product(x), residual)`: the normed rows and the new residual, from
    norm_in_products where the products can, else from the norm's own kernel
    (norm_for_product)."""
    done = norm_in_products(product, x, norm, residual, consumer)
    return done if done is not None else norm_for_product(norm, product(x), residual,
                                                          consumer)


def norm_in_products(product: RowParallelLinear, x: torch.Tensor | Float8Rows, norm: RMSNorm,
                     residual: torch.Tensor | None, consumer: LinearBase | None
                     ) -> tuple[NormedRows, torch.Tensor] | None:
    """`norm(product(x), residual)` run by the products around it: `product` stores the
    new residual and returns NormedRows, which the next product (`consumer`) finishes in
    place of taking the norm's rows (no launch of its own, no wait between). None where
    they cannot (then nothing ran; float8 rows are of calls of more tokens than these
    kernels take)."""
    if residual is None or consumer is None or isinstance(x, Float8Rows) \
            or not consumer.finishes_norm(x.numel() // x.shape[-1]) \
            or not _norm_in_products_on(x.device):
        return None
    return product.then_norm(x, norm.weight, norm.eps, residual)


def _norm_in_products_on(device: torch.device) -> bool:
    """NORM_IN_PRODUCTS for kernels launched on `device`."""
    if NORM_IN_PRODUCTS != "auto":
        return NORM_IN_PRODUCTS == "1"
    from pagoda.layers.dependent_launch import dependent_launch
    return not dependent_launch(device)["PDL"]
