"""GGUF's block-quantized weight formats in torch: how many bytes a block of how many
weights takes, and how a row of blocks decodes back to floats (the formats as llama.cpp's
ggml-common.h lays them out). 4-bit formats also decode to (codes, scale, min) per group of
32 weights, the form torch's int4 weight-packed matmul takes; every format decodes to byte
codes with a scale and a min per group, the form of the GPU kernel (group_gemm); the
k-quants' scales and mins also as they store them (scale_factors: integers a group times a
super-block's float), the form the CPU block-dot kernel holds. The non-linear 4-bit types
(IQ4_NL, IQ4_XS: each 4-bit index picks one of 16 int8 values) decode to byte codes, the
value plus 128, with a low of -128 times the scale."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagoda.layers.quantization.cpu_block_dot import ScaleFactors

QK_K = 256  # weights per super-block of the k-quants


@dataclass(frozen=True, slots=True)
class BlockFormat:
    """One GGUF quantized type: weights per block and bytes per block."""

    name: str
    block_weights: int
    block_bytes: int

    def row_bytes(self, columns: int) -> int:
        return columns // self.block_weights * self.block_bytes


FORMATS = {f.name: f for f in (
    BlockFormat("Q4_0", 32, 18), BlockFormat("Q4_1", 32, 20), BlockFormat("Q5_0", 32, 22),
    BlockFormat("Q5_1", 32, 24), BlockFormat("Q8_0", 32, 34),
    BlockFormat("Q2_K", QK_K, 84), BlockFormat("Q3_K", QK_K, 110),
    BlockFormat("Q4_K", QK_K, 144), BlockFormat("Q5_K", QK_K, 176),
    BlockFormat("Q6_K", QK_K, 210),
    BlockFormat("IQ4_NL", 32, 18), BlockFormat("IQ4_XS", QK_K, 136),
)}
INT4_FORMATS = frozenset({"Q4_0", "Q4_1", "Q4_K"})  # exactly codes * scale + min per 32
# types whose codes fit four bits (the CPU block-dot kernel holds them as nibbles)
NIBBLE_FORMATS = INT4_FORMATS | frozenset({"Q2_K", "Q3_K"})
# types whose codes fit six bits (the CPU block-dot kernel holds them as nibbles and pairs)
SIX_BIT_FORMATS = frozenset({"Q5_0", "Q5_1", "Q5_K", "Q6_K"})
K_QUANTS = frozenset({"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"})  # super-blocks of 256
# the k-quants without mins: a weight is (code - offset) * scale, its low a multiple of it
K_OFFSETS = {"Q3_K": 4.0, "Q6_K": 32.0}
# the types whose lows are one multiple of their scales in every group (the k-quants of
# K_OFFSETS; IQ4_XS's byte codes, -128)
LOWS_OF_SCALES = frozenset(K_OFFSETS) | {"IQ4_XS"}
SIXTEEN_A_GROUP = frozenset({"Q2_K", "Q3_K", "Q6_K"})  # a scale (and min) per 16 weights
# types whose byte_groups scales and mins are float16s (a block's d, its m, or d times a
# power of two); the k-quants' are products of a float16 and a 6- or 8-bit integer
HALF_SCALE_FORMATS = frozenset({"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL"})
# the types whose 4-bit indices pick one of these 16 values (llama.cpp's kvalues_iq4nl), times
# a scale per 32 weights: IQ4_NL's a float16 a block, IQ4_XS's a 6-bit sub-scale less 32
# times its super-block's float16
TABLE_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
TABLE_FORMATS = frozenset({"IQ4_NL", "IQ4_XS"})
# the types whose weights are a signed byte's value times a scale per 32 (Q8_0's stored, the
# table types' looked up): codes are the value plus 128, lows -128 times the scale
SIGNED_BYTE_FORMATS = frozenset({"Q8_0"}) | TABLE_FORMATS
# the types whose lows are all one power of two times their scales (Q4_0's -8, the signed
# bytes' -128): the GPU kernel holds their scales alone (group_gemm.CENTRED_CODES)
CENTRED_FORMATS = frozenset({"Q4_0"}) | SIGNED_BYTE_FORMATS
# the types whose scales are integer sub-scales a group times a super-block's float16
# (scale_factors)
FACTORED_FORMATS = K_QUANTS | {"IQ4_XS"}


def _half(raw: torch.Tensor) -> torch.Tensor:
    """Little-endian float16 fields ([..., 2] bytes) as float32 [...]."""
    return raw.contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes -> [..., 2n]: the n low nibbles, then the n high nibbles."""
    return torch.cat([packed & 0x0F, packed >> 4], dim=-1)


def _bits(raw: torch.Tensor, count: int) -> torch.Tensor:
    """[..., count/8] bytes -> [..., count] bits, least significant bit of byte 0 first."""
    shifts = torch.arange(8, dtype=torch.uint8, device=raw.device)
    return ((raw.unsqueeze(-1) >> shifts) & 1).reshape(*raw.shape[:-1], count)


def _blocks(rows: torch.Tensor, fmt: BlockFormat) -> torch.Tensor:
    """[rows, row bytes] -> [rows, blocks, block bytes]."""
    return rows.reshape(rows.shape[0], -1, fmt.block_bytes)


def _k_scales_mins(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes of eight 6-bit scales and eight 6-bit mins -> two [..., 8]."""
    raw = raw.to(torch.int32)
    low, mid, high = raw[..., 0:4], raw[..., 4:8], raw[..., 8:12]
    scales = torch.cat([low & 63, (high & 15) | ((low >> 6) << 4)], dim=-1)
    mins = torch.cat([mid & 63, (high >> 4) | ((mid >> 6) << 4)], dim=-1)
    return scales.float(), mins.float()


def int4_groups(rows: torch.Tensor, name: str
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 4-bit format's rows as codes [rows, columns] (0..15, uint8) and a scale and a min
    per group of 32 ([rows, columns / 32] float32): weight = code * scale + min."""
    fmt = FORMATS[name]
    blocks = _blocks(rows, fmt)
    if name == "Q4_0":
        scale = _half(blocks[..., 0:2])
        codes, low = _nibbles(blocks[..., 2:18]), -8.0 * scale
    elif name == "Q4_1":
        scale, low = _half(blocks[..., 0:2]), _half(blocks[..., 2:4])
        codes = _nibbles(blocks[..., 4:20])
    elif name == "Q4_K":
        scale, low = _k_scales(blocks, name)
        # four 32-byte chunks: low nibbles = sub-block 2j, high nibbles = sub-block 2j + 1
        codes = _nibbles(blocks[..., 16:144].reshape(*blocks.shape[:2], 4, 32))
    else:
        raise ValueError(f"{name} is not a 4-bit GGUF format")
    count = rows.shape[0]
    return codes.reshape(count, -1), scale.reshape(count, -1), low.reshape(count, -1)


def _q5(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """Q5_0/Q5_1 codes (0..31) from 4 bytes of high bits at `offset` then 16 bytes of nibbles."""
    high = _bits(blocks[..., offset:offset + 4], 32)
    return _nibbles(blocks[..., offset + 4:offset + 20]) | (high << 4)


def _q5_k_codes(blocks: torch.Tensor) -> torch.Tensor:
    """Q5_K's codes (0..31) as [rows, blocks, 8 sub-blocks, 32]."""
    high = _bits(blocks[..., 16:48], 256).reshape(*blocks.shape[:2], 32, 8)  # [l, bit]
    low = _nibbles(blocks[..., 48:176].reshape(*blocks.shape[:2], 4, 32))  # [chunk, 64]
    # sub-block s = 2 * chunk + half takes bit s of qh[l] as its fifth bit
    fifth = high.permute(0, 1, 3, 2).reshape(*blocks.shape[:2], 4, 64)
    return (low | (fifth << 4)).reshape(*blocks.shape[:2], 8, 32)


def _q6_k_codes(blocks: torch.Tensor) -> torch.Tensor:
    """Q6_K's codes (0..63, the weight's multiple of its scale plus 32) as [rows, blocks,
    16 groups, 16] uint8."""
    rows, count = blocks.shape[:2]
    ql = blocks[..., 0:128].reshape(rows, count, 2, 2, 32)  # [half, low/high 32 bytes, l]
    qh = blocks[..., 128:192].reshape(rows, count, 2, 1, 32)
    low = torch.stack([ql & 0x0F, ql >> 4], dim=3)  # [half, nibble, which 32, l]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=blocks.device)
    high = ((qh >> shifts.view(1, 1, 1, 4, 1)) & 3).reshape(rows, count, 2, 2, 2, 32)
    # element 32 * (2 * nibble + which) + l of each half; qh shift 2 * (2 * nibble + which);
    # scale index within a half: 2 * quarter + l / 16
    return (low | (high << 4)).reshape(rows, count, 16, 16)


def _two_bit_fields(qs: torch.Tensor) -> torch.Tensor:
    """Q2_K/Q3_K's 64 bytes of 2-bit fields [..., 64] -> [..., 256] (0..3): byte 32 * half
    + l holds weights 128 * half + 32 * j + l in its bits 2j and 2j + 1."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=qs.device)
    fields = (qs.reshape(*qs.shape[:-1], 2, 1, 32) >> shifts.view(4, 1)) & 3
    return fields.reshape(*qs.shape[:-1], 256)


def _q2_k_codes(blocks: torch.Tensor) -> torch.Tensor:
    """Q2_K's codes (0..3) as [rows, blocks, 16 groups, 16] (its block: 16 bytes of 4-bit
    scales and mins, 64 of codes, d and dmin)."""
    return _two_bit_fields(blocks[..., 16:80]).reshape(*blocks.shape[:2], 16, 16)


def _q3_k_codes(blocks: torch.Tensor) -> torch.Tensor:
    """Q3_K's codes (0..7: the weight's multiple of its scale plus 4) as [rows, blocks, 16
    groups, 16] (its block: 32 bytes of third bits, bit b of byte l for weight 32b + l, 64
    of 2-bit fields, 12 of 6-bit signed scales, d)."""
    low = _two_bit_fields(blocks[..., 32:96])
    bits = torch.arange(8, dtype=torch.uint8, device=blocks.device).view(8, 1)
    high = ((blocks[..., 0:32].unsqueeze(-2) >> bits) & 1).reshape(*blocks.shape[:2], 256)
    return (low | (high << 2)).reshape(*blocks.shape[:2], 16, 16)


def _q3_k_scales(raw: torch.Tensor) -> torch.Tensor:
    """Q3_K's 12 bytes of sixteen 6-bit scales (less 32) -> [..., 16] float32: scale i's
    low four bits are byte i's low nibble (i < 8) or byte i - 8's high one, its top two
    bits byte 8 + i % 4's bits 2 (i // 4) and up."""
    raw = raw.to(torch.int32)
    low = torch.cat([raw[..., 0:8] & 15, raw[..., 0:8] >> 4], dim=-1)
    high = torch.cat([(raw[..., 8:12] >> shift) & 3 for shift in (0, 2, 4, 6)], dim=-1)
    return ((low | (high << 4)) - 32).float()


def _k_factors(blocks: torch.Tensor, name: str
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """A k-quant's (or IQ4_XS's) scales and mins as its blocks store them: the sub-scales
    and sub-mins [rows, blocks, groups] (integers; None where the low is a multiple of the
    scale: the sub-scales serve) and each super-block's scale and low factors [rows,
    blocks] (d, and -dmin or that multiple of d)."""
    if name in ("Q4_K", "Q5_K"):
        d, dmin = _half(blocks[..., 0:2]), _half(blocks[..., 2:4])
        sc, m = _k_scales_mins(blocks[..., 4:16])
        return sc, m, d, -dmin
    if name == "Q6_K":
        d = _half(blocks[..., 208:210])
        return blocks[..., 192:208].contiguous().view(torch.int8), None, d, -K_OFFSETS[name] * d
    if name == "Q3_K":
        d = _half(blocks[..., 108:110])
        return _q3_k_scales(blocks[..., 96:108]), None, d, -K_OFFSETS[name] * d
    if name == "IQ4_XS":  # (its codes are the table's values plus 128)
        sub_scale, d = _iq4_xs_sub_scales(blocks)
        return sub_scale, None, d, -128.0 * d
    packed = blocks[..., 0:16]  # Q2_K
    return packed & 15, packed >> 4, _half(blocks[..., 80:82]), -_half(blocks[..., 82:84])


def _k_scales(blocks: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A k-quant's scale and low (weight = code * scale + low) a group, [rows, blocks,
    groups] float32: the products of _k_factors (exact in float32)."""
    sub_scale, sub_low, scale_factor, low_factor = _k_factors(blocks, name)
    sub_low = sub_scale if sub_low is None else sub_low
    return sub_scale.float() * scale_factor[..., None], sub_low.float() * low_factor[..., None]


def byte_groups(rows: torch.Tensor, name: str
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Any type's rows as codes [rows, columns] (uint8), a scale and a min per group
    ([rows, groups] float32) and the group's size: weight = code * scale + min. The 4-bit
    types' codes fit 4 bits (int4_groups); the others' 2, 3, 5, 6 or 8."""
    fmt = FORMATS[name]
    blocks = _blocks(rows, fmt)
    count = rows.shape[0]
    if name in INT4_FORMATS:
        return (*int4_groups(rows, name), 32)
    if name in K_QUANTS:
        codes = _K_CODES[name](blocks)
        scale, low = _k_scales(blocks, name)
        return codes.reshape(count, -1), scale.reshape(count, -1), low.reshape(count, -1), \
            QK_K // scale.shape[-1]
    if name in SIGNED_BYTE_FORMATS:
        values, scale = _signed_values(blocks, name)
        codes = (values + 128).to(torch.uint8)
        low = -128.0 * scale
    elif name in ("Q5_0", "Q5_1"):
        scale = _half(blocks[..., 0:2])
        codes = _q5(blocks, 2 if name == "Q5_0" else 4)
        low = -16.0 * scale if name == "Q5_0" else _half(blocks[..., 2:4])
    else:
        raise ValueError(f"GGUF type {name} has no code decoder")
    return codes.reshape(count, -1), scale.reshape(count, -1), low.reshape(count, -1), 32


def scale_factors(rows: torch.Tensor, name: str) -> ScaleFactors | None:
    """A k-quant's or IQ4_XS's byte_groups scales and lows as the blocks store them: integer
    sub-scales (and sub-mins) a group times each super-block's d (and dmin), the lows of the
    types without mins a multiple of their scales; None for the other types (one float16
    scale a block of 32)."""
    if name not in FACTORED_FORMATS:
        return None
    sub_scale, sub_low, scale_factor, low_factor = _k_factors(_blocks(rows, FORMATS[name]), name)

    def small(values: torch.Tensor) -> torch.Tensor:
        return values.to(torch.int8).reshape(rows.shape[0], -1)
    return ScaleFactors(small(sub_scale), None if sub_low is None else small(sub_low),
                        scale_factor.float(), low_factor.float(), sub_scale.shape[-1])


def dequantize_rows(rows: torch.Tensor, name: str) -> torch.Tensor:
    """[rows, row bytes] uint8 blocks of GGUF type `name` -> [rows, columns] float32."""
    fmt = FORMATS[name]
    blocks = _blocks(rows, fmt)
    if name in INT4_FORMATS:
        codes, scale, low = int4_groups(rows, name)
        groups = codes.reshape(rows.shape[0], -1, 32).float()
        return (groups * scale[..., None] + low[..., None]).reshape(rows.shape[0], -1)
    if name in SIGNED_BYTE_FORMATS:
        values, scale = _signed_values(blocks, name)
        return (scale[..., None] * values.float()).reshape(rows.shape[0], -1)
    if name == "Q5_0":
        codes = _q5(blocks, 2).float() - 16.0
        return (_half(blocks[..., 0:2])[..., None] * codes).reshape(rows.shape[0], -1)
    if name == "Q5_1":
        weights = _half(blocks[..., 0:2])[..., None] * _q5(blocks, 4).float()
        return (weights + _half(blocks[..., 2:4])[..., None]).reshape(rows.shape[0], -1)
    if name in K_QUANTS:
        return _dequantize_k(blocks, name).reshape(rows.shape[0], -1)
    raise ValueError(f"GGUF type {name} has no torch decoder")


def _signed_values(blocks: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A SIGNED_BYTE_FORMATS matrix's weights over their scales, [rows, groups, 32] int16
    (Q8_0's stored int8s; for IQ4_NL and IQ4_XS TABLE_VALUES, a group's indices' low nibbles
    its first 16 and high nibbles its last 16), and the scales [rows, groups] float32."""
    count = blocks.shape[0]
    if name == "Q8_0":
        values = blocks[..., 2:34].contiguous().view(torch.int8).to(torch.int16)
        return values.reshape(count, -1, 32), _half(blocks[..., 0:2]).reshape(count, -1)
    table = torch.tensor(TABLE_VALUES, dtype=torch.int16, device=blocks.device)
    if name == "IQ4_NL":
        scale = _half(blocks[..., 0:2])
        indices = _nibbles(blocks[..., 2:18])
    else:  # IQ4_XS: d, 16 bits of sub-scale highs, 4 bytes of sub-scale lows, 128 of indices
        sub_scale, d = _iq4_xs_sub_scales(blocks)
        scale = d[..., None] * sub_scale.float()
        indices = _nibbles(blocks[..., 8:136].reshape(count, -1, 8, 16))
    return table[indices.long()].reshape(count, -1, 32), scale.reshape(count, -1)


def _iq4_xs_sub_scales(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IQ4_XS's eight 6-bit sub-scales less 32 a block, [rows, blocks, 8] int32 (each one's
    low four bits a nibble of bytes 4-7, its top two bits of the 16-bit word at 2), and
    each block's d [rows, blocks] float32."""
    highs = blocks[..., 2:4].contiguous().view(torch.int16).to(torch.int32)
    # byte i's low nibble is sub-block 2i's, its high nibble 2i + 1's
    lows = _nibbles(blocks[..., 4:8])
    lows = torch.stack([lows[..., :4], lows[..., 4:]], dim=-1).reshape(*lows.shape[:-1], 8)
    shifts = 2 * torch.arange(8, dtype=torch.int32, device=blocks.device)
    return (lows.to(torch.int32) | (((highs >> shifts) & 3) << 4)) - 32, _half(blocks[..., 0:2])


def _dequantize_k(blocks: torch.Tensor, name: str) -> torch.Tensor:
    """A k-quant's weights [rows, blocks, groups, group size] float32, as gguf-py's
    dequantization rounds them: the types without mins as their scale times the code less
    its offset, the others as code * scale + low."""
    codes = _K_CODES[name](blocks).float()
    scale, low = _k_scales(blocks, name)
    offset = K_OFFSETS.get(name)
    if offset is not None:
        return scale[..., None] * (codes - offset)
    return scale[..., None] * codes + low[..., None]


# the codes of the k-quants other than Q4_K (a 4-bit format: int4_groups)
_K_CODES = {"Q2_K": _q2_k_codes, "Q3_K": _q3_k_codes, "Q5_K": _q5_k_codes, "Q6_K": _q6_k_codes}
