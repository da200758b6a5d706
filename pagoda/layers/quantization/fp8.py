"""FP8 (E4M3) weights: each layer keeps its float8 weights and their scales. On CUDA the
Triton group kernel (group_gemm) reads them for calls of few tokens (weight-only: decode is
bound by the bytes of weights read), and calls of more tokens with a scale per output row run
on FP8 tensor cores (`torch._scaled_mm`, Hopper and Ada) with the activations quantized per
token at each call (W8A8); block-scaled layers use the Triton kernel at every size. On CPU
pagoda's float8 kernel (cpu_fp8_dot) keeps the bytes and decodes them in registers
(weight-only, float32 products). Elsewhere (shapes no kernel takes, CPUs without AVX2 or a
compiler) the weights are decoded at load to the model's dtype. Three sources:

- `fp8` checkpoints (quantization_config quant_method "fp8"): `weight` with a per-tensor
  `weight_scale`, or with `weight_block_size` [128, 128] a `weight_scale_inv` per block;
- compressed-tensors float-quantized checkpoints (llmcompressor's FP8 / FP8_DYNAMIC):
  `weight` with `weight_scale` per tensor, per output channel or per block;
- `--quantization fp8` on a 16/32-bit checkpoint: per-channel scales computed at load.
A weight is float8 value * its scale; activation scales (`input_scale`) are read and unused."""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch import nn

from pagoda.errors import UnsupportedModelError
from pagoda.layers.float8_rows import Float8Rows
from pagoda.layers.linear import (
    LinearBase,
    LinearMethod,
    WeightLoader,
)
from pagoda.layers.quantization import cpu_fp8_dot
from pagoda.layers.quantization.base import DenseWeight, GroupWeightMethod, QuantizationConfig
from pagoda.layers.quantization.group_gemm import (
    FEW_TOKENS,
    FP8,
    GroupQuantWeight,
    supports,
)
from pagoda.layers.quantization.pieces import (
    Layout,
    add_collected_parameters,
    collected_pieces,
    first_row_offset,
    piece_shards,
    piece_sizes,
)
from pagoda.layers.triton_support import E4M3_CAPABILITY, cuda_capability
from pagoda.logger import get_logger

logger = get_logger(__name__)
FP8_MAX = torch.finfo(FP8).max
# whether the norms and gated activations before FP8 products on tensor cores write their
# rows as float8 (Float8Rows), in place of the products' own quantizing launch:
# PAGODA_FLOAT8_ROWS_HANDED_OVER=1 turns it on. Off by default until its GPU test
# (tests/gpu/test_float8_rows_gpu.py) and a throughput timing have run on a GPU; read once
FLOAT8_ROWS_HANDED_OVER = os.environ.get("PAGODA_FLOAT8_ROWS_HANDED_OVER", "0") == "1"


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] floats -> float8 weights and a float32 scale per row [out, 1]."""
    scale = (weight.float().abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    return (weight.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def float8_rows_at_load(weights: torch.Tensor) -> cpu_fp8_dot.Fp8Rows:
    """A 16/32-bit piece of a layer or an expert as float8 with a scale a row
    (`--quantization fp8`), from its values in the model's dtype (as a 16-bit layer held
    them)."""
    return cpu_fp8_dot.Fp8Rows(*quantize_per_channel(weights.to(torch.get_default_dtype())))


def random_float8_rows(rows: int, columns: int, generator: torch.Generator,
                       std: float) -> cpu_fp8_dot.Fp8Rows:
    """N(0, std) weights [rows, columns] quantized as a loaded piece is (float8_rows_at_load):
    a dummy layer's or expert's projection under `--quantization fp8`."""
    weights = torch.empty(rows, columns, device=generator.device)
    return float8_rows_at_load(weights.normal_(0.0, std, generator=generator))


def row_scales(scale: torch.Tensor, rows: int, columns: int,
               block: tuple[int, int] | None, offset: int = 0) -> torch.Tensor:
    """A piece's scale as [rows, column groups] float32: one group of all columns for a
    per-tensor or per-channel scale, `block[1]` columns per group for block scales (the
    piece's first row is row `offset` of the first block row)."""
    scale = scale.float()
    if block is None:
        return scale.reshape(-1, 1).expand(rows, 1) if scale.numel() == 1 else \
            scale.reshape(rows, 1)
    block_rows, block_columns = block
    expected = (-(-(offset + rows) // block_rows), -(-columns // block_columns))
    if tuple(scale.shape) != expected:
        raise ValueError(f"block scales of shape {tuple(scale.shape)}, not {expected}")
    return scale.repeat_interleave(block_rows, dim=0)[offset:offset + rows]


class Fp8LinearMethod(GroupWeightMethod):
    """A layer of float8 weights with row (and column block) scales: on CUDA the group
    kernel or FP8 tensor cores, on CPU pagoda's float8 kernel, elsewhere decoded at load
    (DenseWeight)."""

    def __init__(self, block: tuple[int, int] | None, at_load: bool = False) -> None:
        self.block = block
        self.at_load = at_load

    def create_weights(self, layer: LinearBase, loader: WeightLoader) -> None:
        if self.at_load:  # each 16-bit piece quantized as it loads: no layer held in 16 bits
            add_collected_parameters(layer, {"weight": Layout(output_dim=0, input_dim=1)},
                                     "fp8", convert=float8_rows_at_load)
            return
        if self.block is not None and layer.local_in % self.block[1]:
            raise UnsupportedModelError(f"fp8 block scales of {self.block[1]} columns do not "
                                        f"divide the layer's {layer.local_in} inputs")
        add_collected_parameters(layer, self._layouts(), "fp8",
                                 optional=("weight_scale", "weight_scale_inv", "input_scale"))

    def _layouts(self) -> dict[str, Layout | None]:
        """The weight slices like a dense one; a per-channel scale along with its rows, a
        per-tensor one stays whole, block scales by the blocks covering a rank's rows."""
        rows, columns = self.block or (1, 1)
        scale = Layout(output_dim=0, input_dim=1, output_unit=rows, input_unit=columns,
                       covering_outputs=self.block is not None)
        return {"weight": Layout(output_dim=0, input_dim=1), "weight_scale": scale,
                "weight_scale_inv": scale, "input_scale": None}

    def init_dummy(self, layer: LinearBase, generator: torch.Generator, std: float) -> bool:
        """`--quantization fp8`: N(0, std) weights quantized as a loaded piece is."""
        if not self.at_load:
            return False
        layer.collected[("weight", None)] = random_float8_rows(layer.local_out, layer.local_in,
                                                                generator, std)
        return True

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        weight, scale = self._at_load(layer) if self.at_load else self._from_checkpoint(layer)
        group = weight.shape[1] // scale.shape[1]
        if weight.is_cuda and supports(weight.shape[1], group, 8):
            layer.fp8 = GroupQuantWeight(weight, scale, None, group, 8)
            return
        if weight.device.type == "cpu" and cpu_fp8_dot.holds(*weight.shape, group):
            layer.fp8 = cpu_fp8_dot.Fp8DotWeight(weight, scale)
            return
        dtype = torch.get_default_dtype()
        layer.fp8 = DenseWeight(cpu_fp8_dot.Fp8Rows(weight, scale).decoded().to(dtype))
        _log_decoded_at_load(str(dtype).removeprefix("torch."), weight.device.type)

    def _at_load(self, layer: LinearBase) -> tuple[torch.Tensor, torch.Tensor]:
        """The float8 rows each piece became as it loaded, stacked."""
        rows = [piece.get("weight") for piece in collected_pieces(layer)]
        if any(r is None for r in rows) or sum(r.shape[0] for r in rows) != layer.local_out:
            raise UnsupportedModelError("a layer quantized at load lacks some of its weights")
        return torch.cat([r.weight for r in rows]), torch.cat([r.scale for r in rows])

    def _from_checkpoint(self, layer: LinearBase) -> tuple[torch.Tensor, torch.Tensor]:
        weights, scales = [], []
        pieces = collected_pieces(layer)
        for rows, shard, piece in zip(piece_sizes(layer), piece_shards(layer, pieces), pieces):
            scale = piece.get("weight_scale_inv", piece.get("weight_scale"))
            if "weight" not in piece or scale is None:
                raise UnsupportedModelError("an fp8 layer lacks its weight or weight scale")
            if tuple(piece["weight"].shape) != (rows, layer.local_in):
                raise ValueError(f"fp8 weight of shape {tuple(piece['weight'].shape)} does not "
                                 f"fit a [{rows}, {layer.local_in}] piece")
            weights.append(piece["weight"].to(FP8))
            offset = first_row_offset(layer, shard, self.block[0]) if self.block else 0
            scales.append(row_scales(scale, rows, layer.local_in, self.block, offset))
        return torch.cat(weights), torch.cat(scales)

    def apply(self, layer: LinearBase, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        held = layer.fp8
        if isinstance(held, GroupQuantWeight) and runs_on_tensor_cores(x, held):
            y = scaled_mm(x, held)
        else:
            y = held(x)
        return y if bias is None else y + bias

    def takes_float8_rows(self, layer: LinearBase, rows: torch.Tensor) -> bool:
        held = layer.fp8
        return FLOAT8_ROWS_HANDED_OVER and isinstance(held, GroupQuantWeight) and rows.is_cuda \
            and _tensor_core_call(rows.numel() // rows.shape[-1], rows.dtype, held)

    def apply_float8_rows(self, layer: LinearBase, rows: Float8Rows,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
        y = scaled_mm_of_rows(rows.values, rows.scale, layer.fp8, rows.dtype)
        return y if bias is None else y + bias

    def group_weight(self, layer: LinearBase) -> GroupQuantWeight | None:
        held = layer.fp8
        return held if isinstance(held, GroupQuantWeight) else None

    def apply_gated(self, layer: LinearBase, x: torch.Tensor, activation: nn.Module,
                    bias: torch.Tensor | None = None) -> torch.Tensor | None:
        held = layer.fp8
        return held.gated(x, activation, bias) if isinstance(held, GroupQuantWeight) else None

    def kernel(self, layer: LinearBase) -> str:
        held = layer.fp8
        if isinstance(held, cpu_fp8_dot.Fp8DotWeight):
            return "cpu_fp8_dot (float8 bytes decoded in registers, float32 products)"
        if not isinstance(held, GroupQuantWeight):
            return "fp8 weights decoded at load (dense matmul)"
        if held.group_size == held.in_features and _has_fp8_tensor_cores():
            from pagoda.layers.quantization.triton_fp8_gemm import kernels_above_few_tokens
            return (f"triton few-token kernel up to {FEW_TOKENS} tokens, "
                    f"{kernels_above_few_tokens(held.in_features)}")
        return held.kernel_name()


@functools.cache
def _log_decoded_at_load(dtype: str, device: str) -> None:
    """One line per process (and dtype, device): fp8 weights no kernel takes here."""
    logger.info("fp8 weights decoded at load to %s on %s (no %s kernel takes them)", dtype,
                device, device.upper())


@functools.cache
def _has_fp8_tensor_cores() -> bool:
    return torch.cuda.is_available() and \
        cuda_capability(torch.cuda.current_device()) >= E4M3_CAPABILITY


def runs_on_tensor_cores(x: torch.Tensor, weight: GroupQuantWeight) -> bool:
    """Whether a call goes to torch._scaled_mm: more than FEW_TOKENS bfloat16 tokens, one
    scale per output row, a GPU with FP8 tensor cores, dims its kernels take."""
    return _tensor_core_call(x.numel() // weight.in_features, x.dtype, weight)


def _tensor_core_call(tokens: int, dtype: torch.dtype, weight: GroupQuantWeight) -> bool:
    """runs_on_tensor_cores for a call of `tokens` rows of `dtype`."""
    return (dtype == torch.bfloat16 and tokens > FEW_TOKENS
            and weight.group_size == weight.in_features and _has_fp8_tensor_cores()
            and weight.in_features % 16 == 0 and weight.out_features % 16 == 0)


def scaled_mm(x: torch.Tensor, weight: GroupQuantWeight) -> torch.Tensor:
    """x W^T on FP8 tensor cores: x quantized per token (its absolute max to FP8_MAX) in
    one Triton launch (fp8_rows), then scaled_mm_of_rows."""
    from pagoda.layers.quantization.triton_group_gemm import fp8_rows
    flat = x.reshape(-1, weight.in_features)
    x_fp8, x_scale = fp8_rows(flat if flat.stride(-1) == 1 else flat.contiguous(), FP8_MAX)
    y = scaled_mm_of_rows(x_fp8, x_scale, weight, x.dtype)
    return y.reshape(*x.shape[:-1], weight.out_features)


def scaled_mm_of_rows(x_fp8: torch.Tensor, x_scale: torch.Tensor, weight: GroupQuantWeight,
                      dtype: torch.dtype) -> torch.Tensor:
    """Float8 rows [tokens, in] times their float32 scales [tokens, 1], by W^T on FP8 tensor
    cores, in `dtype`: the product rescaled by the token's and the output row's scales, by
    pagoda's Triton kernel where it takes the call (`triton_fp8_gemm.takes`: 33 to 64
    tokens) and torch._scaled_mm (cuBLAS) otherwise. The tensor cores' own accumulators sum
    the products without promoting partial sums to float32 every few steps (fast
    accumulation, as vLLM's Hopper FP8 kernels)."""
    from pagoda.layers.quantization import triton_fp8_gemm
    if triton_fp8_gemm.takes(*x_fp8.shape):
        return triton_fp8_gemm.fp8_gemm(x_fp8, x_scale, weight.codes, weight.scale, dtype)
    return torch._scaled_mm(x_fp8, weight.codes.t(), scale_a=x_scale, scale_b=weight.scale,
                            out_dtype=dtype, use_fast_accum=True)


def skipped_module(prefix: str, names: list[str]) -> bool:
    """Whether module `prefix` is among `names` (module names or their last parts;
    compressed-tensors' "re:" patterns match by regular expression)."""
    import re
    for name in names:
        if name.startswith("re:") and re.fullmatch(name[3:], prefix):
            return True
        if prefix == name or prefix.endswith("." + name) or name in prefix.split("."):
            return True
    return False


def fp8_expert_rows(tensors: dict[str, torch.Tensor], block: tuple[int, int] | None
                    ) -> cpu_fp8_dot.Fp8Rows | torch.Tensor | None:
    """An expert projection's float8 `weight` with its `weight_scale_inv` or `weight_scale`
    (per tensor, per row or per `block`) as rows of the float8 kernel; a float weight as it
    is; None until both have come."""
    weight = tensors.get("weight")
    if weight is not None and weight.dtype != FP8:
        return weight
    scale = tensors.get("weight_scale_inv", tensors.get("weight_scale"))
    if weight is None or scale is None:
        return None
    rows, columns = weight.shape
    return cpu_fp8_dot.Fp8Rows(weight, row_scales(scale, rows, columns, block))


class Fp8ExpertsConfig(QuantizationConfig):
    """What the fp8 configs share for experts: float8 rows on CPU's float8 kernel where it
    runs (a float checkpoint's quantized a row at load), else decoded (checkpoints of
    float8 weights; `block`: their block scales)."""

    block: tuple[int, int] | None = None
    float8_experts = True
    gives_expert_codes = True

    @property
    def holds_expert_codes(self) -> bool:
        return cpu_fp8_dot.available()

    def expert_codes(self, tensors: dict[str, torch.Tensor]
                     ) -> cpu_fp8_dot.Fp8Rows | torch.Tensor | None:
        return fp8_expert_rows(tensors, self.block)

    def decode_expert(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
        rows = fp8_expert_rows(tensors, self.block)
        return rows.decoded() if isinstance(rows, cpu_fp8_dot.Fp8Rows) else rows


class Fp8Config(Fp8ExpertsConfig):
    """An fp8 checkpoint's config, or `--quantization fp8` on a 16-bit one (`values` None)."""

    name = "fp8"

    def __init__(self, values: dict[str, Any] | None) -> None:
        self.at_load = values is None
        values = values or {}
        block = values.get("weight_block_size")
        self.block = tuple(int(b) for b in block) if block else None
        self.skipped = list(values.get("modules_to_not_convert") or values.get("ignored_layers")
                            or ())

    def linear_method(self, prefix: str, layer: LinearBase) -> LinearMethod | None:
        if skipped_module(prefix, self.skipped):
            return None
        return Fp8LinearMethod(self.block, self.at_load)


class CompressedTensorsFp8Config(Fp8ExpertsConfig):
    """compressed-tensors checkpoints of FP8 weights (`float-quantized`, llmcompressor's
    FP8 and FP8_DYNAMIC schemes): `weights` is the config group's weight arguments."""

    name = "compressed-tensors"

    def __init__(self, weights: dict[str, Any], ignore: list[str]) -> None:
        strategy = weights.get("strategy", "tensor")
        if strategy not in ("tensor", "channel", "block"):
            raise UnsupportedModelError(f"compressed-tensors fp8 {strategy} scales are not "
                                        "supported")
        block = weights.get("block_structure") if strategy == "block" else None
        self.block = tuple(int(b) for b in block) if block else None
        self.skipped = ignore

    def linear_method(self, prefix: str, layer: LinearBase) -> LinearMethod | None:
        if skipped_module(prefix, self.skipped):
            return None
        return Fp8LinearMethod(self.block)
