"""Every expert's weights of one projection held as codes for the GPU's fused MoE kernel
(`triton_moe`): an FP8 checkpoint's float8 values with a float32 scale a row and group of
inputs; an integer or GGUF checkpoint's codes (4 bits or less two a byte, wider ones a byte
each) with a float16 scale and low a row and group (each weight is code * scale + low, the
dense GPU kernels' form of those formats). A checkpoint brings each expert's projections
as pieces (`Fp8Rows`, `GroupCodes`); a stack is made from the first piece (its layout) and
takes the others' codes as they come."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from pagoda.layers.quantization.base import decoded_groups
from pagoda.layers.quantization.cpu_block_dot import GroupCodes
from pagoda.layers.quantization.cpu_fp8_dot import Fp8Rows
from pagoda.layers.quantization.group_gemm import CHUNK, pack_int4_halves, unpack_int4_halves

FLOAT8 = torch.float8_e4m3fn
NIBBLE_STEP = CHUNK  # inputs a byte's two halves span: byte j holds inputs j and j + 32


@dataclass(frozen=True, slots=True)
class ExpertCodes:
    """One projection of every expert: float8 values `codes` [experts, rows, inputs] with a
    float32 `scale` a row and group of inputs [experts, rows, groups] (`low` None); or
    integer codes of `bits` bits (4: [experts, rows, inputs / 2], two a byte, byte j of each
    NIBBLE_STEP inputs holding inputs j (low nibble) and j + 32; 8: [experts, rows, inputs])
    with a float16 `scale` and `low` a row and group."""

    codes: torch.Tensor
    scale: torch.Tensor
    low: torch.Tensor | None = None
    bits: int = 8

    @property
    def shape(self) -> tuple[int, int, int]:
        """(experts, rows, inputs) of the weights they stand for."""
        experts, rows, stored = self.codes.shape
        return experts, rows, stored * (2 if self.bits == 4 else 1)

    @property
    def group(self) -> int:
        return self.shape[2] // self.scale.shape[2]

    def decoded(self, expert: int, dtype: torch.dtype) -> torch.Tensor:
        """One expert's weights [rows, inputs] in `dtype`."""
        codes, scale = self.codes[expert], self.scale[expert].float()
        if self.low is None:
            rows, inputs = codes.shape
            grouped = codes.float().view(rows, scale.shape[1], -1) * scale[..., None]
            return grouped.view(rows, inputs).to(dtype)
        if self.bits == 4:
            codes = unpacked_nibbles(codes)
        return decoded_groups(codes, scale, self.low[expert].float()).to(dtype)

    def describe(self) -> str:
        """What the codes are, for the startup log."""
        if self.low is None:
            return "float8 weights"
        return f"{self.bits}-bit codes in groups of {self.group}"


def kernel_name(gate_up: ExpertCodes, down: ExpertCodes) -> str:
    """The startup log's name of a layer's experts' kernel."""
    held = gate_up.describe()
    if down.describe() != held:
        held = f"{held} (gate-up), {down.describe()} (down)"
    return f"{held} on the fused MoE kernel"


def packed_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[rows, inputs] codes of at most 4 bits -> [rows, inputs / 2] bytes (ExpertCodes: the
    dense kernels' halves, a row's bytes in a row)."""
    return pack_int4_halves(codes).t()


def unpacked_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """packed_nibbles' inverse."""
    return unpack_int4_halves(packed.t())


def takes(piece: object, inputs: int) -> bool:
    """Whether the kernel takes `piece`'s layout over `inputs` inputs: float8 values with
    a scale a row or groups of a power of two (at least 16) of inputs; codes of at most 4
    bits in groups of a multiple of 32 over a multiple of NIBBLE_STEP inputs; codes of at
    most 8 bits in groups of a power of two (at least 16), or one group a row."""
    if isinstance(piece, Fp8Rows):
        return _fits_steps(inputs // piece.scale.shape[1], inputs)
    return isinstance(piece, GroupCodes) and integers_fit(piece.bits, piece.group, inputs)


def integers_fit(bits: int, group: int, inputs: int) -> bool:
    """Whether the kernel takes codes of `bits` bits in groups of `group` over `inputs`."""
    if bits > 8 or inputs % group:
        return False
    if bits <= 4:
        return inputs % NIBBLE_STEP == 0 and group % 32 == 0
    return _fits_steps(group, inputs)


def layer_takes_integers(layout: tuple[int, int] | None, hidden: int, inter: int) -> bool:
    """Whether a layer's experts (gate-up over `hidden` inputs, down over `inter`) take
    integer codes of `layout` (bits, group; None: no integer format)."""
    return layout is not None and all(integers_fit(*layout, n) for n in (hidden, inter))


def _fits_steps(group: int, inputs: int) -> bool:
    return group == inputs or (group >= 16 and group & (group - 1) == 0)


def empty_stack(piece: Fp8Rows | GroupCodes, experts: int, rows: int, inputs: int,
                device: torch.device) -> ExpertCodes:
    """A stack on `device` for `experts` x `rows` weights of `inputs` inputs in `piece`'s
    layout (a checkpoint's pieces may be read on another: a GGUF's on CPU)."""
    if isinstance(piece, Fp8Rows):
        groups = piece.scale.shape[1]
        return ExpertCodes(torch.empty(experts, rows, inputs, dtype=FLOAT8, device=device),
                           torch.empty(experts, rows, groups, dtype=torch.float32,
                                       device=device))
    bits = 4 if piece.bits <= 4 else 8
    groups = inputs // piece.group

    def halves() -> torch.Tensor:
        return torch.empty(experts, rows, groups, dtype=torch.float16, device=device)
    stored = inputs // 2 if bits == 4 else inputs
    return ExpertCodes(torch.empty(experts, rows, stored, dtype=torch.uint8, device=device),
                       halves(), halves(), bits)


def same_layout(stack: ExpertCodes, piece: object) -> bool:
    """Whether `piece` goes into `stack` as it is."""
    if isinstance(piece, Fp8Rows):
        return stack.low is None and piece.scale.shape[1] == stack.scale.shape[2]
    return isinstance(piece, GroupCodes) and stack.low is not None and \
        piece.group == stack.group and (4 if piece.bits <= 4 else 8) == stack.bits


def put(stack: ExpertCodes, expert: int, first_row: int, piece: Fp8Rows | GroupCodes) -> None:
    """Write a piece's rows at `first_row` of `expert` (same_layout holds)."""
    rows = slice(first_row, first_row + piece.shape[0])
    if isinstance(piece, Fp8Rows):
        stack.codes[expert, rows] = piece.weight
        stack.scale[expert, rows] = piece.scale
        return
    codes = piece.codes.to(torch.uint8)
    stack.codes[expert, rows] = packed_nibbles(codes) if stack.bits == 4 else codes
    stack.scale[expert, rows] = piece.scale
    stack.low[expert, rows] = piece.low


def narrowed(piece: Fp8Rows | GroupCodes, dim: int, start: int,
             length: int) -> Fp8Rows | GroupCodes | None:
    """A piece's rows (dim 0) or inputs (dim 1) [start, start + length), its scales with
    them; None where the inputs cut a group of several scales."""
    codes = piece.weight if isinstance(piece, Fp8Rows) else piece.codes
    scale = piece.scale
    if dim == 0:
        parts = {"scale": scale.narrow(0, start, length)}
        if isinstance(piece, GroupCodes):
            parts["low"] = piece.low.narrow(0, start, length)
    else:
        inputs, groups = codes.shape[1], scale.shape[1]
        group = inputs // groups
        if groups > 1 and (start % group or length % group):
            return None
        first, count = (start // group, length // group) if groups > 1 else (0, 1)
        parts = {"scale": scale.narrow(1, first, count)}
        if isinstance(piece, GroupCodes):
            parts |= {"low": piece.low.narrow(1, first, count),
                      "group": group if groups > 1 else length}
    key = "weight" if isinstance(piece, Fp8Rows) else "codes"
    return replace(piece, **{key: codes.narrow(dim, start, length)}, **parts)


def random_group_codes(bits: int, group: int, rows: int, columns: int,
                       generator: torch.Generator, std: float) -> GroupCodes:
    """A random [rows, columns] piece in `bits`-bit codes, a scale and low per `group`
    inputs, its weights of mean 0 and standard deviation `std`: a dummy expert's projection
    of an integer format."""
    from pagoda.layers.quantization.int_checkpoints import dummy_codes
    return GroupCodes(*dummy_codes(rows, columns, bits, group, generator, std), group, bits)


def quantized_integers(stack: torch.Tensor, bits: int, group: int) -> ExpertCodes:
    """Floats [experts, rows, inputs] as `bits`-bit codes with a scale and low (each group's
    minimum) a row and `group` inputs, expert by expert (moe_bench's codes of the bf16
    layer's weights)."""
    experts, rows, inputs = stack.shape
    floats = stack[0].new_empty(0)
    held = empty_stack(GroupCodes(floats, floats, floats, group, bits), experts, rows, inputs,
                       stack.device)
    for expert in range(experts):
        grouped = stack[expert].float().view(rows, inputs // group, group)
        low, high = grouped.amin(dim=-1), grouped.amax(dim=-1)
        scale = ((high - low) / (2 ** bits - 1)).clamp(min=1e-8)
        codes = ((grouped - low[..., None]) / scale[..., None]).round_().clamp_(0, 2 ** bits - 1)
        put(held, expert, 0, GroupCodes(codes.to(torch.uint8).view(rows, inputs), scale, low,
                                        group, bits))
    return held


def quantized_float8(stack: torch.Tensor) -> ExpertCodes:
    """Floats [experts, rows, inputs] as float8 with a scale a row, expert by expert (the
    dense layers' per-channel quantization)."""
    from pagoda.layers.quantization.fp8 import quantize_per_channel
    experts, rows, inputs = stack.shape
    codes = ExpertCodes(torch.empty(experts, rows, inputs, dtype=FLOAT8, device=stack.device),
                        torch.empty(experts, rows, 1, dtype=torch.float32, device=stack.device))
    for expert in range(experts):
        values, scale = quantize_per_channel(stack[expert])
        codes.codes[expert] = values
        codes.scale[expert] = scale
    return codes
