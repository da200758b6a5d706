"""4-bit weight-only checkpoints (W4A16): AWQ (GEMM packing, zero points), GPTQ
(symmetric or not, `desc_act` with `g_idx`) and compressed-tensors `pack-quantized`. Each
layer's pieces are unpacked to codes, a scale and a min per group of inputs, then held for
the Triton kernel on CUDA (group_gemm) or packed for torch's int4 matmul on CPU; GPTQ's
act-order inputs are sorted by group first and the activations permuted to match.

AWQ (AutoAWQ's GEMM layout): qweight int32 [in, out / 8], eight outputs per int32 in the
nibble order 0 2 4 6 1 3 5 7; qzeros int32 [in / group, out / 8] likewise; scales
[in / group, out]; weight = (q - zero) * scale.
GPTQ: qweight int32 [in / 8, out], eight consecutive inputs per int32, lowest nibble
first; qzeros int32 [groups, out / 8], eight consecutive outputs per int32; scales
[groups, out]; g_idx [in], each input's group; weight = (q - (zero + 1)) * scale (the "+1"
of the original gptq format; gptq_v2 stores zero itself).
compressed-tensors pack-quantized: weight_packed int32 [out, in / 8], eight consecutive
inputs per int32, lowest nibble first, each the signed code + 8; weight_scale [out, groups];
asymmetric: weight_zero_point int32 [out / 8, groups], packed along the outputs likewise;
weight_g_idx optional (act order); weight = (code - zero) * scale."""

from __future__ import annotations

from typing import Any

import torch

from pagoda.errors import UnsupportedModelError
from pagoda.layers.linear import LinearBase, LinearMethod, WeightLoader
from pagoda.layers.quantization.base import QuantizationConfig
from pagoda.layers.quantization.fp8 import skipped_module
from pagoda.layers.quantization.group_gemm import GroupQuantWeight, supports
from pagoda.layers.quantization.int4 import GROUP_SIZES, Int4PackedWeight, int4_packable
from pagoda.layers.quantization.pieces import (
    Layout,
    add_collected_parameters,
    collected_pieces,
    piece_sizes,
)

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the output each nibble of an AWQ int32 holds


def unpack_int32(packed: torch.Tensor, dim: int, order: tuple[int, ...] = tuple(range(8))
                 ) -> torch.Tensor:
    """int32 holding eight nibbles -> 8x as many values along `dim`; nibble i (bits 4i..)
    is element `order[i]` of its group of eight."""
    shifts = torch.tensor([4 * order.index(j) for j in range(8)], dtype=torch.int32,
                          device=packed.device)
    values = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF  # [..., 8] per int32
    values = values.movedim(-1, dim + 1 if dim >= 0 else dim)
    shape = list(packed.shape)
    shape[dim] *= 8
    return values.reshape(shape)


def _group_rows(scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[groups, out] scale and zero point -> [out, groups] scale and min (-zero * scale)."""
    scale = scales.float()
    return scale.t(), (-zeros.float() * scale).t()


def awq_groups(piece: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """An AWQ piece as codes [out, in], scale [out, groups], min [out, groups]."""
    codes = unpack_int32(piece["qweight"], 1, AWQ_ORDER).t()
    zeros = unpack_int32(piece["qzeros"], 1, AWQ_ORDER)
    return (codes, *_group_rows(piece["scales"], zeros))


def gptq_groups(piece: dict[str, torch.Tensor], zero_offset: int
                ) -> tuple[torch.Tensor, ...]:
    """A GPTQ piece as codes [out, in] (inputs in checkpoint order), scale and min per
    group [out, groups]."""
    codes = unpack_int32(piece["qweight"], 0).t()
    zeros = unpack_int32(piece["qzeros"], 1) + zero_offset
    return (codes, *_group_rows(piece["scales"], zeros))


def act_order(g_idx: torch.Tensor, group_size: int, layer: LinearBase, fmt: str = "gptq"
              ) -> torch.Tensor | None:
    """The permutation that puts GPTQ's inputs in group order (None: already in order);
    every group must hold `group_size` inputs. A row-parallel rank's `g_idx` covers its
    inputs only: they must be in order (its groups' scales are the only ones it holds)."""
    g_idx = g_idx.to(torch.int64)
    inputs = layer.rank_inputs()
    start = 0 if inputs is None else inputs[0]
    expected = torch.arange(start, start + g_idx.numel(), device=g_idx.device) // group_size
    if inputs is not None and not torch.equal(g_idx, expected):
        raise UnsupportedModelError(
            f"{fmt} act-order (desc_act) weights do not split over the inputs of a "
            f"row-parallel layer (tensor-parallel size {layer.group.size}): a rank's inputs "
            "fall in groups all over the matrix; use a checkpoint without act order, or no "
            "tensor parallelism")
    if torch.equal(g_idx, expected):
        return None
    order = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[order], expected):
        raise UnsupportedModelError("GPTQ g_idx whose groups differ in size is not supported")
    return order


class Int4CheckpointMethod(LinearMethod):
    """A linear layer of an AWQ, GPTQ or compressed-tensors int4 checkpoint."""

    def __init__(self, config: Int4CheckpointConfig) -> None:
        self.config = config

    def create_weights(self, layer: LinearBase, loader: WeightLoader) -> None:
        inputs = layer.rank_inputs()
        if inputs is not None and inputs[1] % self.config.group_size:
            raise UnsupportedModelError(
                f"{self.config.name} weights do not split over {layer.group.size} "
                f"tensor-parallel ranks here: each rank's {inputs[1]} of the {layer.in_features} "
                f"inputs are not whole groups of {self.config.group_size}")
        device = torch.empty(0).device
        if device.type == "cuda" and not supports(layer.local_in, self.config.group_size, 4):
            raise UnsupportedModelError(
                f"{self.config.name} weights on CUDA need groups of a multiple of 32 inputs "
                f"and a layer width a multiple of 64 (width {layer.local_in}, group "
                f"{self.config.group_size})")
        if device.type != "cuda" and not int4_packable(device, layer.local_in,
                                                       self.config.group_size):
            raise UnsupportedModelError(
                f"{self.config.name} weights run on CUDA, or on CPU with group size one of "
                f"{GROUP_SIZES} dividing the inputs ({layer.local_in}, group "
                f"{self.config.group_size})")
        add_collected_parameters(layer, self.config.tensor_layouts(), self.config.name,
                                 optional=self.config.optional_names)

    def init_dummy(self, layer: LinearBase, generator: torch.Generator, std: float) -> bool:
        rows, groups = sum(piece_sizes(layer)), layer.local_in // self.config.group_size
        device = generator.device
        codes = torch.randint(0, 16, (rows, layer.local_in), generator=generator,
                              device=device, dtype=torch.uint8)
        scale = torch.full((rows, groups), std / 4.6, device=device)  # codes' std is 4.6
        layer.dummy_groups = (codes, scale, -8.0 * scale)
        return True

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        pieces = collected_pieces(layer)
        order = self.config.input_order(pieces, layer)
        dummy = layer.__dict__.pop("dummy_groups", None)
        groups = [dummy] if dummy is not None else [self.config.unpack(p) for p in pieces]
        codes, scale, low = (torch.cat(parts) for parts in zip(*groups))
        if codes.shape != (sum(piece_sizes(layer)), layer.local_in):
            raise ValueError(f"{self.config.name} tensors unpack to {tuple(codes.shape)}, "
                             f"not the layer's [{layer.local_out}, {layer.local_in}]")
        if order is not None:
            codes = codes[:, order]
            layer.register_buffer("input_order", order, persistent=False)
        if codes.is_cuda:  # the collected tensors are on the layer's device
            layer.int4 = GroupQuantWeight(codes, scale, low, self.config.group_size, 4)
        else:
            layer.int4 = Int4PackedWeight(codes, scale, low, self.config.group_size)

    def apply(self, layer: LinearBase, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        order = getattr(layer, "input_order", None)
        y = layer.int4(x if order is None else x.index_select(-1, order))
        return y if bias is None else y + bias

    def kernel(self, layer: LinearBase) -> str:
        name = layer.int4.kernel_name() if isinstance(layer.int4, GroupQuantWeight) else \
            "int4pack_mm_for_cpu"
        return name + (" (act order)" if hasattr(layer, "input_order") else "")


class Int4CheckpointConfig(QuantizationConfig):
    """What AWQ and GPTQ share: 4 bits, a group size, modules left unquantized."""

    optional_names: tuple[str, ...] = ("g_idx",)

    def __init__(self, values: dict[str, Any]) -> None:
        bits = int(values.get("bits", values.get("w_bit", 4)))
        if bits != 4:
            raise UnsupportedModelError(f"{self.name} with {bits}-bit weights is not supported "
                                        "(4 bits are)")
        self.group_size = int(values.get("group_size", values.get("q_group_size", 128)))
        if self.group_size <= 0:
            raise UnsupportedModelError(f"{self.name} without groups (group_size "
                                        f"{self.group_size}) is not supported")
        self.skipped = tuple(values.get("modules_to_not_convert") or ())

    def linear_method(self, prefix: str, layer: LinearBase) -> LinearMethod | None:
        if skipped_module(prefix, self.skipped):
            return None
        return Int4CheckpointMethod(self)

    def tensor_layouts(self) -> dict[str, Layout | None]:
        """Each checkpoint tensor's name and where its outputs and inputs lie."""
        raise NotImplementedError

    def input_order(self, pieces: list[dict[str, torch.Tensor]], layer: LinearBase
                    ) -> torch.Tensor | None:
        return None

    def unpack(self, piece: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError


class AWQConfig(Int4CheckpointConfig):
    name = "awq"

    def __init__(self, values: dict[str, Any]) -> None:
        super().__init__(values)
        version = str(values.get("version", "gemm")).lower()
        if version != "gemm":
            raise UnsupportedModelError(f"AWQ {version} packing is not supported (GEMM is)")
        if not values.get("zero_point", True):
            raise UnsupportedModelError("AWQ without zero points is not supported")

    def tensor_layouts(self) -> dict[str, Layout | None]:
        group = self.group_size  # eight outputs per int32 of qweight and qzeros
        return {"qweight": Layout(output_dim=1, input_dim=0, output_unit=8),
                "qzeros": Layout(output_dim=1, input_dim=0, output_unit=8, input_unit=group),
                "scales": Layout(output_dim=1, input_dim=0, input_unit=group)}

    def unpack(self, piece: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return awq_groups(piece)


class GPTQConfig(Int4CheckpointConfig):
    name = "gptq"

    def __init__(self, values: dict[str, Any]) -> None:
        super().__init__(values)
        self.zero_offset = 0 if values.get("checkpoint_format") == "gptq_v2" else 1

    def tensor_layouts(self) -> dict[str, Layout | None]:
        group = self.group_size  # eight inputs per int32 of qweight, eight outputs of qzeros
        return {"qweight": Layout(output_dim=1, input_dim=0, input_unit=8),
                "qzeros": Layout(output_dim=1, input_dim=0, output_unit=8, input_unit=group),
                "scales": Layout(output_dim=1, input_dim=0, input_unit=group),
                "g_idx": Layout(input_dim=0)}

    def input_order(self, pieces: list[dict[str, torch.Tensor]], layer: LinearBase
                    ) -> torch.Tensor | None:
        g_idx = pieces[0].get("g_idx")
        if g_idx is None:
            return None
        if any(not torch.equal(p["g_idx"], g_idx) for p in pieces[1:] if "g_idx" in p):
            raise UnsupportedModelError("GPTQ pieces of one fused layer with different g_idx "
                                        "are not supported")
        return act_order(g_idx, self.group_size, layer, self.name)

    def unpack(self, piece: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return gptq_groups(piece, self.zero_offset)


class PackedInt4Config(Int4CheckpointConfig):
    """compressed-tensors `pack-quantized` 4-bit weights (`weights`: the config group's
    weight arguments), grouped; symmetric or with zero points."""

    name = "compressed-tensors"
    optional_names = ("weight_zero_point", "weight_g_idx")

    def __init__(self, weights: dict[str, Any], ignore: list[str]) -> None:
        if weights.get("strategy") != "group":
            raise UnsupportedModelError(f"compressed-tensors int4 {weights.get('strategy')} "
                                        "scales are not supported (group is)")
        super().__init__({"bits": weights.get("num_bits"), "group_size": weights.get("group_size"),
                          "modules_to_not_convert": ignore})
        self.symmetric = bool(weights.get("symmetric", True))

    def tensor_layouts(self) -> dict[str, Layout | None]:
        group = self.group_size  # eight inputs per int32 of weight_packed, eight outputs
        return {"weight_packed": Layout(output_dim=0, input_dim=1, input_unit=8),  # of zeros
                "weight_scale": Layout(output_dim=0, input_dim=1, input_unit=group),
                "weight_shape": None,
                "weight_zero_point": Layout(output_dim=0, input_dim=1, output_unit=8,
                                            input_unit=group),
                "weight_g_idx": Layout(input_dim=0)}

    def input_order(self, pieces: list[dict[str, torch.Tensor]], layer: LinearBase
                    ) -> torch.Tensor | None:
        renamed = [{"g_idx": p["weight_g_idx"]} if "weight_g_idx" in p else {} for p in pieces]
        return GPTQConfig.input_order(self, renamed, layer) if renamed[0] else None

    def unpack(self, piece: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        codes = unpack_int32(piece["weight_packed"], 1)
        scale = piece["weight_scale"].float()
        if self.symmetric:
            return codes, scale, -8.0 * scale
        zeros = unpack_int32(piece["weight_zero_point"], 0)[:codes.shape[0]]
        return codes, scale, -zeros.float() * scale
