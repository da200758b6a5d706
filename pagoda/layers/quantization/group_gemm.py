"""Quantized weights on the GPU: every format pagoda keeps quantized there is, per output row,
codes times a scale plus a min (or no min) per group of consecutive inputs:

- 4-bit codes 0..15 (AWQ, GPTQ, compressed-tensors int4, GGUF Q4_0/Q4_1/Q4_K), packed four
  to an int16 ("planes", where the inputs are a multiple of 128 and the groups of 32) or two
  to a byte;
- 8-bit codes 0..255 (GGUF Q8_0, Q5_0/Q5_1, Q5_K, Q6_K: their 5, 6 and 8-bit codes held in a
  byte each; those whose lows are all -128 times the scale, Q8_0's, with no min:
  CENTRED_CODES), those of at most 7 bits (Q5_0/Q5_1, Q5_K, Q6_K) two to an int16
  ("byte planes", where the inputs are a multiple of 32 and the groups of 16; BYTE_PLANES);
- float8 E4M3 values (FP8 checkpoints), a scale per row or per block, no min.

`GroupQuantWeight` holds one layer's weights in that form and multiplies with the Triton
kernels of `pagoda.layers.quantization.triton_group_gemm` on CUDA (the codes are decoded in
registers tile by tile: the weights are read once, in their quantized bytes); elsewhere it
decodes them and runs a dense matmul (the reference the kernel is tested against).

Layout (chosen for the kernel's loads, contiguous along the outputs): codes [in, out]
(float8 values stay [out, in], the layout torch._scaled_mm takes); for 4 bits in planes
int16 [in / 4, out] where, within each step of 128 inputs, row j holds input 32 q + j in
nibble q (q = 0..3); in byte planes int16 [in / 2, out] where, within each step of 32
inputs, row j holds input 16 q + j in byte q (q = 0, 1); else for 4 bits [in / 2, out]
bytes where, within each chunk of 64 inputs, byte j holds input j in its low nibble and
input j + 32 in its high one; scales and mins [groups, out] float16 (float32 scales for
float8 values, whose per-row scales may be smaller than float16 holds)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from pagoda.layers.normed_rows import NormedRows

if TYPE_CHECKING:
    from pagoda.layers.quantization.cpu_block_dot import ScaleFactors

FP8 = torch.float8_e4m3fn
CHUNK = 64  # inputs per packed 4-bit chunk (two halves of HALF)
HALF = CHUNK // 2
SCALE_DTYPE = torch.float16
FEW_TOKENS = 32  # calls of at most this many tokens (decode) go to the few-token kernel;
# FP8 layers with a scale per row send larger ones to FP8 tensor cores
SMALL_M = 64  # calls of at most this many tokens split their inputs in the larger kernel
PLANE_ROWS = 32  # inputs per plane of a 4-bit planes step
PLANE_STEP = 4 * PLANE_ROWS  # inputs per int16 row of a step
BYTE_PLANE_ROWS = 16  # inputs per plane of a byte planes step (a group of GGUF Q6_K)
BYTE_PLANE_STEP = 2 * BYTE_PLANE_ROWS
# the largest code byte planes hold: 128 plus it is a bfloat16 integer, as the kernel decodes
MAX_BYTE_PLANE_CODE = 127


def pack_int4_halves(codes: torch.Tensor) -> torch.Tensor:
    """[out, in] codes 0..15 (in a multiple of CHUNK) -> [in / 2, out] uint8 bytes, input j of
    each chunk in the low nibble and input j + HALF in the high one."""
    out_features, in_features = codes.shape
    halves = codes.to(torch.uint8).reshape(out_features, in_features // CHUNK, 2, HALF)
    packed = halves[:, :, 0] | (halves[:, :, 1] << 4)
    return packed.reshape(out_features, in_features // 2).t().contiguous()


def unpack_int4_halves(packed: torch.Tensor) -> torch.Tensor:
    """pack_int4_halves' inverse: [in / 2, out] bytes -> [out, in] codes."""
    half_rows, out_features = packed.shape
    chunks = packed.t().reshape(out_features, half_rows // HALF, 1, HALF)
    return torch.cat([chunks & 0x0F, chunks >> 4], dim=2).reshape(out_features, 2 * half_rows)


def pack_int4_planes(codes: torch.Tensor) -> torch.Tensor:
    """[out, in] codes 0..15 (in a multiple of PLANE_STEP) -> int16 [in / 4, out]: within each
    step of PLANE_STEP inputs, row j holds input q PLANE_ROWS + j in nibble q."""
    out_features, in_features = codes.shape
    c = codes.to(torch.int32).reshape(out_features, in_features // PLANE_STEP, 4, PLANE_ROWS)
    words = c[:, :, 0] | (c[:, :, 1] << 4) | (c[:, :, 2] << 8) | (c[:, :, 3] << 12)
    words = torch.where(words >= 1 << 15, words - (1 << 16), words)  # as int16 bits
    return words.reshape(out_features, in_features // 4).to(torch.int16).t().contiguous()


def unpack_int4_planes(packed: torch.Tensor) -> torch.Tensor:
    """pack_int4_planes' inverse: int16 [in / 4, out] -> [out, in] uint8 codes."""
    rows, out_features = packed.shape
    words = packed.t().to(torch.int32).reshape(out_features, rows // PLANE_ROWS, 1, PLANE_ROWS)
    planes = [(words >> (4 * q)) & 15 for q in range(4)]
    return torch.cat(planes, dim=2).reshape(out_features, 4 * rows).to(torch.uint8)


def pack_byte_planes(codes: torch.Tensor) -> torch.Tensor:
    """[out, in] codes 0..MAX_BYTE_PLANE_CODE (in a multiple of BYTE_PLANE_STEP) -> int16
    [in / 2, out]: within each step of BYTE_PLANE_STEP inputs, row j holds input
    q BYTE_PLANE_ROWS + j in byte q."""
    out_features, in_features = codes.shape
    c = codes.to(torch.int32).reshape(out_features, in_features // BYTE_PLANE_STEP, 2,
                                      BYTE_PLANE_ROWS)
    words = c[:, :, 0] | (c[:, :, 1] << 8)  # below 1 << 15: no sign
    return words.reshape(out_features, in_features // 2).to(torch.int16).t().contiguous()


def unpack_byte_planes(packed: torch.Tensor) -> torch.Tensor:
    """pack_byte_planes' inverse: int16 [in / 2, out] -> [out, in] uint8 codes."""
    rows, out_features = packed.shape
    words = packed.t().to(torch.int32).reshape(out_features, rows // BYTE_PLANE_ROWS, 1,
                                               BYTE_PLANE_ROWS)
    return torch.cat([words & 0xFF, words >> 8], dim=2).reshape(out_features, 2 * rows) \
        .to(torch.uint8)


def takes_byte_planes(codes: torch.Tensor, group_size: int) -> bool:
    """Whether 8-bit integer codes [out, in] fit byte planes: whole steps of BYTE_PLANE_STEP
    inputs, groups a multiple of BYTE_PLANE_ROWS, no code past MAX_BYTE_PLANE_CODE."""
    return (codes.dtype != FP8 and codes.shape[1] % BYTE_PLANE_STEP == 0
            and group_size % BYTE_PLANE_ROWS == 0
            and int(codes.max()) <= MAX_BYTE_PLANE_CODE)


def takes_planes(in_features: int, group_size: int, bits: int) -> bool:
    """Whether 4-bit codes are held in planes: whole steps of PLANE_STEP inputs, groups a
    multiple of PLANE_ROWS (a plane never crosses a group)."""
    return bits == 4 and in_features % PLANE_STEP == 0 and group_size % PLANE_ROWS == 0


# whether planes hold integer zero points by default (PAGODA_PLANE_ZERO_POINTS=1 turns it
# on): off, as its products took as long as the mins' on the H100 and the H200 (faster for
# qkv and gate-up, slower for o and down; `bench/kernels/planes_products.py`), its GPU tests
# passing (tests/gpu/test_quantized_gpu.py runs both)
ZERO_POINTS_IN_PLANES = os.environ.get("PAGODA_PLANE_ZERO_POINTS", "0") == "1"
# whether planes in groups of whole steps (PLANE_STEP inputs), and byte planes, hold each
# group's scale and min (or zero point) as one int32 word an output (`step_words`), which
# the planes kernel applies to a step's (byte planes in groups of 16: a plane's) sums rather
# than weight by weight (PAGODA_PLANE_STEP_SUMS=0: off). 4-bit planes in smaller groups
# (GGUF's 32) are scaled weight by weight: a plane's sums scaled took as long at one token
# and 8 % longer at 16 on an H100; byte planes in groups of 16 took 203 us a layer weight by
# weight against 124 (bench/results/README.md)
STEP_SUMS_IN_PLANES = os.environ.get("PAGODA_PLANE_STEP_SUMS", "1") == "1"
# whether 8-bit codes of at most 7 bits (GGUF Q5_0/Q5_1, Q5_K, Q6_K) are held in byte planes
# (PAGODA_BYTE_PLANES=0: off), the planes kernel decoding them as it does nibbles (no
# conversion instruction). On an H100, alternated in one call: decode-1 of the 8B as a
# Q4_K_M GGUF 3.64 ms a token against 3.89 with a byte each; Q6_K's layout 123 against 133
# us a layer at one token, as long at 16, 718 against 983 at 256 (bench/results/README.md)
BYTE_PLANES = os.environ.get("PAGODA_BYTE_PLANES", "1") == "1"
# whether planes hold GGUF k-quants' scales and mins as the blocks store them
# (`factored_words`: an integer sub-scale and sub-min a group, a super-block's two float16
# factors; PAGODA_PLANE_FACTORED_SCALES=1), the kernel multiplying them out in float32
# (exact): Q4_K's held bits a weight 5 -> 4.625, Q6_K's 10 -> 8.625. Off (float16 scales
# and mins a group): on the H200 the 8B as a Q4_K_M GGUF decoded a token in 3.27 and 3.25 ms
# with it against 3.20 and 3.22 without, alternated in one call, though a step read 4.35 GB
# against 4.89 (its loop issues more instructions a step); on an H100 3.15 and 3.15 against
# 3.07 and 3.07 (bench/results/README.md)
FACTORED_SCALES_IN_PLANES = os.environ.get("PAGODA_PLANE_FACTORED_SCALES", "0") == "1"
# whether byte planes in groups of 16 whose groups all share one integer zero point (GGUF
# Q6_K's 32, Q3_K's 4: a min that is -z times the scale) hold only the scales, two groups'
# float16s to an int32 (`scale_pairs`), the zero point a constant of the kernel
# (PAGODA_PLANE_SCALE_PAIRS=0: off, a word a group as for other mins): 9 bits a weight of
# Q6_K where the words took 10
SCALE_PAIRS_IN_PLANES = os.environ.get("PAGODA_PLANE_SCALE_PAIRS", "1") == "1"
# whether codes whose lows are all -z times their scales, z a power of two, hold their
# scales alone, the kernels taking -z times the scale for the min (exact; `shared_zero` z;
# PAGODA_CENTRED_CODES=0: off): byte codes a byte each (not in planes: GGUF Q8_0's, z 128;
# 8-bit GPTQ's) and 4-bit codes scaled weight by weight (GGUF Q4_0's, z 8: in planes
# without step sums, or in halves but for the one-token kernel's groups of 64). Q8_0's 8.5
# bits a weight and Q4_0's 4.5, their blocks' own, where codes and mins took 9 and 5, and
# no group's min loaded (on an H100, decode-1 of an 8B as Q8_0: 4.61 against 4.73 ms a
# token)
CENTRED_CODES = os.environ.get("PAGODA_CENTRED_CODES", "1") == "1"
# whether one-token calls of 8-bit integer codes a byte each (GGUF Q8_0, GPTQ-Int8, int8
# checkpoints) take the byte GEMV of triton_group_gemm (PAGODA_ONE_TOKEN_BYTES=0: the
# few-token kernel's tensor-core tile, padded from one token)
ONE_TOKEN_BYTES = os.environ.get("PAGODA_ONE_TOKEN_BYTES", "1") == "1"
# the largest zero point the planes kernel subtracts exactly: 128 plus it is a bfloat16 integer
MAX_ZERO_POINT = 128

# the fewest tokens of a call on planes that decodes the weights to 16 bits first and
# multiplies with cuBLAS (triton_plane_decode), by layout: (bits, groups of a whole step or
# not) -> tokens; PAGODA_DECODE_FROM=T sets T for every layout (0: never).
# On an H100, an 8B layer's four products in us, decoded first against the planes kernel,
# alternated in one call: 4-bit in groups of 128 (AWQ, GPTQ) 878 / 830 at 1024 tokens,
# 1524 / 1687 at 2048; groups of 32 (GGUF Q4_*) 598 / 547 at 512, 852 / 1042 at 1024; GGUF
# Q6_K's codes in byte planes 708 / 713 at 256, 813 / 958 at 512 (bf16 cuBLAS 212 at 256,
# 645 at 1024, 1273 at 2048). Byte planes in groups of 32 (Q5_*) were not timed: they take
# groups of 16's threshold.
DECODE_FROM = {(4, True): 1536, (4, False): 768, (8, True): 256, (8, False): 256}
# the workspace such a call decodes its weights into, a slice of outputs at a time, at most
# (on an H100 slices of 8, 16 and 32 MiB were slower than 64 at 256-2048 tokens)
DECODED_SLICE_BYTES = 64 << 20


def _decode_from_environment() -> int | None:
    given = os.environ.get("PAGODA_DECODE_FROM")
    if given is None or given == "":
        return None
    if not given.isdigit():
        raise ValueError(f"PAGODA_DECODE_FROM={given!r}: a number of tokens expected")
    return int(given)


DECODE_FROM_ALL = _decode_from_environment()


def fewest_tokens_decoded_first() -> int | None:
    """The fewest tokens of a call that decodes its weights first, over every layout, as
    PAGODA_DECODE_FROM leaves it; None: no call does."""
    if DECODE_FROM_ALL is not None:
        return DECODE_FROM_ALL or None
    return min(DECODE_FROM.values())


def integer_zero_points(scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor | None:
    """The zero points z (0..MAX_ZERO_POINT) with low == -z * scale, both as stored
    (SCALE_DTYPE), in every group; None if any min is not one."""
    scale, low = scale.to(SCALE_DTYPE).float(), low.to(SCALE_DTYPE).float()
    zeros = torch.where(scale != 0, -low / scale.where(scale != 0, 1.0), 0.0).round()
    if not ((zeros >= 0) & (zeros <= MAX_ZERO_POINT)).all():
        return None
    rebuilt = (-zeros * scale).to(SCALE_DTYPE).float()
    return zeros if torch.equal(rebuilt, low) else None


def supports(in_features: int, group_size: int, bits: int) -> bool:
    """Whether GroupQuantWeight holds this shape: 4-bit groups a multiple of HALF and inputs
    a multiple of CHUNK; 8-bit groups of 16 or a multiple of 32 dividing the inputs."""
    if in_features % group_size:
        return False
    if bits == 4:
        return group_size % HALF == 0 and in_features % CHUNK == 0
    return group_size == 16 or group_size % 32 == 0


def step_words(scale: torch.Tensor, low: torch.Tensor | None) -> torch.Tensor:
    """int32 words [groups, out]: the float16 scale's bits in the low half and the float16
    min's (or the uint8 zero point) in the high (none: 0), as the planes kernel reads a
    step's scale and min in one load."""
    words = scale.view(torch.int16).to(torch.int32) & 0xFFFF
    if low is not None:
        high = low.to(torch.int32) if low.dtype == torch.uint8 else low.view(torch.int16)
        words |= high.to(torch.int32) << 16
    return words


def scale_pairs(scale: torch.Tensor) -> torch.Tensor:
    """int32 words [groups / 2, out] from float16 scales [groups, out] (groups even): group 2 j's
    bits in the low half of word j, group 2 j + 1's in the high, as the planes kernel reads
    two planes' scales in one load."""
    halves = scale.view(torch.int16).to(torch.int32)
    return (halves[0::2] & 0xFFFF) | (halves[1::2] << 16)


def shared_zero_point(scale: torch.Tensor, low: torch.Tensor | None) -> int | None:
    """The integer z (0..MAX_ZERO_POINT) with low == -z * scale in every group, exactly as
    given (GGUF Q6_K's float32 products: 32, before either is rounded to a float16), or
    None."""
    if low is None or scale.numel() == 0:
        return None
    largest = scale.abs().argmax()
    if float(scale.reshape(-1)[largest]) == 0:
        return None
    zero = round(-float(low.reshape(-1)[largest]) / float(scale.reshape(-1)[largest]))
    if not 0 <= zero <= MAX_ZERO_POINT:
        return None
    return zero if torch.equal(low, -zero * scale) else None


def factored_words(factors: ScaleFactors) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A k-quant's factored scales ([out, groups] sub-scales and sub-mins, [out, supers]
    factors) as the planes kernel reads them: sub-words int32 [groups / 4, out], each
    holding four consecutive groups' int8 sub-scales (group 4 j + b in byte b), where the
    type has sub-mins their word after each ([groups / 2, out]: scales, mins, scales, ...);
    and factor words int32 [supers, out], the float16 scale factor's bits in the low half
    and the low factor's in the high. Whole int32 words, so the kernel loads them into the
    registers it reads them from (a 16-bit load is repacked, which waits for it). None
    where a factor is not a float16 (a low factor that is a multiple of a huge d) or the
    groups are not whole words."""
    halves = [f.to(torch.float16) for f in (factors.scale_factor, factors.low_factor)]
    if factors.sub_scale.shape[1] % 4 or not all(
            torch.equal(h.float(), f) for h, f in
            zip(halves, (factors.scale_factor, factors.low_factor))):
        return None
    subs = [factors.sub_scale] + ([] if factors.sub_low is None else [factors.sub_low])
    words = torch.stack([sub.to(torch.int8).contiguous().view(torch.int32).t()
                         for sub in subs], dim=1)
    return (words.reshape(-1, words.shape[-1]).contiguous(),
            step_words(*(h.t() for h in halves)).contiguous())


def _factored_products(sub_words: torch.Tensor, factor_words: torch.Tensor,
                       groups_per_super: int, with_lows: bool
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """factored_words' scales and mins multiplied out, float32 [groups, out] (exact)."""
    bytes_ = sub_words.reshape(-1, 1 + with_lows, sub_words.shape[-1]).transpose(0, 2)
    bytes_ = bytes_.contiguous().view(torch.int8).float()  # [out, 1 or 2, groups]
    sub_scale, sub_low = bytes_[:, 0].t(), bytes_[:, -1].t()
    low_half = ((factor_words & 0xFFFF) ^ 0x8000) - 0x8000
    factors = [half.to(torch.int16).view(SCALE_DTYPE).float()
               .repeat_interleave(groups_per_super, dim=0)
               for half in (low_half, factor_words >> 16)]
    return ((sub_scale * factors[0]).contiguous(), (sub_low * factors[1]).contiguous())


def _low_halves(words: torch.Tensor) -> torch.Tensor:
    """The float16s in the low halves of int32 words."""
    signed = ((words & 0xFFFF) ^ 0x8000) - 0x8000
    return signed.to(torch.int16).view(SCALE_DTYPE)


class GroupQuantWeight(nn.Module):
    """One linear layer's weights as codes with a scale (and a min) per group of inputs;
    `__call__(x)` is x W^T, W[o, i] = code[o, i] * scale[o, i // group] + low[o, i // group].
    With `zero_points`, planes hold mins that are integer zero points (low = -zero * scale:
    AWQ, GPTQ, compressed-tensors, GGUF Q4_0) as `zeros` instead (`low` None): W[o, i] =
    (code[o, i] - zero[o, i // group]) * scale[o, i // group], and the kernel scales its
    sums rather than each weight (see triton_group_gemm._planes_kernel). Planes in groups of
    whole steps hold scales and mins (or zero points) packed as `step_words` instead of the
    three tensors; byte planes in groups of 16 whose zero points are all one integer
    (`shared_zero`) only their scales, two groups' to a word (`scale_pairs`), and bytes a
    code and 4-bit codes scaled weight by weight whose zero points are all one power of two
    no mins (`shared_zero`); and planes of a GGUF k-quant its sub-scales and factors
    (`factored_words`: `sub_words` and `factor_words`, with PAGODA_PLANE_FACTORED_SCALES=1);
    `scales_and_mins()` reads them whichever way."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor | None,
                 group_size: int, bits: int, planes: bool | None = None,
                 zero_points: bool | None = None, step_sums: bool | None = None,
                 factors: ScaleFactors | None = None) -> None:
        """`codes` [out, in]: integers (bits 4 or 8) or float8 values (bits 8); `scale`,
        `low` [out, in / group_size] (low None: no min). `planes`: 4-bit codes in planes
        (default: where `takes_planes`), else in halves; 8-bit integer codes in byte planes
        (default: BYTE_PLANES where `takes_byte_planes`), else a byte each. `zero_points`:
        planes hold the mins as integer zero points where every one is (default
        ZERO_POINTS_IN_PLANES).
        `step_sums`: planes hold each group's scale and min (or zero point) as one word an
        output, `step_words`, in place of `scale`, `low` and `zeros`, and the kernel scales
        sums with them (default STEP_SUMS_IN_PLANES in groups of whole steps, in byte planes
        and with factors, else off); with them, byte planes in groups of 16 whose mins are
        all -z times the scale for one integer z hold `scale_pairs` and `shared_zero` z
        instead (SCALE_PAIRS_IN_PLANES); bytes a code and 4-bit codes scaled weight by weight
        whose mins are all -z times the scale, z a power of two, hold no mins, `shared_zero`
        z (CENTRED_CODES). `factors`: a GGUF k-quant's `scale` and `low` as its blocks store
        them, which planes hold so (`factored_words`, in place of the words; with
        PAGODA_PLANE_FACTORED_SCALES=1)."""
        super().__init__()
        out_features, in_features = codes.shape
        if not supports(in_features, group_size, bits):
            raise ValueError(f"{bits}-bit groups of {group_size} over {in_features} inputs "
                             "are not a supported layout")
        self.out_features, self.in_features = out_features, in_features
        self.group_size, self.bits = group_size, bits
        if bits == 4:
            fits = takes_planes(in_features, group_size, bits)
        else:
            fits = (planes or (planes is None and BYTE_PLANES)) \
                and takes_byte_planes(codes, group_size)
        if planes and not fits:
            past = "" if bits == 4 else f" (or codes past {MAX_BYTE_PLANE_CODE})"
            raise ValueError(f"{bits}-bit groups of {group_size} over {in_features} inputs"
                             f"{past} do not fit planes")
        self.planes = fits if planes is None else planes
        if self.planes:
            stored = pack_int4_planes(codes) if bits == 4 else pack_byte_planes(codes)
        elif bits == 4:
            stored = pack_int4_halves(codes)
        elif codes.dtype == FP8:  # as checkpoints hold them, the layout torch._scaled_mm takes
            stored = codes.contiguous()
        else:
            stored = codes.to(torch.uint8).t().contiguous()
        self.codes = nn.Parameter(stored, requires_grad=False)
        factored = self._hold_factored(factors)
        self.step_sums = self.planes and (self._default_step_sums() if step_sums is None
                                          else step_sums)
        if not factored:
            self._hold_scales(scale, low, codes.dtype == FP8,
                              ZERO_POINTS_IN_PLANES if zero_points is None else zero_points)

    @property
    def plane_rows(self) -> int:
        """Inputs a plane of its planes: PLANE_ROWS (nibbles) or BYTE_PLANE_ROWS (bytes)."""
        return PLANE_ROWS if self.bits == 4 else BYTE_PLANE_ROWS

    @property
    def plane_step(self) -> int:
        """Inputs a step of its planes: PLANE_STEP (nibbles) or BYTE_PLANE_STEP (bytes)."""
        return PLANE_STEP if self.bits == 4 else BYTE_PLANE_STEP

    @property
    def groups_of_whole_steps(self) -> bool:
        """Whether each group of its planes is a whole number of steps (a scale a step)."""
        return self.group_size % self.plane_step == 0

    def _default_step_sums(self) -> bool:
        """On where the words' scales multiply sums: in byte planes, groups of whole steps,
        and factored scales (multiplied out weight by weight they took 1.7-2x the loop's
        instructions at one token, `bench/kernels/sass_census.py --weight-by-weight
        --factored 2`)."""
        return STEP_SUMS_IN_PLANES and (self.bits == 8 or self.group_size % PLANE_STEP == 0
                                        or bool(self.factored))

    def _hold_factored(self, factors: ScaleFactors | None) -> bool:
        """Hold a k-quant's scales and mins as `factored_words` (`sub_words`,
        `factor_words`; `factored` 1, or 2 where it has sub-mins), where its planes take
        them; whether they are held so."""
        words = (factored_words(factors)
                 if factors is not None and self.planes and FACTORED_SCALES_IN_PLANES
                 else None)
        self.sub_words = self.factor_words = None
        self.factored = 0
        if words is None:
            return False
        self.sub_words, self.factor_words = (nn.Parameter(held, requires_grad=False)
                                             for held in words)
        self.factored = 1 if factors.sub_low is None else 2
        self.holds_zero_points, self.holds_mins = False, True
        self.scale = self.low = self.zeros = self.step_words = self.scale_pairs = None
        self.shared_zero = None
        return True

    @property
    def groups_per_super(self) -> int:
        """Groups a super-block of its factored scales (0: not factored)."""
        if not self.factored:
            return 0
        return self.in_features // self.group_size // self.factor_words.shape[0]

    @property
    def _pairs_scales(self) -> bool:
        """Whether a zero point all its groups share holds its scales in pairs
        (SCALE_PAIRS_IN_PLANES: byte planes of a group a plane with scaled sums)."""
        return (SCALE_PAIRS_IN_PLANES and self.planes and self.step_sums and self.bits == 8
                and self.group_size == BYTE_PLANE_ROWS)

    def _shared_zero(self, scale: torch.Tensor, low: torch.Tensor | None, float8: bool,
                     zero_points: bool) -> int | None:
        """The zero point every group shares, where its layout takes one: any with scale
        pairs; a power of two (CENTRED_CODES) in bytes a code, and in 4-bit codes scaled
        weight by weight (planes without step sums, halves but for the one-token kernel's)
        unless integer zero points are asked for; else None."""
        centred = CENTRED_CODES and not float8 and not zero_points and (
            (self.bits == 8 and not self.planes)
            or (self.bits == 4 and not self.step_sums and not self.has_one_token_kernel))
        if not (self._pairs_scales or centred):
            return None
        shared = shared_zero_point(scale, low)
        if shared is None or self._pairs_scales:
            return shared
        return shared if shared > 0 and shared & (shared - 1) == 0 else None

    def _hold_scales(self, scale: torch.Tensor, low: torch.Tensor | None, float8: bool,
                     zero_points: bool) -> None:
        """Set `scale`, `low` and `zeros` ([groups, out]; None where not held) or, in their
        place, `step_words` or `scale_pairs`; `shared_zero` (then no `low`); and
        `holds_mins` and `holds_zero_points`."""
        self.shared_zero = self._shared_zero(scale, low, float8, zero_points)
        zeros = (integer_zero_points(scale, low) if zero_points and self.planes
                 and low is not None and self.shared_zero is None else None)
        if zeros is not None or self.shared_zero is not None:
            low = None
        pairs = self.shared_zero is not None and self._pairs_scales
        self.holds_zero_points = zeros is not None or pairs
        self.holds_mins = low is not None
        scale = scale.t().to(torch.float32 if float8 else SCALE_DTYPE).contiguous()
        zeros = None if zeros is None else zeros.t().to(torch.uint8).contiguous()
        low = None if low is None else low.t().to(SCALE_DTYPE).contiguous()
        held = {"scale": scale, "low": low, "zeros": zeros, "step_words": None,
                "scale_pairs": None}
        if pairs:
            held = {**dict.fromkeys(held), "scale_pairs": scale_pairs(scale)}
        elif self.step_sums:
            held = {**dict.fromkeys(held),
                    "step_words": step_words(scale, zeros if zeros is not None else low)}
        for name, tensor in held.items():
            setattr(self, name, None if tensor is None
                    else nn.Parameter(tensor, requires_grad=False))

    def scales_and_mins(self, outputs: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The scales, mins and zero points as held ([groups, out]; None where there are
        none), unpacked from `step_words` or `scale_pairs` where they are held so (the shared
        zero point a group's; multiplied out in float32 where they are held factored); of
        the outputs at index `outputs` only ([groups, len(outputs)]) where given."""
        if self.factored:
            factored = (self.sub_words, self.factor_words)
            if outputs is not None:
                factored = tuple(t.index_select(1, outputs) for t in factored)
            return (*_factored_products(*factored, self.groups_per_super, self.factored == 2),
                    None)
        held = (self.scale, self.low, self.zeros, self.step_words, self.scale_pairs)
        if outputs is not None:
            held = tuple(None if t is None else t.index_select(1, outputs) for t in held)
        scale, low, zeros, words, pairs = held
        if pairs is not None:
            scale = _low_halves(torch.stack([pairs, pairs >> 16], dim=1).flatten(0, 1))
        if self.shared_zero is not None:
            return scale, None, torch.full(scale.shape, self.shared_zero, dtype=torch.uint8,
                                           device=scale.device)
        if words is None:
            return scale, low, zeros
        scale = _low_halves(words)
        high = words >> 16
        if self.holds_zero_points:
            return scale, None, high.to(torch.uint8)
        low = high.to(torch.int16).view(SCALE_DTYPE) if self.holds_mins else None
        return scale, low, None

    @property
    def decoded_from(self) -> int | None:
        """The fewest tokens of a call on CUDA that decodes the weights to 16 bits and
        multiplies with cuBLAS (DECODE_FROM by layout, or PAGODA_DECODE_FROM); None: no
        call does (codes not in planes, or PAGODA_DECODE_FROM=0)."""
        if not self.planes:
            return None
        if DECODE_FROM_ALL is not None:
            return DECODE_FROM_ALL or None
        return DECODE_FROM[(self.bits, self.groups_of_whole_steps)]

    @property
    def has_one_token_kernel(self) -> bool:
        """Whether one-token calls on CUDA take a GEMV of `triton_group_gemm`: outputs a
        multiple of 4, and 4-bit codes in halves in groups of a multiple of CHUNK inputs (a
        chunk's two halves in one group), or 8-bit integer codes a byte each
        (ONE_TOKEN_BYTES)."""
        if self.planes or self.out_features % 4:
            return False
        if self.bits == 4:
            return self.group_size % CHUNK == 0
        return ONE_TOKEN_BYTES and self.codes.dtype != FP8

    def kernel_name(self) -> str:
        """What multiplies it on CUDA, for the startup log."""
        if self.codes.dtype == FP8:
            return "triton group gemm (fp8 weights)"
        other_paths = "; one token: a CUDA-core GEMV" if self.has_one_token_kernel else ""
        planes = (" in planes" if self.bits == 4 else " in byte planes") if self.planes else ""
        if self.shared_zero is not None:
            planes += f" with one zero point ({self.shared_zero})"
        elif self.holds_zero_points:
            planes += " with zero points"
        if self.factored:
            planes += " with factored scales"
        if self.decoded_from is not None:
            other_paths += f"; from {self.decoded_from} tokens: decoded to 16 bits for cuBLAS"
        return (f"triton group gemm ({self.bits}-bit codes{planes}, groups of "
                f"{self.group_size}{other_paths})")

    def codes_by_input(self) -> torch.Tensor:
        """The codes as a [in, out] view (4 bits: [in / 2, out] in halves, [in / 4, out] in
        planes)."""
        return self.codes.t() if self.codes.dtype == FP8 else self.codes

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The weights as a dense [out, in] tensor of `dtype`."""
        return self._decoded(self.codes_by_input(), *self.scales_and_mins()).to(dtype)

    def rows(self, index: torch.Tensor, scale: float | None = None,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Weight rows `index` (each in [0, out_features)) as [len(index), in] of `dtype` (a
        table's lookup: only those outputs' codes and scales are read), decoded in float32
        and times `scale` where given; on CUDA in one launch where the kernel takes the
        layout (triton_rows)."""
        if index.is_cuda:
            from pagoda.layers.quantization.triton_rows import looked_up_rows, takes_rows
            if takes_rows(self):
                return looked_up_rows(self, index, scale, dtype)
        outputs = index.reshape(-1)
        by_input = self.codes_by_input().index_select(1, outputs)
        weights = self._decoded(by_input, *self.scales_and_mins(outputs))
        return (weights if scale is None else weights * scale).to(dtype)

    def _decoded(self, by_input: torch.Tensor, scale: torch.Tensor, low: torch.Tensor | None,
                 zeros: torch.Tensor | None) -> torch.Tensor:
        """Codes held by input (`codes_by_input()`, or some of its outputs' columns) and their
        outputs' scales, mins and zero points ([groups, n]) as float32 weights [n, in]."""
        if self.planes:
            codes = (unpack_int4_planes(by_input) if self.bits == 4
                     else unpack_byte_planes(by_input))
        elif self.bits == 4:
            codes = unpack_int4_halves(by_input)
        else:
            codes = by_input.t()
        groups = codes.float().reshape(codes.shape[0], -1, self.group_size)
        if zeros is not None:
            groups = groups - zeros.t().float().unsqueeze(-1)
        weight = groups * scale.t().float().unsqueeze(-1)
        if low is not None:
            weight = weight + low.t().float().unsqueeze(-1)
        return weight.reshape(codes.shape[0], self.in_features)

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x W^T; out: where to write it ([rows, out], rows possibly further apart than
        their width: see triton_group_gemm.group_gemm), returned."""
        if x.is_cuda:
            from pagoda.layers.quantization.triton_group_gemm import group_gemm
            return group_gemm(x, self, out=out)
        y = F.linear(x, self.dequantize(x.dtype))
        return y if out is None else out.copy_(y.reshape(out.shape))

    def then_norm(self, x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                  eps: float) -> tuple[NormedRows, torch.Tensor] | None:
        """The RMSNorm (weight, eps) of x W^T plus `residual` left for the next product to
        finish, and the new residual, from the product's last step where a CUDA kernel
        takes the call (few tokens); else None."""
        if not (x.is_cuda and self.finishes_norm(x.numel() // self.in_features)):
            return None
        from pagoda.layers.quantization.triton_group_gemm import group_gemm_then_norm
        values, new_residual, squares = group_gemm_then_norm(x, self, residual, norm_weight)
        return NormedRows(values, squares, eps), new_residual

    def finishes_norm(self, tokens: int) -> bool:
        """Whether a call of `tokens` norms its outputs for the next product (then_norm) or
        finishes the norm of its inputs (normed) in a CUDA kernel."""
        if not self.codes.is_cuda:
            return False
        from pagoda.layers.quantization.triton_group_gemm import takes_norm
        return takes_norm(tokens, self)

    def normed(self, rows: NormedRows, activation: nn.Module | None = None
               ) -> torch.Tensor | None:
        """rows (finished: divided by their rms) W^T, with `activation` (a gated one)
        activation of it, where `finishes_norm` and the kernels know the activation; else
        None."""
        kind = getattr(activation, "kernel_kind", 0)
        tokens = rows.values.numel() // self.in_features
        if (activation is not None and not kind) or not self.finishes_norm(tokens):
            return None
        from pagoda.layers.quantization.triton_group_gemm import group_gemm, takes_gated
        if kind and not takes_gated(tokens, self):
            return None
        return group_gemm(rows.values, self, kind, normed=rows.squares, norm_eps=rows.eps)

    def gated(self, x: torch.Tensor, activation: nn.Module,
              bias: torch.Tensor | None = None) -> torch.Tensor | None:
        """activation(x W^T) for outputs of [gate | up] halves, computed by the product's
        last step where a CUDA kernel takes the call (few tokens, an activation the kernels
        know, no bias); else None."""
        kind = getattr(activation, "kernel_kind", 0)
        if not (x.is_cuda and kind) or bias is not None:
            return None
        from pagoda.layers.quantization.triton_group_gemm import group_gemm, takes_gated
        if not takes_gated(x.numel() // self.in_features, self):
            return None
        return group_gemm(x, self, kind)
