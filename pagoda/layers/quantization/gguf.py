"""GGUF weights kept in their blocks. The loader hands a linear layer each checkpoint tensor
as `GGUFWeight` rows of blocks; after loading, the layer's pieces (q, k, v of a fused qkv
may differ in type) become kernels: on CUDA every block type as codes with a scale and a min
per group for the Triton kernel (4-bit codes for Q4_0/Q4_1/Q4_K, a byte each for the
others, IQ4_NL's and IQ4_XS's table values among them); on CPU every type as codes for
pagoda's AVX-512 VNNI or AVX2 kernel (cpu_block_dot) where it runs, else the 4-bit types
packed for torch's int4 matmul (the others are decoded at load); elsewhere blocks decoded
per call; float tensors dense. An untied LM head keeps its blocks the same way where a
kernel takes them (GGUFConfig.bind_head), and so does a table tied to the LM head where the
kernel also decodes rows for lookups (bind_tied_table). Block types gguf_blocks does not
decode are decoded at load by gguf-py (models/loader/gguf.py).

Under tensor parallelism a rank keeps its rows of blocks (column-parallel layers: whole
rows) or its span of blocks in every row (row-parallel layers): a type whose blocks do not
fall whole on each rank's inputs is decoded at load instead, each rank decoding only its
rows and the blocks covering its inputs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

from pagoda.errors import UnsupportedModelError
from pagoda.layers.embedding import LMHead, VocabEmbedding, VocabShard
from pagoda.layers.linear import LinearBase, LinearMethod, WeightLoader, new_parameter
from pagoda.layers.quantization import cpu_block_dot, group_gemm
from pagoda.layers.quantization.base import DenseWeight, GroupWeightMethod, QuantizationConfig
from pagoda.layers.quantization.cpu_block_dot import (
    BlockDotWeight,
    GroupCodes,
    ScaleFactors,
    stacked_factors,
    stacked_kernel,
)
from pagoda.layers.quantization.gguf_blocks import (
    CENTRED_FORMATS,
    FACTORED_FORMATS,
    FORMATS,
    HALF_SCALE_FORMATS,
    INT4_FORMATS,
    K_QUANTS,
    LOWS_OF_SCALES,
    NIBBLE_FORMATS,
    QK_K,
    SIX_BIT_FORMATS,
    SIXTEEN_A_GROUP,
    byte_groups,
    dequantize_rows,
    int4_groups,
    scale_factors,
)
from pagoda.layers.quantization.group_gemm import GroupQuantWeight, supports
from pagoda.layers.quantization.int4 import Int4PackedWeight, int4_packable
from pagoda.layers.quantization.pieces import piece_sizes


@dataclass(slots=True)
class GGUFWeight:
    """One checkpoint tensor as rows of GGUF blocks: [out, row bytes] uint8."""

    rows: torch.Tensor
    type_name: str
    columns: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows.shape[0], self.columns


class BlockRows(nn.Module):
    """Rows of blocks of one type, decoded to the activation dtype at each call."""

    def __init__(self, rows: torch.Tensor, type_name: str) -> None:
        super().__init__()
        self.type_name = type_name
        self.rows = nn.Parameter(rows, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize_rows(self.rows, self.type_name).to(x.dtype))


def _kernel_name(kernel: nn.Module) -> str:
    if isinstance(kernel, Int4PackedWeight):
        return "int4pack_mm_for_cpu"
    if isinstance(kernel, (GroupQuantWeight, BlockDotWeight)):
        return kernel.kernel_name()
    if isinstance(kernel, BlockRows):
        return f"{kernel.type_name} decoded per call"
    return "dense matmul"


class GGUFLinearMethod(GroupWeightMethod):
    """A linear layer whose weights stay in the GGUF's blocks."""

    def create_weights(self, layer: LinearBase, loader: WeightLoader) -> None:
        # the checkpoint's tensors load through it (the layer keeps them)
        layer.weight = _placeholder(partial(_store_piece, layer),
                                    partial(_keeps_blocks_on_rank, layer))
        layer.weight.output_dim, layer.weight.input_dim = 0, 1
        layer.gguf_pieces = {}
        layer.gguf_kernels = nn.ModuleList()

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        pieces = [layer.gguf_pieces[key] for key in sorted(layer.gguf_pieces, key=_order)]
        layer.gguf_pieces = {}
        for group in _runs(pieces, layer.weight.device):
            layer.gguf_kernels.append(_kernel(group, layer.weight.device))

    def apply(self, layer: LinearBase, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        kernels = layer.gguf_kernels
        if all(isinstance(k, BlockDotWeight) for k in kernels) and \
                (bias is None or cpu_block_dot.takes_bias(bias)):
            return _block_dot_columns(kernels, x, bias)
        if len(kernels) > 1 and all(isinstance(k, GroupQuantWeight) for k in kernels):
            y = _group_columns(kernels, x)
            return y if bias is None else y + bias
        outputs = [kernel(x) for kernel in kernels]
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
        return y if bias is None else y + bias

    def apply_gated(self, layer: LinearBase, x: torch.Tensor, activation: nn.Module,
                    bias: torch.Tensor | None = None) -> torch.Tensor | None:
        weight = self.group_weight(layer)
        return None if weight is None else weight.gated(x, activation, bias)

    def group_weight(self, layer: LinearBase) -> GroupQuantWeight | None:
        """The layer's one kernel where its blocks are all of one type and a
        GroupQuantWeight (a layer of several types runs a kernel each)."""
        kernels = layer.gguf_kernels
        if len(kernels) != 1 or not isinstance(kernels[0], GroupQuantWeight):
            return None
        return kernels[0]

    def kernel(self, layer: LinearBase) -> str:
        return " + ".join(dict.fromkeys(_kernel_name(k) for k in layer.gguf_kernels))


def _placeholder(loader, keeps) -> nn.Parameter:
    """An empty parameter that a checkpoint's tensor loads through (`loader`, which keeps
    it); `keeps(type_name)` says whether the loader hands it the tensor's blocks (else its
    floats)."""
    placeholder = nn.Parameter(torch.empty(0, dtype=torch.uint8), requires_grad=False)
    placeholder.weight_loader, placeholder.gguf_blocks = loader, keeps
    return placeholder


def _block_dot_columns(kernels: nn.ModuleList, x: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """The block-dot kernels' products side by side (plus the bias), each written into its
    columns of one output (no concatenation, no separate add)."""
    rows = x.reshape(-1, x.shape[-1])
    y = torch.empty(rows.shape[0], sum(k.out_features for k in kernels))
    for kernel, columns in _columns(kernels):
        kernel(rows, out=y[:, columns], bias=None if bias is None else bias[columns])
    y = y.view(*x.shape[:-1], y.shape[-1])
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def _group_columns(kernels: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    """The group kernels' products side by side (a layer of several block types, as a
    Q4_K_M file's qkv with its values in Q6_K), each stored into its columns of one output
    (on CUDA by its kernel: no concatenation after them)."""
    rows = x.reshape(-1, x.shape[-1])
    y = torch.empty(rows.shape[0], sum(k.out_features for k in kernels), dtype=x.dtype,
                    device=x.device)
    for kernel, columns in _columns(kernels):
        kernel(rows, out=y[:, columns])
    return y.view(*x.shape[:-1], y.shape[-1])


def _columns(kernels: nn.ModuleList) -> Iterator[tuple[nn.Module, slice]]:
    """Each kernel with its columns of the kernels' outputs side by side."""
    column = 0
    for kernel in kernels:
        yield kernel, slice(column, column + kernel.out_features)
        column += kernel.out_features


def _store_piece(layer: LinearBase, param: nn.Parameter, tensor: GGUFWeight | torch.Tensor,
                 shard: int | None = None) -> None:
    """Keep this rank's part of one checkpoint tensor (blocks, or floats) of the layer until
    loading ends."""
    tensor = _rank_part(layer, tensor, shard)
    expected = _piece_rows(layer, shard)
    if tuple(tensor.shape) != (expected, layer.local_in):
        raise ValueError(f"checkpoint tensor of shape {tuple(tensor.shape)} does not fit "
                         f"a [{expected}, {layer.local_in}] piece")
    layer.gguf_pieces[shard] = tensor


def _keeps_blocks_on_rank(layer: LinearBase, type_name: str) -> bool:
    """Whether the layer keeps GGUF type `type_name` in its blocks: a type it has a kernel
    for, whose blocks fall whole on this rank's inputs."""
    device = layer.weight.device
    if not keeps_blocks(type_name, device):
        return False
    if device.type == "cpu" and type_name not in INT4_FORMATS and not all(
            _block_dot_fits(rows, layer.local_in, type_name) for rows in piece_sizes(layer)):
        return False  # (no kernel would hold its pieces: decoded at load)
    inputs = layer.rank_inputs()
    block = FORMATS[type_name].block_weights
    return inputs is None or (inputs[0] % block == 0 and inputs[1] % block == 0)


def _rank_part(layer: LinearBase, tensor: GGUFWeight | torch.Tensor, shard: int | None
               ) -> GGUFWeight | torch.Tensor:
    """The rows (column-parallel) or inputs (row-parallel) of a piece this rank keeps."""
    outputs, inputs = layer.rank_outputs(shard), layer.rank_inputs()
    if not isinstance(tensor, GGUFWeight):
        tensor = tensor if outputs is None else tensor.narrow(0, *outputs)
        tensor = tensor if inputs is None else tensor.narrow(1, *inputs)
        materialize = getattr(tensor, "materialize", None)  # a checkpoint slice: read it now
        return materialize() if materialize is not None else tensor
    rows, columns = tensor.rows, tensor.columns
    if outputs is not None:
        rows = rows.narrow(0, *outputs)
    if inputs is not None:
        fmt = FORMATS[tensor.type_name]
        start, size = inputs
        if start % fmt.block_weights or size % fmt.block_weights:
            raise UnsupportedModelError(
                f"GGUF {tensor.type_name} blocks of {fmt.block_weights} weights do not fall "
                f"whole on a rank's {size} inputs (tensor-parallel size {layer.group.size})")
        rows, columns = rows.narrow(1, fmt.row_bytes(start), fmt.row_bytes(size)), size
    return GGUFWeight(rows, tensor.type_name, columns)


def _order(key: int | None) -> int:
    return -1 if key is None else key


def _piece_rows(layer: LinearBase, shard: int | None) -> int:
    sizes = getattr(layer, "local_sizes", None)
    return layer.local_out if shard is None or sizes is None else sizes[shard]


def group_layout(type_name: str) -> tuple[int, int]:
    """(bits per code, inputs per group) of GGUF type `type_name` held for the GPU kernel."""
    return (4 if type_name in INT4_FORMATS else 8), _group(type_name)


def block_dot_layout(type_name: str) -> tuple[int, int]:
    """(bits per code, inputs per group) of GGUF type `type_name` held by the CPU block-dot
    kernel: nibbles for every type whose codes fit them (Q2_K and Q3_K too: the kernel
    narrows their byte codes, BlockDotWeight), six bits for Q5_* and Q6_K, else bytes."""
    bits = 4 if type_name in NIBBLE_FORMATS else 6 if type_name in SIX_BIT_FORMATS else 8
    return bits, _group(type_name)


def _group(type_name: str) -> int:
    return 16 if type_name in SIXTEEN_A_GROUP else 32


def group_codes(piece: GGUFWeight) -> GroupCodes:
    """A matrix of blocks as codes with a scale and a min per group, as the CPU block-dot
    kernel holds them."""
    bits, group = group_layout(piece.type_name)
    codes, scale, low = byte_groups(piece.rows, piece.type_name)[:3]
    return GroupCodes(codes, scale, low, group, bits,
                      half_scales=piece.type_name in HALF_SCALE_FORMATS,
                      factors=scale_factors(piece.rows, piece.type_name))


def _block_dot_fits(rows: int, columns: int, type_name: str) -> bool:
    """Whether the CPU block-dot kernel holds `rows` of GGUF type `type_name`."""
    return cpu_block_dot.holds(rows, columns, _group(type_name))


def _kind(piece: GGUFWeight | torch.Tensor, device: torch.device) -> str:
    """What a piece becomes (_kernel_kind); float pieces "dense". Pieces of one kind share a
    kernel."""
    if isinstance(piece, torch.Tensor):
        return "dense"
    return _kernel_kind(piece.type_name, piece.rows.shape[0], piece.columns, device)


def _kernel_kind(type_name: str, rows: int, columns: int, device: torch.device) -> str:
    """What [rows, columns] of GGUF type `type_name` become on `device`:
    "blockdot<bits>x<group><scales>" (the CPU kernel; _block_dot_scales), "int4" (torch's CPU
    kernel), "group<bits>x<group>" (the GPU kernel), else the block type (decoded at every
    call)."""
    if device.type == "cpu" and _block_dot_fits(rows, columns, type_name):
        bits, group = block_dot_layout(type_name)
        return f"blockdot{bits}x{group}{_block_dot_scales(type_name)}"
    bits, group = group_layout(type_name)
    if type_name in INT4_FORMATS and int4_packable(device, columns, 32):
        return "int4"
    if device.type == "cuda" and supports(columns, group, bits):
        return f"group{bits}x{group}"
    return type_name


def _block_dot_scales(type_name: str) -> str:
    """How the CPU block-dot kernel holds a type's scales and lows: float16s (the legacy
    types and IQ4_NL), factored with sub-lows of their own, or factored with the sub-scales
    serving as sub-lows (held_bits counts each so: pieces of different forms get kernels
    apart)."""
    if type_name in HALF_SCALE_FORMATS:
        return "half"
    return "scaled-lows" if type_name in LOWS_OF_SCALES else "factored"


def _runs(pieces: list, device: torch.device) -> list[list]:
    """Consecutive pieces that one kernel can hold, rows stacked."""
    runs: list[list] = []
    for piece in pieces:
        if runs and _kind(runs[-1][-1], device) == _kind(piece, device):
            runs[-1].append(piece)
        else:
            runs.append([piece])
    return runs


def _kernel(pieces: list, device: torch.device) -> nn.Module:
    kind = _kind(pieces[0], device)
    if kind == "dense":
        return DenseWeight(torch.cat(pieces).to(device, torch.get_default_dtype()))  # F32/F16
    if kind == "int4":
        groups = [int4_groups(p.rows, p.type_name) for p in pieces]
        codes, scale, low = (torch.cat(parts) for parts in zip(*groups))
        return Int4PackedWeight(codes, scale, low, 32)
    if kind.startswith("blockdot"):  # (each piece fits the kernel, so do they stacked)
        return stacked_kernel([group_codes(p) for p in pieces])
    if kind.startswith("group"):
        bits, group = group_layout(pieces[0].type_name)
        rows = [p.rows.to(device) for p in pieces]
        groups = [byte_groups(r, p.type_name)[:3] for r, p in zip(rows, pieces)]
        codes, scale, low = (torch.cat(parts) for parts in zip(*groups))
        factors = None  # (read only with PAGODA_PLANE_FACTORED_SCALES=1)
        if group_gemm.FACTORED_SCALES_IN_PLANES:
            factors = _stacked_or_none([scale_factors(r, p.type_name)
                                        if p.type_name in K_QUANTS else None
                                        for r, p in zip(rows, pieces)])
        return GroupQuantWeight(codes, scale, low, group, bits, factors=factors)
    return BlockRows(torch.cat([p.rows for p in pieces]).to(device), kind)


def _stacked_or_none(factors: list[ScaleFactors | None]) -> ScaleFactors | None:
    """Pieces' factored scales stacked, or None where a piece has none (a legacy type)."""
    return None if None in factors else stacked_factors(factors)


def decode_table_rows(rows: torch.Tensor, type_name: str, dtype: torch.dtype) -> torch.Tensor:
    """Rows of a vocabulary table kept in GGUF blocks, gathered for a lookup, as floats."""
    return dequantize_rows(rows, type_name).to(dtype)


def _store_table(embedding: VocabEmbedding, param: nn.Parameter,
                 tensor: GGUFWeight | torch.Tensor, shard: int | None = None) -> None:
    """Keep this rank's rows of the checkpoint's table: as the GPU group kernel's codes where
    one holds its type (holds_untied_table), else as the embedding's weight: its rows of
    blocks (decoded per lookup), or floats."""
    if not isinstance(tensor, GGUFWeight):
        embedding.weight = new_parameter(embedding.rows, embedding.hidden_size,
                                         loader=embedding.weight_loader, output_dim=0)
        embedding.weight_loader(embedding.weight, tensor)
        return
    if holds_untied_table(tensor.type_name, embedding.rows, embedding.hidden_size,
                          param.device):
        blocks = GGUFWeight(_rank_table_rows(embedding, tensor), tensor.type_name,
                            tensor.columns)
        embedding.after_loading = partial(_hold_table, embedding, blocks)
        return
    param.data = _rank_table_rows(embedding, tensor)
    embedding.decode_rows = partial(decode_table_rows, type_name=tensor.type_name,
                                    dtype=embedding.dtype)


def _hold_table(embedding: VocabEmbedding, blocks: GGUFWeight) -> None:
    """After loading: the embedding's table as the group kernel's codes (_store_table)."""
    embedding.quantized = _kernel([blocks], blocks.rows.device)


def _store_tied_table(embedding: VocabEmbedding, head: LMHead, param: nn.Parameter,
                      tensor: GGUFWeight | torch.Tensor, shard: int | None = None) -> None:
    """Keep this rank's rows of a table the LM head shares: its blocks as a kernel's codes
    (holds_tied_table: the head multiplies by them; a lookup decodes its rows), or floats."""
    if not isinstance(tensor, GGUFWeight):
        _store_table(embedding, param, tensor)
        head.weight = embedding.weight
        return
    blocks = GGUFWeight(_rank_table_rows(embedding, tensor), tensor.type_name, tensor.columns)
    # held once loading ends (a module built now would be a weight the checkpoint lacks)
    head.after_loading = partial(_hold_tied_table, embedding, head, blocks)


def _hold_tied_table(embedding: VocabEmbedding, head: LMHead, blocks: GGUFWeight) -> None:
    # (the table's type is one a kernel with lookups holds: holds_tied_table)
    embedding.quantized = head.quantized = _kernel([blocks], blocks.rows.device)


def _store_head(head: LMHead, param: nn.Parameter, tensor: GGUFWeight | torch.Tensor,
                shard: int | None = None) -> None:
    """Keep this rank's rows of an untied LM head's table: its blocks, made a kernel once
    loading ends (a module built now would be a weight the checkpoint lacks), or floats."""
    if not isinstance(tensor, GGUFWeight):
        head.weight = new_parameter(head.rows, head.hidden_size, loader=head.weight_loader,
                                    output_dim=0)
        head.weight_loader(head.weight, tensor)
        return
    blocks = GGUFWeight(_rank_table_rows(head, tensor), tensor.type_name, tensor.columns)
    head.after_loading = partial(_hold_head, head, blocks)


def _hold_head(head: LMHead, blocks: GGUFWeight) -> None:
    head.quantized = _kernel([blocks], blocks.rows.device)


def holds_head(type_name: str, rows: int, columns: int, device: torch.device) -> bool:
    """Whether an untied LM head of [rows, columns] (a rank's rows) in GGUF type `type_name`
    keeps its blocks on `device`: where a kernel multiplies them (else decoded at load; blocks
    decoded at every call would cost the head's product many times over)."""
    return type_name in FORMATS and _kernel_kind(type_name, rows, columns, device) != type_name


def _rank_table_rows(table: VocabShard, tensor: GGUFWeight) -> torch.Tensor:
    """This rank's rows of blocks of the checkpoint's table (padding rows zero: they decode
    to zeros)."""
    if tensor.shape != (table.vocab_size, table.hidden_size):
        raise ValueError(f"checkpoint tensor of shape {tuple(tensor.shape)} does not fit a "
                         f"[{table.vocab_size}, {table.hidden_size}] vocabulary table")
    end = min(table.start + table.rows, table.vocab_size)
    rows = torch.zeros(table.rows, tensor.rows.shape[1], dtype=torch.uint8,
                       device=table.weight.device)
    rows[:end - table.start] = tensor.rows[table.start:end]
    return rows


class GGUFConfig(QuantizationConfig):
    """Every linear layer of a GGUF model keeps its blocks, and so does an embedding no LM
    head is tied to (decoded per lookup), and an untied LM head where a kernel multiplies its
    type (holds_head); a tied table is held as codes where the CPU block-dot kernel or the
    GPU group kernel runs it (the LM head's product and the lookups: holds_tied_table),
    else read as floats, as norms are (the loader decodes the tensors nothing keeps)."""

    gives_expert_codes = True

    name = "gguf"

    @property
    def holds_expert_codes(self) -> bool:
        return cpu_block_dot.available()

    def linear_method(self, prefix: str, layer: LinearBase) -> LinearMethod | None:
        return GGUFLinearMethod()

    def expert_codes(self, tensors: dict[str, GGUFWeight | torch.Tensor]
                     ) -> GroupCodes | torch.Tensor | None:
        weight = tensors["weight"]
        return group_codes(weight) if isinstance(weight, GGUFWeight) else weight

    def bind_embedding(self, embedding: VocabEmbedding) -> None:
        embedding.weight = _placeholder(partial(_store_table, embedding), keeps_table_blocks)

    def bind_head(self, head: LMHead) -> None:
        head.weight = _placeholder(partial(_store_head, head), partial(
            holds_head, rows=head.rows, columns=head.hidden_size, device=head.weight.device))

    def bind_tied_table(self, embedding: VocabEmbedding, head: LMHead) -> None:
        embedding.weight = head.weight = _placeholder(
            partial(_store_tied_table, embedding, head),
            partial(holds_tied_table, rows=embedding.rows, columns=embedding.hidden_size,
                    device=embedding.weight.device))


def held_bits(type_name: str, device: torch.device) -> float:
    """Bits per weight a linear layer that keeps GGUF type `type_name` holds on `device`: a
    code and its share of the group's scale and min (16-bit each on CUDA and in torch's
    int4 kernel; on CUDA only the scale where the lows are one multiple of it in every
    group: Q3_K's and Q6_K's, group_gemm.SCALE_PAIRS_IN_PLANES, and those of CENTRED_FORMATS,
    group_gemm.CENTRED_CODES), but for the k-quants, held factored: an int8 sub-scale a
    group, an int8 sub-min where the type has mins, and a super-block of 256's two factors
    (float16 in the GPU's planes, with PAGODA_PLANE_FACTORED_SCALES=1; float32 in the CPU
    block-dot kernel, which holds IQ4_XS's so too)."""
    if device.type == "cuda":
        bits, group = group_layout(type_name)
        if type_name in K_QUANTS and group_gemm.FACTORED_SCALES_IN_PLANES:
            return _factored_bits(type_name, bits, group, 16)
        if (type_name in LOWS_OF_SCALES and group_gemm.BYTE_PLANES
                and group_gemm.SCALE_PAIRS_IN_PLANES) or \
                (type_name in CENTRED_FORMATS and group_gemm.CENTRED_CODES):
            return bits + 16 / group
        return bits + 32 // group
    if _block_dot_holds(type_name):
        bits, group = block_dot_layout(type_name)
        if type_name in FACTORED_FORMATS:
            return _factored_bits(type_name, bits, group, 32)
        return bits + 32 // group
    if type_name in INT4_FORMATS:
        return 4 + 32 // 32
    return FORMATS[type_name].block_bytes * 8 // FORMATS[type_name].block_weights


def block_bits(type_name: str) -> float:
    """Bits a weight GGUF type `type_name`'s blocks take."""
    return FORMATS[type_name].block_bytes * 8 / FORMATS[type_name].block_weights


def _factored_bits(type_name: str, bits: int, group: int, factor_bits: int) -> float:
    """Bits a weight of a k-quant held factored: its code, its share of the group's int8
    sub-scale (and sub-min) and of its super-block's two factors of `factor_bits`."""
    sub_bits = 8 if type_name in LOWS_OF_SCALES else 16
    return bits + sub_bits / group + 2 * factor_bits / QK_K


def keeps_table_blocks(type_name: str) -> bool:
    """Whether an embedding keeps a table of GGUF type `type_name` in blocks: every block
    type pagoda decodes (a lookup decodes a few rows, whatever the device)."""
    return type_name in FORMATS


def holds_tied_table(type_name: str, rows: int, columns: int, device: torch.device) -> bool:
    """Whether a tied [rows, columns] table (a rank's rows) of GGUF type `type_name` is held
    as codes on `device` (else as floats): by a kernel that also decodes rows for lookups,
    the CPU block-dot kernel's or the GPU group kernel's."""
    if type_name not in FORMATS:
        return False
    return _kernel_kind(type_name, rows, columns, device).startswith(("blockdot", "group"))


def holds_untied_table(type_name: str, rows: int, columns: int, device: torch.device) -> bool:
    """Whether an embedding no LM head is tied to holds its [rows, columns] table (a rank's
    rows) of GGUF type `type_name` as the GPU group kernel's codes, its lookups decoded in
    one launch (triton_rows), as a tied table is held: where those codes take at most a bit
    a weight more than the blocks (the 4-bit types and Q8_0; Q6_K's would take 9 bits
    against 6.56, some 0.16 GB more for an 8B's table). Elsewhere it keeps the blocks, a
    lookup decoding its rows in torch operators."""
    return (device.type == "cuda" and holds_tied_table(type_name, rows, columns, device)
            and held_bits(type_name, device) <= block_bits(type_name) + 1)


def _block_dot_holds(type_name: str) -> bool:
    """Whether the CPU block-dot kernel runs here and holds GGUF type `type_name` (every
    type pagoda decodes)."""
    return type_name in FORMATS and cpu_block_dot.available()


def keeps_blocks(type_name: str, device: torch.device) -> bool:
    """Whether a linear layer on `device` keeps a tensor of GGUF type `type_name` in its
    blocks: on CPU every type where the block-dot kernel runs, else the 4-bit types (torch's
    int4 matmul runs them faster than floats; decoding the others at every call costs 5-15x
    the matmul: they are decoded at load); elsewhere every type pagoda decodes (on CUDA the
    Triton kernel runs them)."""
    if device.type == "cpu":
        return type_name in INT4_FORMATS or _block_dot_holds(type_name)
    return type_name in FORMATS
