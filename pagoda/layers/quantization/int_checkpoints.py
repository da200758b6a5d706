"""Integer weight-only checkpoints (W4A16, W8A16): AWQ (4 bits, GEMM packing, zero
points), GPTQ (4 or 8 bits, symmetric or not, `desc_act` with `g_idx`), compressed-tensors
`pack-quantized` (4 or 8 bits) and `int-quantized` (int8 weights of the W8A8 schemes, run
weight-only). Each layer's pieces are unpacked to
codes, a scale and a min per group of inputs, then held for the Triton kernel on CUDA
(group_gemm); on CPU for pagoda's AVX-512 VNNI or AVX2 kernel (cpu_block_dot) where it runs and
holds the shape, else 4-bit codes packed for torch's int4 matmul and 8-bit ones decoded at
load to the model's dtype (torch has no CPU kernel for bytes with a scale per group, and
decoding them at every call cost 7-23x the float32 matmul of a 4096 x 4096 layer at 16 and
1 rows here). GPTQ's act-order inputs are sorted by group first and the activations
permuted to match.

Integers of b bits pack 32 / b to an int32 (per = 8 for 4 bits, 4 for 8), lowest bits
first.
AWQ (AutoAWQ's GEMM layout): qweight int32 [in, out / 8], eight outputs per int32 in the
nibble order 0 2 4 6 1 3 5 7; qzeros int32 [in / group, out / 8] likewise; scales
[in / group, out]; weight = (q - zero) * scale.
GPTQ: qweight int32 [in / per, out], consecutive inputs per int32; qzeros int32
[groups, out / per], consecutive outputs per int32; scales [groups, out]; g_idx [in],
each input's group; weight = (q - (zero + 1)) * scale (the "+1" of the original gptq
format; gptq_v2 stores zero itself).
compressed-tensors pack-quantized: weight_packed int32 [out, in / per], consecutive inputs
per int32, each the signed code + 2^(b-1); weight_scale [out, groups]; asymmetric:
weight_zero_point int32 [out / per, groups], packed along the outputs likewise;
weight_g_idx optional (act order); weight = (code - zero) * scale.
compressed-tensors int-quantized: weight int8 [out, in]; weight_scale [out, 1] (a scale per
row) or [out, groups]; asymmetric: weight_zero_point int8 likewise; weight = (q - zero) *
scale."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagoda.errors import UnsupportedModelError
from pagoda.layers.linear import LinearBase, LinearMethod, WeightLoader
from pagoda.layers.quantization import cpu_block_dot
from pagoda.layers.quantization.base import (
    DenseWeight,
    GroupWeightMethod,
    QuantizationConfig,
    decoded_groups,
)
from pagoda.layers.quantization.cpu_block_dot import BlockDotWeight, GroupCodes
from pagoda.layers.quantization.fp8 import skipped_module
from pagoda.layers.quantization.group_gemm import GroupQuantWeight, supports
from pagoda.layers.quantization.int4 import GROUP_SIZES, Int4PackedWeight, int4_packable
from pagoda.layers.quantization.pieces import (
    Layout,
    add_collected_parameters,
    collected_pieces,
    piece_sizes,
)
from pagoda.logger import get_logger

logger = get_logger(__name__)

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the output each nibble of an AWQ int32 holds


def per_int32(bits: int) -> int:
    """Integers of `bits` bits an int32 packs."""
    return 32 // bits


def unpack_int32(packed: torch.Tensor, dim: int, order: tuple[int, ...] | None = None,
                 bits: int = 4) -> torch.Tensor:
    """int32 holding 32 / bits integers -> that many times the values along `dim`; integer
    i (bits bits * i..) is element `order[i]` of its int32's run (default: in order)."""
    per = per_int32(bits)
    order = order or tuple(range(per))
    shifts = torch.tensor([bits * order.index(j) for j in range(per)], dtype=torch.int32,
                          device=packed.device)
    values = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    values = values.movedim(-1, dim + 1 if dim >= 0 else dim)
    shape = list(packed.shape)
    shape[dim] *= per
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


def gptq_groups(piece: dict[str, torch.Tensor], zero_offset: int, bits: int = 4
                ) -> tuple[torch.Tensor, ...]:
    """A GPTQ piece as codes [out, in] (inputs in checkpoint order), scale and min per
    group [out, groups]."""
    codes = unpack_int32(piece["qweight"], 0, bits=bits).t()
    zeros = unpack_int32(piece["qzeros"], 1, bits=bits) + zero_offset
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


def dummy_codes(rows: int, columns: int, bits: int, group: int, generator: torch.Generator,
                std: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale, low) of a random [rows, columns] weight in `bits`-bit codes with a scale
    and low per `group` inputs, its weights of mean 0 and standard deviation `std`."""
    levels, device = 1 << bits, generator.device
    codes = torch.randint(0, levels, (rows, columns), generator=generator, device=device,
                          dtype=torch.uint8)
    # uniform codes' standard deviation: levels / sqrt(12) (4.6 for 4 bits)
    scale = torch.full((rows, columns // group), std / (levels / 12 ** 0.5), device=device)
    return codes, scale, -(levels // 2) * scale


def _block_dot_fits(layer: LinearBase, group: int) -> bool:
    """Whether the CPU block-dot kernel runs here and holds the layer's (stacked) pieces."""
    return cpu_block_dot.holds(sum(piece_sizes(layer)), layer.local_in, group)


class IntCheckpointMethod(GroupWeightMethod):
    """A linear layer of an AWQ, GPTQ or compressed-tensors integer checkpoint."""

    def __init__(self, config: IntCheckpointConfig) -> None:
        self.config = config

    def create_weights(self, layer: LinearBase, loader: WeightLoader) -> None:
        inputs, group = layer.rank_inputs(), self.config.group_of(layer)
        if inputs is not None and inputs[1] % group:
            raise UnsupportedModelError(
                f"{self.config.name} weights do not split over {layer.group.size} "
                f"tensor-parallel ranks here: each rank's {inputs[1]} of the {layer.in_features} "
                f"inputs are not whole groups of {group}")
        device, bits = torch.empty(0).device, self.config.bits
        if (device.type == "cuda" or bits == 8) and not supports(layer.local_in, group, bits):
            raise UnsupportedModelError(
                f"{self.config.name} {bits}-bit weights need groups of 16 or a multiple of 32 "
                "inputs (4 bits: of 32, and a layer width a multiple of 64) dividing the "
                f"layer's width (width {layer.local_in}, group {group})")
        if device.type != "cuda" and bits == 4 and not (
                int4_packable(device, layer.local_in, group) or _block_dot_fits(layer, group)):
            raise UnsupportedModelError(
                f"{self.config.name} weights run on CUDA, or on CPU with group size one of "
                f"{GROUP_SIZES} dividing the inputs ({layer.local_in}, group {group})")
        add_collected_parameters(layer, self.config.tensor_layouts(), self.config.name,
                                 optional=self.config.optional_names)

    def init_dummy(self, layer: LinearBase, generator: torch.Generator, std: float) -> bool:
        layer.dummy_groups = dummy_codes(sum(piece_sizes(layer)), layer.local_in,
                                         self.config.bits, self.config.group_of(layer),
                                         generator, std)
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
        group, bits = self.config.group_of(layer), self.config.bits
        if codes.is_cuda:  # (the collected tensors are on the layer's device)
            layer.quantized = GroupQuantWeight(codes, scale, low, group, bits)
        elif codes.device.type == "cpu" and _block_dot_fits(layer, group):
            layer.quantized = BlockDotWeight(codes, scale, low, group, bits)
        elif bits == 4:
            layer.quantized = Int4PackedWeight(codes, scale, low, group)
        else:
            decoded = GroupQuantWeight(codes, scale, low, group, bits)
            layer.quantized = DenseWeight(decoded.dequantize(torch.get_default_dtype()))
            self.config.note_decoded_at_load()

    def apply(self, layer: LinearBase, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        order = self.input_order(layer)
        y = layer.quantized(x if order is None else x.index_select(-1, order))
        return y if bias is None else y + bias

    def group_weight(self, layer: LinearBase) -> GroupQuantWeight | None:
        weight = layer.quantized
        return weight if isinstance(weight, GroupQuantWeight) else None

    def input_order(self, layer: LinearBase) -> torch.Tensor | None:
        return getattr(layer, "input_order", None)

    def apply_gated(self, layer: LinearBase, x: torch.Tensor, activation: nn.Module,
                    bias: torch.Tensor | None = None) -> torch.Tensor | None:
        weight, order = self.group_weight(layer), self.input_order(layer)
        if weight is None:
            return None
        return weight.gated(x if order is None else x.index_select(-1, order), activation, bias)

    def kernel(self, layer: LinearBase) -> str:
        weight = layer.quantized
        if isinstance(weight, (GroupQuantWeight, BlockDotWeight)):
            name = weight.kernel_name()
        elif isinstance(weight, Int4PackedWeight):
            name = "int4pack_mm_for_cpu"
        else:
            name = f"{self.config.bits}-bit codes decoded at load (dense matmul)"
        return name + (" (act order)" if hasattr(layer, "input_order") else "")


class IntCheckpointConfig(QuantizationConfig):
    """What AWQ, GPTQ and compressed-tensors integers share: a width of `supported_bits`, a
    group size, modules left unquantized."""

    optional_names: tuple[str, ...] = ("g_idx",)
    supported_bits: tuple[int, ...] = (4, 8)
    act_order = False  # inputs in group order (GPTQ's desc_act, compressed-tensors' actorder)

    def __init__(self, values: dict[str, Any]) -> None:
        self.bits = int(values.get("bits", values.get("w_bit", 4)))
        if self.bits not in self.supported_bits:
            held = " or ".join(map(str, self.supported_bits))
            raise UnsupportedModelError(f"{self.name} with {self.bits}-bit weights is not "
                                        f"supported ({held} bits are)")
        self.group_size = int(values.get("group_size", values.get("q_group_size", 128)))
        if self.group_size <= 0:
            raise UnsupportedModelError(f"{self.name} without groups (group_size "
                                        f"{self.group_size}) is not supported")
        self.skipped = tuple(values.get("modules_to_not_convert") or ())
        self.decoded_at_load = False

    def note_decoded_at_load(self) -> None:
        """One log line, at the first layer whose codes no CPU kernel takes."""
        if not self.decoded_at_load:
            self.decoded_at_load = True
            logger.info("%s %d-bit weights decoded at load to %s on CPU (no CPU kernel for "
                        "them)", self.name, self.bits,
                        str(torch.get_default_dtype()).removeprefix("torch."))

    def group_of(self, layer: LinearBase) -> int:
        """The inputs a scale covers in `layer` (this rank's part of it)."""
        return self.group_size

    def linear_method(self, prefix: str, layer: LinearBase) -> LinearMethod | None:
        if skipped_module(prefix, self.skipped):
            return None
        return IntCheckpointMethod(self)

    def tensor_layouts(self) -> dict[str, Layout | None]:
        """Each checkpoint tensor's name and where its outputs and inputs lie."""
        raise NotImplementedError

    def input_order(self, pieces: list[dict[str, torch.Tensor]], layer: LinearBase
                    ) -> torch.Tensor | None:
        return None

    def unpack(self, piece: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def expert_needs(self) -> set[str]:
        """The tensors of one expert projection its decoding needs."""
        return set(self.tensor_layouts()) - set(self.optional_names)

    @property
    def holds_expert_codes(self) -> bool:
        """Where the block-dot kernel runs, for groups of consecutive inputs only (act order
        would permute each expert's inputs)."""
        return not self.act_order and cpu_block_dot.available()

    def _expert_groups(self, tensors: dict[str, torch.Tensor]
                       ) -> torch.Tensor | tuple[torch.Tensor, ...] | None:
        """A float weight left unquantized, or (codes, scale, low); None until complete."""
        weight = tensors.get("weight")
        if weight is not None and weight.is_floating_point():
            return weight
        if not self.expert_needs() <= set(tensors):
            return None
        return self.unpack(tensors)

    @property
    def gives_expert_codes(self) -> bool:
        """Groups of consecutive inputs only: act order's codes are decoded."""
        return not self.act_order

    @property
    def dummy_expert_layout(self) -> tuple[int, int] | None:
        return (self.bits, self.group_size) if self.gives_expert_codes else None

    def expert_codes(self, tensors: dict[str, torch.Tensor]
                     ) -> GroupCodes | torch.Tensor | None:
        found = self._expert_groups(tensors)
        if found is None or isinstance(found, torch.Tensor):
            return found
        codes, scale, low = found
        return GroupCodes(codes.to(torch.uint8), scale.float(), low.float(),
                          codes.shape[1] // scale.shape[1], self.bits)

    def decode_expert(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
        found = self._expert_groups(tensors)
        if found is None or isinstance(found, torch.Tensor):
            return found
        g_idx = tensors.get("g_idx", tensors.get("weight_g_idx"))
        return decoded_groups(*found, None if g_idx is None else g_idx.long())


class AWQConfig(IntCheckpointConfig):
    name = "awq"
    supported_bits = (4,)

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


class GPTQConfig(IntCheckpointConfig):
    name = "gptq"

    def __init__(self, values: dict[str, Any]) -> None:
        super().__init__(values)
        self.zero_offset = 0 if values.get("checkpoint_format") == "gptq_v2" else 1
        self.act_order = bool(values.get("desc_act", False))

    def tensor_layouts(self) -> dict[str, Layout | None]:
        group, per = self.group_size, per_int32(self.bits)  # inputs of qweight, outputs of
        return {"qweight": Layout(output_dim=1, input_dim=0, input_unit=per),  # qzeros
                "qzeros": Layout(output_dim=1, input_dim=0, output_unit=per, input_unit=group),
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
        return gptq_groups(piece, self.zero_offset, self.bits)

    def expert_needs(self) -> set[str]:
        return super().expert_needs() | ({"g_idx"} if self.act_order else set())


class PackedIntConfig(IntCheckpointConfig):
    """compressed-tensors `pack-quantized` 4 or 8-bit weights (`weights`: the config
    group's weight arguments), grouped; symmetric or with zero points."""

    name = "compressed-tensors"
    optional_names = ("weight_zero_point", "weight_g_idx")

    def __init__(self, weights: dict[str, Any], ignore: list[str]) -> None:
        if weights.get("strategy") != "group":
            raise UnsupportedModelError(f"compressed-tensors int{weights.get('num_bits')} "
                                        f"{weights.get('strategy')} scales are not supported "
                                        "(group is)")
        super().__init__({"bits": weights.get("num_bits"), "group_size": weights.get("group_size"),
                          "modules_to_not_convert": ignore})
        self.symmetric = bool(weights.get("symmetric", True))
        self.act_order = weights.get("actorder") not in (None, False)

    def tensor_layouts(self) -> dict[str, Layout | None]:
        group, per = self.group_size, per_int32(self.bits)  # inputs of weight_packed,
        return {"weight_packed": Layout(output_dim=0, input_dim=1, input_unit=per),  # outputs
                "weight_scale": Layout(output_dim=0, input_dim=1, input_unit=group),  # of zeros
                "weight_shape": None,
                "weight_zero_point": Layout(output_dim=0, input_dim=1, output_unit=per,
                                            input_unit=group),
                "weight_g_idx": Layout(input_dim=0)}

    def input_order(self, pieces: list[dict[str, torch.Tensor]], layer: LinearBase
                    ) -> torch.Tensor | None:
        renamed = [{"g_idx": p["weight_g_idx"]} if "weight_g_idx" in p else {} for p in pieces]
        return GPTQConfig.input_order(self, renamed, layer) if renamed[0] else None

    def expert_needs(self) -> set[str]:
        return super().expert_needs() | ({"weight_g_idx"} if self.act_order else set()) | \
            (set() if self.symmetric else {"weight_zero_point"})

    def unpack(self, piece: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        codes = unpack_int32(piece["weight_packed"], 1, bits=self.bits)
        scale = piece["weight_scale"].float()
        if self.symmetric:
            return codes, scale, -float(1 << (self.bits - 1)) * scale
        zeros = unpack_int32(piece["weight_zero_point"], 0, bits=self.bits)[:codes.shape[0]]
        return codes, scale, -zeros.float() * scale


class NaiveInt8Config(IntCheckpointConfig):
    """compressed-tensors `int-quantized` weights (llmcompressor's W8A8 int8 schemes): int8
    [out, in] with a scale per output row (`channel`) or per group, and a zero point when
    asymmetric; weight = (q - zero) * scale. Run weight-only (W8A16): the scheme's int8
    activations are not quantized, the products take the model's dtype (codes held as
    q + 128)."""

    name = "compressed-tensors"
    optional_names = ("weight_zero_point", "input_scale", "input_zero_point")

    def __init__(self, weights: dict[str, Any], ignore: list[str]) -> None:
        self.per_row = weights.get("strategy") == "channel"
        if not self.per_row and weights.get("strategy") != "group":
            raise UnsupportedModelError(f"compressed-tensors int8 {weights.get('strategy')} "
                                        "scales are not supported (channel and group are)")
        # (a scale per row covers the layer's width: group_of, not group_size, says so)
        super().__init__({"bits": 8, "group_size": 1 if self.per_row else
                          weights.get("group_size"), "modules_to_not_convert": ignore})

    def group_of(self, layer: LinearBase) -> int:
        return layer.local_in if self.per_row else self.group_size

    def tensor_layouts(self) -> dict[str, Layout | None]:
        scale = Layout(output_dim=0) if self.per_row else \
            Layout(output_dim=0, input_dim=1, input_unit=self.group_size)
        return {"weight": Layout(output_dim=0, input_dim=1), "weight_scale": scale,
                "weight_zero_point": scale, "input_scale": None, "input_zero_point": None}

    def expert_needs(self) -> set[str]:
        return {"weight", "weight_scale"}

    def unpack(self, piece: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        codes = (piece["weight"].to(torch.int16) + 128).to(torch.uint8)
        scale = piece["weight_scale"].float()
        zero = piece.get("weight_zero_point")
        offset = 128.0 if zero is None else 128.0 + zero.float()
        return codes, scale, -offset * scale
