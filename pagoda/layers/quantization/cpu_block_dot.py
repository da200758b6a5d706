"""Quantized weights on CPU through pagoda's own kernel (`cpu_block_dot.cpp`, for AVX-512
VNNI or AVX2): 4-, 6- or 8-bit codes with a scale and a low per group of inputs (16, or a
multiple of 32), times activations quantized to int8 per block of 32 inputs, one integer dot
product per block; by default in two passes (the codes of what the first codes miss, at
1/256 of their scale: float32's log-probabilities within ~2e-4), or one (llama.cpp's
arithmetic for its quantized types). At 16 tokens the AVX-512 build runs about 2x (two
passes) to 3x (one) float32's matmul and torch's int4 kernel on a 2-core AVX-512 VM
(bench/results/README.md), and it holds 8-bit types (GGUF Q8_0, GPTQ-Int8) as bytes, and
GGUF's Q5_* and Q6_K as 6-bit codes, where float weights would be decoded at load.

The kernel is compiled at first use (`pagoda.layers.cpu_kernels`): an AVX-512 VNNI build,
else an AVX2 one (`PAGODA_CPU_BLOCK_DOT=avx2` picks it). Without a compiler, on a CPU with
neither, or with `PAGODA_CPU_BLOCK_DOT=0`, `available()` is False and the layers use torch's
int4 kernel (4-bit codes) or decode the weights at load (8-bit codes)."""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pagoda.layers.cpu_kernels import float32_rows, load_chosen_kernel, run_kernel
from pagoda.logger import get_logger

logger = get_logger(__name__)

SOURCE = Path(__file__).with_name("cpu_block_dot.cpp")
# the builds, best first: each runs where its pagoda_block_dot_supported() says so
BUILDS = {"avx512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma"),
          "avx2": ("-mavx2", "-mfma", "-mf16c")}
BLOCK = 32  # inputs per activation block
LANES = 16  # outputs per weight tile
BITS = (4, 6, 8)
PASSES_VARIABLE = "PAGODA_CPU_ACTIVATION_PASSES"


def _bind(library: ctypes.CDLL) -> ctypes.CDLL:
    pointer, size, flag = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    library.pagoda_block_dot.argtypes = [pointer, size, size, flag, pointer, flag, pointer,
                                         pointer, flag, pointer, flag, size, size, pointer,
                                         pointer, size, flag]
    library.pagoda_block_dot_rows.argtypes = [pointer, size, pointer, flag, pointer, pointer,
                                              flag, pointer, flag, size, size, ctypes.c_float,
                                              pointer]
    library.pagoda_block_dot.restype = library.pagoda_block_dot_rows.restype = None
    return library


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The best build of the kernel this CPU runs, or None (with one log line) where none
    can run here. PAGODA_CPU_BLOCK_DOT: 0 turns it off, a build's name (avx2) picks it."""
    library = load_chosen_kernel("PAGODA_CPU_BLOCK_DOT", SOURCE, BUILDS,
                                 "pagoda_block_dot_supported", "CPU block-dot kernel",
                                 "quantized CPU layers use torch's kernels", logger)
    return None if library is None else _bind(library)


def available() -> bool:
    """Whether the kernel runs on this machine (built, or built now)."""
    return _library() is not None


def holds(out_features: int, in_features: int, group_size: int) -> bool:
    """Whether the kernel runs on this machine and holds this shape (`fits`)."""
    return fits(out_features, in_features, group_size) and available()


def fits(out_features: int, in_features: int, group_size: int) -> bool:
    """Whether the kernel holds this shape: whole tiles of 16 outputs, whole blocks of 32
    inputs, groups of 16 or a multiple of 32 dividing the inputs."""
    return (out_features % LANES == 0 and in_features % BLOCK == 0
            and (group_size == BLOCK // 2 or group_size % BLOCK == 0)
            and in_features % group_size == 0)


def narrowest_bits(bits: int, codes: torch.Tensor) -> int:
    """The bits the kernel holds each of `codes` (given as `bits`-bit codes) in: 4 where
    every code fits a nibble (GGUF Q2_K's and Q3_K's, given as bytes: half the bytes to hold
    and stream), 6 where every code fits 6 bits (Q5_*'s and Q6_K's: three quarters), else
    `bits`."""
    if bits != 8 or not codes.numel():
        return bits
    top = int(codes.max())
    return 4 if top < 16 else 6 if top < 64 else 8


def takes_bias(bias: torch.Tensor | None) -> bool:
    """Whether the kernel adds this bias itself: float32 and contiguous."""
    return bias is not None and bias.dtype == torch.float32 and bias.is_contiguous()


def tile_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[out, in] codes (0..2^bits - 1) in the kernel's layout: per tile of 16 outputs and
    block of 32 inputs, 8 rows of [16 outputs x 4 inputs] bytes, 4-bit codes two rows to a
    byte (row 2l in the low nibble, 2l + 1 in the high); 6-bit codes their low nibbles so,
    then their high pairs four rows to a byte (row 4h + s in bits 2s and 2s + 1 of row h)."""
    out_features, in_features = codes.shape
    tiles = codes.to(torch.uint8).reshape(out_features // LANES, LANES, in_features // BLOCK,
                                          8, 4).permute(0, 2, 3, 1, 4)
    if bits == 8:
        return tiles.contiguous()
    pairs = (tiles & 0x0F).reshape(*tiles.shape[:2], 4, 2, LANES, 4)
    nibbles = pairs[:, :, :, 0] | (pairs[:, :, :, 1] << 4)
    if bits == 4:
        return nibbles.contiguous()
    highs = (tiles >> 4).reshape(*tiles.shape[:2], 2, 4, LANES, 4)
    high_rows = highs[:, :, :, 0] | (highs[:, :, :, 1] << 2) | (highs[:, :, :, 2] << 4) \
        | (highs[:, :, :, 3] << 6)
    return torch.cat([nibbles, high_rows], dim=2).contiguous()


def held_exactly(values: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether every one of `values` is `dtype`'s to the bit (infinities and NaNs are not)."""
    held = values.to(dtype)
    return bool(held.isfinite().all()) and torch.equal(held.to(values.dtype), values)


def tile_groups(values: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[out, groups] -> [tiles, groups, 16] of dtype (float32 or float16), the kernel's scale
    and low layout."""
    out_features, groups = values.shape
    return values.to(dtype).reshape(out_features // LANES, LANES, groups).transpose(1, 2
                                                                                  ).contiguous()


def default_activation_passes() -> int:
    """Passes over the activations: 2 (int8 codes, then codes of what those miss: within
    ~2^-16 of each block's largest, at about 1.6x the products' time), or 1 with
    PAGODA_CPU_ACTIVATION_PASSES=1 (llama.cpp's arithmetic: SmolLM2's log-probabilities
    move 3x as far from float32's as on torch's bfloat16 int4 kernel)."""
    value = os.environ.get(PASSES_VARIABLE, "2")
    if value not in ("1", "2"):
        raise ValueError(f"{PASSES_VARIABLE} must be 1 or 2, not {value!r}")
    return int(value)


def kernel_name(bits: int, activation_passes: int, half_scales: bool = False,
                factored: bool = False) -> str:
    """What the startup log calls a layer on the kernel (scales float32 unless said)."""
    scales = "float16 scales, " if half_scales else "factored scales, " if factored else ""
    return f"cpu_block_dot ({bits}-bit codes, {scales}{activation_passes}-pass activations)"


@dataclass(slots=True)
class ScaleFactors:
    """A matrix's group scales and lows as GGUF's k-quants store them: each group's integer
    sub-scale and sub-low ([out, groups] int8) times its superblock's scale and low factors
    ([out, supers] float32), `groups_per_super` groups a superblock (a power of two). Each
    product is exact in float32: they are GroupCodes' scale and low to the bit, in about a
    quarter of the bytes."""

    sub_scale: torch.Tensor
    sub_low: torch.Tensor | None  # None: the sub-scales serve (the low a multiple of the scale)
    scale_factor: torch.Tensor
    low_factor: torch.Tensor
    groups_per_super: int

    def products(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, low) [out, groups] float32."""
        sub_low = self.sub_scale if self.sub_low is None else self.sub_low
        spread = [f.repeat_interleave(self.groups_per_super, dim=1)
                  for f in (self.scale_factor, self.low_factor)]
        return self.sub_scale.float() * spread[0], sub_low.float() * spread[1]

    def layout(self) -> int:
        return self.groups_per_super


def factored_exactly(factors: ScaleFactors, scale: torch.Tensor, low: torch.Tensor) -> bool:
    """Whether `factors`' products are `scale` and `low` to the bit."""
    products = factors.products()
    return all(p.shape == v.shape and torch.equal(p, v.float())
               for p, v in zip(products, (scale, low), strict=True))


@dataclass(slots=True)
class GroupCodes:
    """One weight matrix as codes [out, in] (0..2^bits - 1) with a scale and a low per
    group of `group` inputs ([out, in / group]): each weight is code * scale + low. What a
    quantized checkpoint's tensors unpack to before a kernel holds them."""

    codes: torch.Tensor
    scale: torch.Tensor
    low: torch.Tensor
    group: int
    bits: int
    half_scales: bool = False  # the scales are float16's exactly (GGUF's legacy types)
    factors: ScaleFactors | None = None  # the scales and lows factored (GGUF's k-quants)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def layout(self) -> tuple:
        return (self.group, self.bits, self.half_scales,
                None if self.factors is None else self.factors.layout())

    def decoded(self) -> torch.Tensor:
        """The float32 weights."""
        from pagoda.layers.quantization.base import decoded_groups
        return decoded_groups(self.codes, self.scale, self.low)


def stacked_kernel(pieces: list[GroupCodes]) -> BlockDotWeight | None:
    """One kernel holding `pieces`' rows one after another, where they share a layout and
    the kernel holds their shape; else None."""
    group, bits, half, factored = pieces[0].layout()
    rows, columns = sum(p.shape[0] for p in pieces), pieces[0].shape[1]
    if any(p.layout() != pieces[0].layout() for p in pieces) or \
            not holds(rows, columns, group) or bits not in BITS:
        return None
    codes, scale, low = (torch.cat(parts) for parts in zip(
        *((p.codes, p.scale, p.low) for p in pieces)))
    factors = None if factored is None else stacked_factors([p.factors for p in pieces])
    return BlockDotWeight(codes, scale, low, group, bits, half_scales=half, factors=factors)


def stacked_factors(parts: list[ScaleFactors]) -> ScaleFactors:
    """Factors of one layout, rows one after another (sub-lows of their own for all where
    one part has them: the sub-scales stand in for the others')."""
    sub_low = None
    if any(p.sub_low is not None for p in parts):
        sub_low = torch.cat([p.sub_scale if p.sub_low is None else p.sub_low for p in parts])
    return ScaleFactors(torch.cat([p.sub_scale for p in parts]), sub_low,
                        torch.cat([p.scale_factor for p in parts]),
                        torch.cat([p.low_factor for p in parts]), parts[0].groups_per_super)


class BlockDotWeight(nn.Module):
    """[out, in] weights as 4-, 6- or 8-bit codes for the kernel; `__call__(x)` is x W^T."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor,
                 group_size: int, bits: int, activation_passes: int | None = None,
                 half_scales: bool = False, factors: ScaleFactors | None = None) -> None:
        """`codes` [out, in] in 0..2^bits - 1 (byte codes held in the fewest bits that hold
        them, narrowest_bits); `scale`, `low` [out, in / group_size]: each weight is
        code * scale + low. `activation_passes`: 1 or 2 (default: the
        environment's, default_activation_passes). `half_scales`: hold the scales and lows
        as float16 (fewer bytes to stream) where every one is float16's exactly; `factors`:
        hold them factored where their products are scale and low exactly; else as
        float32."""
        super().__init__()
        self.out_features, self.in_features = codes.shape
        if bits not in BITS or not fits(self.out_features, self.in_features, group_size):
            raise ValueError(f"no block-dot kernel for {bits}-bit [{self.out_features}, "
                             f"{self.in_features}] weights in groups of {group_size}")
        self.group_size, self.bits = group_size, narrowest_bits(bits, codes)
        self.activation_passes = activation_passes or default_activation_passes()
        self.packed = nn.Parameter(tile_codes(codes, self.bits), requires_grad=False)
        self.factor_shift = 0
        self.factors = nn.Parameter(torch.empty(0), requires_grad=False)  # (unread unfactored)
        if factors is not None and factored_exactly(factors, scale, low):
            self._hold_factored(factors)
            return
        scale_dtype = torch.float16 if half_scales and held_exactly(scale, torch.float16) \
            and held_exactly(low, torch.float16) else torch.float32
        self.scale = nn.Parameter(tile_groups(scale, scale_dtype), requires_grad=False)
        self.low = nn.Parameter(tile_groups(low, scale_dtype), requires_grad=False)

    def _hold_factored(self, factors: ScaleFactors) -> None:
        """The int8 sub-scales and sub-lows tiled as scales are ([tiles, groups, 16]; one
        parameter for both where the sub-scales serve), the factors [tiles, supers, 2, 16]."""
        self.scale = nn.Parameter(tile_groups(factors.sub_scale, torch.int8),
                                  requires_grad=False)
        self.low = self.scale if factors.sub_low is None else nn.Parameter(
            tile_groups(factors.sub_low, torch.int8), requires_grad=False)
        pairs = torch.stack([factors.scale_factor, factors.low_factor], dim=-1).float()
        supers = pairs.shape[1]
        self.factors = nn.Parameter(pairs.reshape(-1, LANES, supers, 2).permute(0, 2, 3, 1)
                                    .contiguous(), requires_grad=False)
        self.factor_shift = factors.groups_per_super.bit_length() - 1

    @property
    def factored(self) -> bool:
        return self.scale.dtype == torch.int8

    def kernel_name(self) -> str:
        return kernel_name(self.bits, self.activation_passes,
                           self.scale.dtype == torch.float16, self.factored)

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """x W^T (+ bias: float32 [out_features], contiguous); into `out` when given (float32
        [tokens, out_features] with unit column stride: a column slice of a wider output)."""
        flat = float32_rows(x)
        tokens = flat.numel() // self.in_features
        into = torch.empty(x.shape[:-1] + (self.out_features,)) if out is None else out
        run_kernel(
            _library().pagoda_block_dot, flat.data_ptr(), tokens, self.in_features,
            self.activation_passes, self.packed.data_ptr(), self.bits, self.scale.data_ptr(),
            self.low.data_ptr(), self.scale.element_size() * 8, self.factors.data_ptr(),
            self.factor_shift, self.out_features, self.group_size,
            None if bias is None else bias.data_ptr(), into.data_ptr(),
            into.stride(-2) if into.dim() > 1 else 0, torch.get_num_threads())
        return into if x.dtype == torch.float32 or out is not None else into.to(x.dtype)

    def rows(self, index: torch.Tensor, scale: float | None = None,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Weight rows `index` (each in [0, out_features)) as [len(index), in] of `dtype`,
        decoded in float32 by the kernel (a table's lookup), times `scale` where given
        (rounded as torch's rows * scale)."""
        ids = index.reshape(-1).to(torch.int64).contiguous()
        out = torch.empty(len(ids), self.in_features)
        run_kernel(_library().pagoda_block_dot_rows, ids.data_ptr(), len(ids),
                   self.packed.data_ptr(), self.bits, self.scale.data_ptr(), self.low.data_ptr(),
                   self.scale.element_size() * 8, self.factors.data_ptr(), self.factor_shift,
                   self.in_features, self.group_size,
                   1.0 if scale is None else scale, out.data_ptr())
        return out.to(dtype)

    def _group_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The scales and lows as float32 [tiles, groups, 16] (factored: their products)."""
        if not self.factored:
            return self.scale.float(), self.low.float()
        per_group = self.factors.repeat_interleave(1 << self.factor_shift, dim=1)
        return (self.scale.float() * per_group[:, :, 0], self.low.float() * per_group[:, :, 1])

    def decoded_rows(self, index: torch.Tensor) -> torch.Tensor:
        """`rows` (unscaled) in torch operators (the reference the kernel is tested
        against)."""
        tile, lane = index // LANES, index % LANES
        codes = self.packed[tile, :, :, lane]  # [n, blocks, rows, 4]: 4-bit rows paired
        if self.bits != 8:
            nibbles = codes[:, :, :4]
            codes = torch.stack([nibbles & 0x0F, nibbles >> 4], dim=3).flatten(2, 3)
        if self.bits == 6:  # [n, blocks, 2, 4]: each byte the high pairs of four rows
            pairs = self.packed[tile, :, 4:, lane]
            highs = torch.stack([(pairs >> (2 * s)) & 0x03 for s in range(4)], dim=3)
            codes = codes | (highs.flatten(2, 3) << 4)
        codes = codes.reshape(len(index), self.in_features // self.group_size, self.group_size)
        scale, low = (values[tile, :, lane] for values in self._group_scales())  # [n, groups]
        weights = codes.float() * scale.unsqueeze(-1) + low.unsqueeze(-1)
        return weights.reshape(len(index), self.in_features)
