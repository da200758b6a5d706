"""What a quantization format provides: a linear method per layer, by the layer's name; and
the float form a method falls back to where no kernel takes its codes."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from pagoda.errors import UnsupportedModelError
from pagoda.layers.embedding import LMHead, VocabEmbedding
from pagoda.layers.linear import LinearBase, LinearMethod
from pagoda.layers.normed_rows import NormedRows
from pagoda.layers.quantization.group_gemm import GroupQuantWeight

if TYPE_CHECKING:
    from pagoda.layers.quantization.cpu_block_dot import GroupCodes
    from pagoda.layers.quantization.cpu_fp8_dot import Fp8Rows


class QuantizationConfig(ABC):
    """One checkpoint's quantization: the format's name and the method of each linear
    layer (None: the layer stays in the model's dtype)."""

    name: str

    @abstractmethod
    def linear_method(self, prefix: str, layer: LinearBase) -> LinearMethod | None:
        """The method of the linear layer called `prefix` (its module path)."""

    def bind_embedding(self, embedding: VocabEmbedding) -> None:
        """Give an embedding whose table no LM head shares the format's form of its table
        (by default it stays in the model's dtype)."""

    def bind_head(self, head: LMHead) -> None:
        """Give an LM head tied to no embedding the format's form of its table (by default
        it stays in the model's dtype)."""

    def bind_tied_table(self, embedding: VocabEmbedding, head: LMHead) -> None:
        """Give a table that `embedding` and `head` share the format's form (by default it
        stays in the model's dtype)."""

    # whether expert_codes gives expert projections' codes for a CPU kernel running here
    holds_expert_codes = False
    # whether expert_codes gives expert projections' codes (held so by the GPU's fused MoE
    # kernel where it takes their layout)
    gives_expert_codes = False
    # whether the format's experts are float8 (floats quantized so under `--quantization fp8`)
    float8_experts = False
    # (bits, group) of an integer format's codes, which dummy experts take (bind_experts)
    dummy_expert_layout: tuple[int, int] | None = None
    at_load = False  # whether the format quantizes floats at load (`--quantization fp8`)

    def expert_codes(self, tensors: dict[str, Any]
                     ) -> GroupCodes | Fp8Rows | torch.Tensor | None:
        """As decode_expert, the projection's codes (or a float weight left unquantized) for
        a CPU kernel where `holds_expert_codes`, for the GPU's MoE kernel where
        `gives_expert_codes`."""
        raise NotImplementedError

    def decode_expert(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """One expert projection's float weight [out, in] from its checkpoint tensors
        (`weight`, `qweight`, `weight_scale`...: the names after the projection's), or None
        while some it needs have not come yet: experts held in the model's dtype (no kernel
        there takes their codes) are decoded at load. By default a float weight is taken as
        it is."""
        if set(tensors) != {"weight"}:
            raise UnsupportedModelError(f"{self.name} experts ({', '.join(sorted(tensors))}) "
                                        "are not supported")
        return tensors["weight"]


def decoded_groups(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor,
                   group_of_input: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 weights codes * scale + low from codes [out, in] and a scale and low per
    group [out, groups]; input i is in group `group_of_input[i]` (default: i // (in / groups),
    groups of consecutive inputs)."""
    inputs, groups = codes.shape[1], scale.shape[1]
    if group_of_input is None:
        group_of_input = torch.arange(inputs, device=codes.device) // (inputs // groups)
    return codes.float() * scale.float()[:, group_of_input] + low.float()[:, group_of_input]


class DenseWeight(nn.Module):
    """A layer's weights held as floats (decoded at load, or stored so); `__call__(x)` is
    x W^T in x's dtype."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class GroupWeightMethod(LinearMethod):
    """A linear method whose layers may hold their weights as a GroupQuantWeight
    (`group_weight`): an RMSNorm between two such layers is done by their kernels (the
    first's last step stores the normed rows but for their rms, the second's divides by
    it)."""

    def group_weight(self, layer: LinearBase) -> GroupQuantWeight | None:
        """The layer's weights as a GroupQuantWeight, or None where they are not one."""
        return None

    def input_order(self, layer: LinearBase) -> torch.Tensor | None:
        """The order the layer's kernel takes its inputs in (None: as given)."""
        return None

    def apply_then_norm(self, layer: LinearBase, x: torch.Tensor, norm_weight: torch.Tensor,
                        eps: float, residual: torch.Tensor
                        ) -> tuple[NormedRows, torch.Tensor] | None:
        weight, order = self.group_weight(layer), self.input_order(layer)
        if weight is None:
            return None
        return weight.then_norm(x if order is None else x.index_select(-1, order), residual,
                                norm_weight, eps)

    def finishes_norm(self, layer: LinearBase, tokens: int) -> bool:
        weight = self.group_weight(layer)
        return weight is not None and weight.finishes_norm(tokens)

    def apply_normed(self, layer: LinearBase, rows: NormedRows,
                     activation: nn.Module | None = None) -> torch.Tensor | None:
        weight, order = self.group_weight(layer), self.input_order(layer)
        if weight is None:
            return None
        if order is not None:
            rows = NormedRows(rows.values.index_select(-1, order), rows.squares, rows.eps)
        return weight.normed(rows, activation)
