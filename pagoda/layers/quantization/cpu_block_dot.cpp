// Products of weights held as 4-, 6- or 8-bit codes (a scale and a low per group of 16
// inputs or a multiple of 32) with activations quantized to int8 per block of 32 inputs, on
// AVX-512 VNNI CPUs (vpdpbusd), or built for AVX2 (vpmaddubsw + vpmaddwd; 8-bit codes less
// 128 as a magnitude and a sign, so no pair saturates): one integer dot product per block
// (per half block in groups of 16), scaled by the block's activation scale and the weights'
// group scale, plus the group's low times its inputs' quantized activation sum. In one pass
// this is llama.cpp's arithmetic for its quantized types; a second pass adds int8 codes of
// what the first codes miss, at 1/256 of the first scale (the activations to ~2^-16 of each
// block's largest), in the same sweep over the weights: its products join the first's,
// shifted by 8 bits, as integers.
//
// Weights are laid out in tiles of 16 outputs: for tile t and block b, 4-bit codes take 256
// bytes (four 64-byte rows; in row l, byte 4j+i holds output j's inputs 8l+i in its low
// nibble and 8l+4+i in its high nibble), 8-bit codes 512 bytes (eight rows; in row q, byte
// 4j+i holds output j's input 4q+i), 6-bit codes 384 bytes (their low nibbles laid out as
// 4-bit codes, then two rows of their high bit pairs: in row h, bits 2s and 2s+1 of byte
// 4j+i are those of output j's input 4(4h+s)+i). Scales and lows are [tiles][groups][16]
// float32s, or float16s where those hold them exactly (GGUF's legacy types: fewer bytes to
// stream), or factored as GGUF's k-quants store them (fewer bytes still): int8 sub-scales
// and sub-lows [tiles][groups][16] times float32 factors [tiles][superblocks][2][16] (a
// superblock's scale factor, then its low factor), a superblock 2^shift groups; each product
// is exact in float32, so the factored scales are the plain ones to the bit.
//
// Built by pagoda at first use (cpu_block_dot.py) with g++ and OpenMP, once with AVX-512
// VNNI flags and once with AVX2 and F16C ones: the 16-lane vectors below are one zmm register
// or two ymm registers.

#include <immintrin.h>
#include <stdint.h>

#include <cmath>
#include <type_traits>
#include <utility>
#include <vector>

#include "../cpu_math.h"

namespace {

constexpr int64_t kBlock = 32;    // inputs per activation block
constexpr int64_t kLanes = 16;    // outputs per tile
constexpr int kRows = 8;          // activation rows per sweep over a tile
constexpr int kSecondShift = 8;   // the first pass's scale is the second's times 2^8
constexpr size_t kKeptScratch = 1 << 20;  // activation codes a thread keeps between calls
constexpr int64_t kPrefetchBlocks = 8;    // how far ahead a sweep asks for codes

#if defined(__AVX512F__)

using Ints = __m512i;    // 16 int32 lanes (or 64 bytes)
using Floats = __m512;   // 16 float lanes

inline Ints zero_ints() { return _mm512_setzero_si512(); }
inline Ints load_bytes(const uint8_t* at) { return _mm512_loadu_si512(at); }
inline Ints low_nibbles(Ints v) { return _mm512_and_si512(v, _mm512_set1_epi8(0x0F)); }
inline Ints high_nibbles(Ints v) { return low_nibbles(_mm512_srli_epi16(v, 4)); }
// `low` with each byte's bits 2S and 2S+1 of `pairs` as its bits 4 and 5 (a 6-bit code's
// high pair): a shift (none for S = 2) and one ternary-logic op, low | (moved & 0x30)
template <int S>
inline Ints with_high_pair(Ints low, Ints pairs) {
  const Ints moved = S == 3 ? _mm512_srli_epi16(pairs, 2)
                     : S == 2 ? pairs : _mm512_slli_epi16(pairs, 4 - 2 * S);
  return _mm512_ternarylogic_epi32(low, moved, _mm512_set1_epi8(0x30), 0xF8);
}
inline Ints shift_left(Ints v, int bits) { return _mm512_slli_epi32(v, bits); }
inline Ints add(Ints a, Ints b) { return _mm512_add_epi32(a, b); }
inline Floats to_floats(Ints v) { return _mm512_cvtepi32_ps(v); }
inline Floats load_floats(const float* at) { return _mm512_loadu_ps(at); }
inline Floats load_floats(const uint16_t* at) {  // float16s
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(at)));
}
inline Floats load_floats(const int8_t* at) {  // small integers
  return _mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at))));
}
inline void store_floats(float* at, Floats v) { _mm512_storeu_ps(at, v); }
inline Floats zero_floats() { return _mm512_setzero_ps(); }
inline Floats broadcast(float value) { return _mm512_set1_ps(value); }
inline Floats mul(Floats a, Floats b) { return _mm512_mul_ps(a, b); }
inline Floats fmadd(Floats a, Floats b, Floats c) { return _mm512_fmadd_ps(a, b, c); }

// acc + per lane, the sum of 4 products of `codes`' bytes (unsigned) with `x`'s 4 bytes.
template <int BITS>
inline Ints dot_add(Ints acc, Ints codes, int32_t x) {
  return _mm512_dpbusd_epi32(acc, codes, _mm512_set1_epi32(x));
}

// 8-bit codes go into vpdpbusd as they are (no pair to saturate): nothing to prepare, nothing
// to add back
inline Ints byte_codes(Ints codes) { return codes; }
inline void add_byte_code_offset(const int8_t*, Ints*, Ints*) {}

#else  // AVX2: each 16-lane vector is two ymm registers

struct Ints {
  __m256i lo, hi;
};
struct Floats {
  __m256 lo, hi;
};

inline Ints zero_ints() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
inline Ints load_bytes(const uint8_t* at) {
  return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(at)),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at + 32))};
}
inline Ints low_nibbles(Ints v) {
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  return {_mm256_and_si256(v.lo, nibble), _mm256_and_si256(v.hi, nibble)};
}
inline Ints high_nibbles(Ints v) {
  return low_nibbles({_mm256_srli_epi16(v.lo, 4), _mm256_srli_epi16(v.hi, 4)});
}
// `low` with each byte's bits 2S and 2S+1 of `pairs` as its bits 4 and 5 (a 6-bit code's
// high pair)
template <int S>
inline __m256i with_high_pair(__m256i low, __m256i pairs) {
  const __m256i moved = S == 3 ? _mm256_srli_epi16(pairs, 2)
                        : S == 2 ? pairs : _mm256_slli_epi16(pairs, 4 - 2 * S);
  return _mm256_or_si256(low, _mm256_and_si256(moved, _mm256_set1_epi8(0x30)));
}
template <int S>
inline Ints with_high_pair(Ints low, Ints pairs) {
  return {with_high_pair<S>(low.lo, pairs.lo), with_high_pair<S>(low.hi, pairs.hi)};
}
inline Ints shift_left(Ints v, int bits) {
  return {_mm256_slli_epi32(v.lo, bits), _mm256_slli_epi32(v.hi, bits)};
}
inline Ints add(Ints a, Ints b) {
  return {_mm256_add_epi32(a.lo, b.lo), _mm256_add_epi32(a.hi, b.hi)};
}
inline Floats to_floats(Ints v) { return {_mm256_cvtepi32_ps(v.lo), _mm256_cvtepi32_ps(v.hi)}; }
inline Floats load_floats(const float* at) {
  return {_mm256_loadu_ps(at), _mm256_loadu_ps(at + 8)};
}
inline Floats load_floats(const uint16_t* at) {  // float16s
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at))),
          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at + 8)))};
}
inline Floats load_floats(const int8_t* at) {  // small integers
  return {_mm256_cvtepi32_ps(
              _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(at)))),
          _mm256_cvtepi32_ps(
              _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(at + 8))))};
}
inline void store_floats(float* at, Floats v) {
  _mm256_storeu_ps(at, v.lo);
  _mm256_storeu_ps(at + 8, v.hi);
}
inline Floats zero_floats() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline Floats broadcast(float value) { return {_mm256_set1_ps(value), _mm256_set1_ps(value)}; }
inline Floats mul(Floats a, Floats b) {
  return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)};
}
inline Floats fmadd(Floats a, Floats b, Floats c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}

// The sums of 4 products of bytes 0..63 (unsigned) with x's 4 signed bytes, per int32 lane
// (a pair of products stays within int16).
inline __m256i small_dots(__m256i codes, __m256i x) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(codes, x), _mm256_set1_epi16(1));
}

// The sums of 4 products of signed bytes w (8-bit codes less 128: byte_codes) with x's 4
// signed bytes, per int32 lane: |w| (unsigned, at most 128) times x with w's sign, which no
// x of this build overflows (activation codes within +-127: quantize_row), a pair within
// int16.
inline __m256i signed_dots(__m256i w, __m256i x) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w)),
                           _mm256_set1_epi16(1));
}

// acc + per lane, the sum of 4 products of `codes`' bytes (unsigned) with `x`'s 4 bytes;
// 8-bit codes come less 128 (byte_codes: 255 * 128 twice would saturate int16), and
// add_byte_code_offset adds 128 times the activations' sum back.
template <int BITS>
inline Ints dot_add(Ints acc, Ints codes, int32_t x) {
  const __m256i xs = _mm256_set1_epi32(x);
  if constexpr (BITS <= 6) {
    return add(acc, {small_dots(codes.lo, xs), small_dots(codes.hi, xs)});
  } else {
    return add(acc, {signed_dots(codes.lo, xs), signed_dots(codes.hi, xs)});
  }
}

// 8-bit codes less 128, as signed_dots takes them (once a block, for every row)
inline Ints byte_codes(Ints codes) {
  const __m256i bias = _mm256_set1_epi8(static_cast<char>(0x80));
  return {_mm256_xor_si256(codes.lo, bias), _mm256_xor_si256(codes.hi, bias)};
}

// The sum of 16 int8s, in every lane.
inline Ints sum_of_16(const int8_t* at) {
  const __m128i biased = _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at)),
                                       _mm_set1_epi8(static_cast<char>(0x80)));
  const __m128i halves = _mm_sad_epu8(biased, _mm_setzero_si128());  // two sums of x + 128
  const int32_t sum = _mm_cvtsi128_si32(halves) + _mm_extract_epi16(halves, 4) - 16 * 128;
  return {_mm256_set1_epi32(sum), _mm256_set1_epi32(sum)};
}

// The 128 each byte code was taken less, times the 32 activations, added back to the sums
// of their halves.
inline void add_byte_code_offset(const int8_t* activations, Ints* first, Ints* second) {
  *first = add(*first, shift_left(sum_of_16(activations), 7));
  *second = add(*second, shift_left(sum_of_16(activations + 16), 7));
}

#endif

// The eight [16 outputs x 4 inputs] code vectors of one tile's block.
template <int BITS>
inline void load_codes(const uint8_t* block, Ints codes[8]) {
  if constexpr (BITS == 4 || BITS == 6) {
    for (int row = 0; row < 4; ++row) {
      const Ints packed = load_bytes(block + 64 * row);
      codes[2 * row] = low_nibbles(packed);
      codes[2 * row + 1] = high_nibbles(packed);
    }
    if constexpr (BITS == 6) {
      for (int row = 0; row < 2; ++row) {
        const Ints pairs = load_bytes(block + 256 + 64 * row);
        Ints* four = codes + 4 * row;
        four[0] = with_high_pair<0>(four[0], pairs);
        four[1] = with_high_pair<1>(four[1], pairs);
        four[2] = with_high_pair<2>(four[2], pairs);
        four[3] = with_high_pair<3>(four[3], pairs);
      }
    }
  } else {
    for (int row = 0; row < 8; ++row) codes[row] = byte_codes(load_bytes(block + 64 * row));
  }
}

// Adds the products of one block's codes with one row's 32 activation codes to `first`
// (inputs 0..15) and `second` (inputs 16..31): two independent chains.
template <int BITS>
inline void add_block_products(const Ints codes[8], const int8_t* activations, Ints* first,
                               Ints* second) {
  const int32_t* x = reinterpret_cast<const int32_t*>(activations);
  for (int q = 0; q < 4; ++q) {
    *first = dot_add<BITS>(*first, codes[q], x[q]);
    *second = dot_add<BITS>(*second, codes[q + 4], x[q + 4]);
  }
  if constexpr (BITS == 8) add_byte_code_offset(activations, first, second);
}

// A layer's scales and lows as float32s or float16s ([tiles][groups][16] each).
template <typename Scale>
struct PlainScales {
  const Scale* scale;
  const Scale* low;
  int64_t groups;  // a tile's

  PlainScales tile(int64_t t) const {
    return {scale + t * groups * kLanes, low + t * groups * kLanes, groups};
  }
  Floats scale_of(int64_t group) const { return load_floats(scale + group * kLanes); }
  Floats low_of(int64_t group) const { return load_floats(low + group * kLanes); }
};

// A layer's scales and lows factored: int8 sub-scales and sub-lows ([tiles][groups][16]
// each; one array may serve both) times float32 factors ([tiles][supers][2][16]), 2^shift
// groups a superblock.
struct FactoredScales {
  const int8_t* scale;
  const int8_t* low;
  const float* factors;
  int64_t groups;  // a tile's
  int shift;

  FactoredScales tile(int64_t t) const {
    const int64_t supers = groups >> shift;
    return {scale + t * groups * kLanes, low + t * groups * kLanes,
            factors + t * supers * 2 * kLanes, groups, shift};
  }
  Floats scale_of(int64_t group) const {
    return mul(load_floats(scale + group * kLanes),
               load_floats(factors + (group >> shift) * 2 * kLanes));
  }
  Floats low_of(int64_t group) const {
    return mul(load_floats(low + group * kLanes),
               load_floats(factors + ((group >> shift) * 2 + 1) * kLanes));
  }
};

// out[r][0..16) = activation rows r < R times one tile's 16 outputs. xq: PASSES planes of
// [rows, cols] codes (plane stride pass_stride); xscale: each block's scale (of the last
// pass's codes); xsum: each half block's activation sum. HALVES: groups of 16 inputs (two a
// block), else of group_blocks blocks. Scales: the tile's (PlainScales, FactoredScales).
template <int R, int BITS, int PASSES, bool HALVES, typename Scales>
void tile_product(const int8_t* xq, int64_t pass_stride, const float* xscale,
                  const float* xsum, int64_t cols, const uint8_t* tile, const Scales& scales,
                  int64_t group_blocks, float* out, int64_t out_stride) {
  const int64_t blocks = cols / kBlock;
  constexpr int64_t block_bytes = BITS * kBlock * kLanes / 8;
  Floats acc[R];
  for (int r = 0; r < R; ++r) acc[r] = zero_floats();
  int64_t whole_group = 0, blocks_into_group = 0;  // counted, not divided: a division is slow
  for (int64_t b = 0; b < blocks; ++b) {
    // codes a few blocks on (the next tile's past the end): a layer larger than the caches
    // (an LM head) streams from memory faster than the hardware's prefetchers fetch it
    for (int64_t line = 0; line < block_bytes; line += 64)
      __builtin_prefetch(tile + (b + kPrefetchBlocks) * block_bytes + line);
    Ints codes[8];
    load_codes<BITS>(tile + b * block_bytes, codes);
    const int64_t group = HALVES ? 2 * b : whole_group;
    if (++blocks_into_group == group_blocks) {
      blocks_into_group = 0;
      ++whole_group;
    }
    const Floats scale0 = scales.scale_of(group);
    const Floats low0 = scales.low_of(group);
    for (int r = 0; r < R; ++r) {
      const int8_t* x = xq + r * cols + b * kBlock;
      Ints first = zero_ints(), second = zero_ints();
      add_block_products<BITS>(codes, x, &first, &second);
      if constexpr (PASSES == 2) {  // in units of the second pass's scale; its own chains
        Ints finer_first = zero_ints(), finer_second = zero_ints();
        add_block_products<BITS>(codes, x + pass_stride, &finer_first, &finer_second);
        first = add(shift_left(first, kSecondShift), finer_first);
        second = add(shift_left(second, kSecondShift), finer_second);
      }
      const int64_t at = r * blocks + b;
      const Floats activation_scale = broadcast(xscale[at]);
      const float sum0 = xsum[2 * at], sum1 = xsum[2 * at + 1];
      if constexpr (HALVES) {  // the halves' products, each with its group's scale and low
        const Floats scale1 = scales.scale_of(group + 1);
        const Floats low1 = scales.low_of(group + 1);
        acc[r] = fmadd(to_floats(first), mul(scale0, activation_scale), acc[r]);
        acc[r] = fmadd(to_floats(second), mul(scale1, activation_scale), acc[r]);
        acc[r] = fmadd(low0, broadcast(sum0), acc[r]);
        acc[r] = fmadd(low1, broadcast(sum1), acc[r]);
      } else {
        acc[r] = fmadd(to_floats(add(first, second)), mul(scale0, activation_scale), acc[r]);
        acc[r] = fmadd(low0, broadcast(sum0 + sum1), acc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) store_floats(out + r * out_stride, acc[r]);
}

template <typename Scales>
using TileProduct = void (*)(const int8_t*, int64_t, const float*, const float*, int64_t,
                             const uint8_t*, const Scales&, int64_t, float*, int64_t);

template <int BITS, int PASSES, bool HALVES, typename Scales, int... R>
TileProduct<Scales> tile_product_of(int rows, std::integer_sequence<int, R...>) {
  static constexpr TileProduct<Scales> table[] = {
      tile_product<R + 1, BITS, PASSES, HALVES, Scales>...};
  return table[rows - 1];
}

// tile_product for `rows` activation rows, rows in 1..kRows
template <int BITS, int PASSES, bool HALVES, typename Scales>
TileProduct<Scales> tile_product_for(int rows) {
  return tile_product_of<BITS, PASSES, HALVES, Scales>(
      rows, std::make_integer_sequence<int, kRows>{});
}

#if defined(__AVX512F__)

// Values to int8 codes at `inverse` = 1 / their scale (rounded to nearest even, saturated).
inline __m512i to_codes(__m512 values, __m512 inverse, int8_t* codes) {
  const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(values, inverse));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(codes), _mm512_cvtsepi32_epi8(q));
  return _mm512_max_epi32(_mm512_min_epi32(q, _mm512_set1_epi32(127)),
                          _mm512_set1_epi32(-128));  // the stored codes' saturation
}
// One row's blocks to codes: step = max |x| / 127, codes = x / step; with two passes,
// codes of what those miss at step / 256 into the plane pass_stride bytes on. scale = the
// last pass's step; sum[0..2) = each half block's activations as the codes stand for them.
void quantize_row(const float* x, int64_t cols, int passes, int64_t pass_stride,
                  int8_t* codes, float* scale, float* sum) {
  for (int64_t b = 0; b < cols / kBlock; ++b) {
    const __m512 lo = _mm512_loadu_ps(x + b * kBlock);
    const __m512 hi = _mm512_loadu_ps(x + b * kBlock + kLanes);
    const float amax =
        _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    const float step = amax / 127.0f;
    const float inverse = step > 0.0f ? 1.0f / step : 0.0f;
    int8_t* block = codes + b * kBlock;
    const __m512i qlo = to_codes(lo, _mm512_set1_ps(inverse), block);
    const __m512i qhi = to_codes(hi, _mm512_set1_ps(inverse), block + kLanes);
    float sum_lo = static_cast<float>(_mm512_reduce_add_epi32(qlo));
    float sum_hi = static_cast<float>(_mm512_reduce_add_epi32(qhi));
    float last_step = step;
    if (passes == 2) {
      const __m512 whole = _mm512_set1_ps(step);
      const __m512 rest_lo = _mm512_sub_ps(lo, _mm512_mul_ps(_mm512_cvtepi32_ps(qlo), whole));
      const __m512 rest_hi = _mm512_sub_ps(hi, _mm512_mul_ps(_mm512_cvtepi32_ps(qhi), whole));
      const float parts = static_cast<float>(1 << kSecondShift);
      const __m512 finer = _mm512_set1_ps(inverse * parts);
      const __m512i rlo = to_codes(rest_lo, finer, block + pass_stride);
      const __m512i rhi = to_codes(rest_hi, finer, block + pass_stride + kLanes);
      sum_lo = sum_lo * parts + static_cast<float>(_mm512_reduce_add_epi32(rlo));
      sum_hi = sum_hi * parts + static_cast<float>(_mm512_reduce_add_epi32(rhi));
      last_step = step / parts;
    }
    scale[b] = last_step;
    sum[2 * b] = last_step * sum_lo;
    sum[2 * b + 1] = last_step * sum_hi;
  }
}

#else  // AVX2: the same arithmetic, one value at a time

// A value to an int8 code at `inverse` = 1 / its scale (rounded to nearest even, saturated
// to +-127: signed_dots takes no -128; the first pass's codes never reach it, the second's
// only for a rest within 1/512 of a step of minus half a step, then coded 1/256 off).
inline int to_code(float value, float inverse, int8_t* code) {
  const float rounded = std::nearbyint(value * inverse);
  const int q = rounded < -127.0f ? -127 : rounded > 127.0f ? 127 : static_cast<int>(rounded);
  *code = static_cast<int8_t>(q);
  return q;
}

void quantize_row(const float* x, int64_t cols, int passes, int64_t pass_stride,
                  int8_t* codes, float* scale, float* sum) {
  const float parts = static_cast<float>(1 << kSecondShift);
  for (int64_t b = 0; b < cols / kBlock; ++b) {
    const float* values = x + b * kBlock;
    int8_t* block = codes + b * kBlock;
    float amax = 0.0f;
    for (int i = 0; i < kBlock; ++i) amax = std::fmax(amax, std::fabs(values[i]));
    const float step = amax / 127.0f;
    const float inverse = step > 0.0f ? 1.0f / step : 0.0f;
    int first[2] = {0, 0}, second[2] = {0, 0};
    for (int i = 0; i < kBlock; ++i) {
      const int q = to_code(values[i], inverse, block + i);
      first[i / kLanes] += q;
      if (passes == 2) {
        const float rest = values[i] - static_cast<float>(q) * step;
        second[i / kLanes] += to_code(rest, inverse * parts, block + pass_stride + i);
      }
    }
    const float last_step = passes == 2 ? step / parts : step;
    const float unit = passes == 2 ? parts : 1.0f;
    scale[b] = last_step;
    sum[2 * b] = last_step * (static_cast<float>(first[0]) * unit + static_cast<float>(second[0]));
    sum[2 * b + 1] =
        last_step * (static_cast<float>(first[1]) * unit + static_cast<float>(second[1]));
  }
}

#endif

// Where a product goes: rows `stride` floats apart, plus a bias per output where not null.
struct Output {
  float* rows;
  int64_t stride;
  const float* bias;
};

// out[r][0..16) += bias[0..16) for `rows` rows out_stride floats apart (after the products:
// the sum rounds as torch's y + bias does).
inline void add_bias(const float* bias, int rows, float* out, int64_t out_stride) {
  for (int r = 0; r < rows; ++r)
    for (int64_t l = 0; l < kLanes; ++l) out[r * out_stride + l] += bias[l];
}

// One tile's products for every token, kRows rows a sweep. TileScales: the tile's.
template <int BITS, int PASSES, bool HALVES, typename TileScales>
void sweep_tile(const int8_t* xq, const float* xscale, const float* xsum, int64_t tokens,
                int64_t cols, const uint8_t* tile, const TileScales& scales,
                int64_t group_blocks, const Output& output, int64_t first_output) {
  const int64_t blocks = cols / kBlock;
  for (int64_t r = 0; r < tokens; r += kRows) {
    const int count = tokens - r < kRows ? static_cast<int>(tokens - r) : kRows;
    float* out = output.rows + r * output.stride + first_output;
    tile_product_for<BITS, PASSES, HALVES, TileScales>(count)(
        xq + r * cols, tokens * cols, xscale + r * blocks, xsum + 2 * r * blocks, cols, tile,
        scales, group_blocks, out, output.stride);
    if (output.bias != nullptr) add_bias(output.bias + first_output, count, out, output.stride);
  }
}

// A tile's factored scales and lows multiplied out into `scratch` (2 x groups x 16 floats):
// a call sweeping the tile more than once then reads floats, as unfactored scales (the
// same values: each product is exact).
PlainScales<float> multiplied_out(const FactoredScales& tile, std::vector<float>& scratch) {
  scratch.resize(2 * tile.groups * kLanes);
  float* scale = scratch.data();
  float* low = scale + tile.groups * kLanes;
  for (int64_t g = 0; g < tile.groups; ++g) {
    store_floats(scale + g * kLanes, tile.scale_of(g));
    store_floats(low + g * kLanes, tile.low_of(g));
  }
  return {scale, low, tile.groups};
}

template <int BITS, int PASSES, bool HALVES, typename Scales>
void block_dot(const int8_t* xq, const float* xscale, const float* xsum, int64_t tokens,
               int64_t cols, const uint8_t* weights, const Scales& scales,
               int64_t out_features, int64_t group_blocks, const Output& output, int threads) {
  const int64_t tiles = out_features / kLanes;
  const int64_t tile_bytes = (cols / kBlock) * BITS * kBlock * kLanes / 8;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < tiles; ++t) {
    const uint8_t* tile = weights + t * tile_bytes;
    if constexpr (std::is_same_v<Scales, FactoredScales>) {
      if (tokens > kRows) {  // several sweeps: the factors' products once, not each sweep
        static thread_local std::vector<float> scratch;
        sweep_tile<BITS, PASSES, HALVES>(xq, xscale, xsum, tokens, cols, tile,
                                         multiplied_out(scales.tile(t), scratch), group_blocks,
                                         output, t * kLanes);
        continue;
      }
    }
    sweep_tile<BITS, PASSES, HALVES>(xq, xscale, xsum, tokens, cols, tile, scales.tile(t),
                                     group_blocks, output, t * kLanes);
  }
}

template <int BITS, int PASSES, typename Scales>
void block_dot_groups(const int8_t* xq, const float* xscale, const float* xsum,
                      int64_t tokens, int64_t cols, const uint8_t* weights,
                      const Scales& scales, int64_t out_features, int64_t group_inputs,
                      const Output& output, int threads) {
  if (group_inputs == kBlock / 2)
    block_dot<BITS, PASSES, true>(xq, xscale, xsum, tokens, cols, weights, scales,
                                  out_features, 0, output, threads);
  else
    block_dot<BITS, PASSES, false>(xq, xscale, xsum, tokens, cols, weights, scales,
                                   out_features, group_inputs / kBlock, output, threads);
}

template <int BITS, typename Scales>
void block_dot_passes(int passes, const int8_t* xq, const float* xscale, const float* xsum,
                      int64_t tokens, int64_t cols, const uint8_t* weights,
                      const Scales& scales, int64_t out_features, int64_t group_inputs,
                      const Output& output, int threads) {
  if (passes == 2)
    block_dot_groups<BITS, 2>(xq, xscale, xsum, tokens, cols, weights, scales, out_features,
                              group_inputs, output, threads);
  else
    block_dot_groups<BITS, 1>(xq, xscale, xsum, tokens, cols, weights, scales, out_features,
                              group_inputs, output, threads);
}

template <typename Scales>
void block_dot_bits(int bits, int passes, const int8_t* xq, const float* xscale,
                    const float* xsum, int64_t tokens, int64_t cols, const uint8_t* weights,
                    const Scales& scales, int64_t out_features, int64_t group_inputs,
                    const Output& output, int threads) {
  if (bits == 4)
    block_dot_passes<4>(passes, xq, xscale, xsum, tokens, cols, weights, scales, out_features,
                        group_inputs, output, threads);
  else if (bits == 6)
    block_dot_passes<6>(passes, xq, xscale, xsum, tokens, cols, weights, scales, out_features,
                        group_inputs, output, threads);
  else
    block_dot_passes<8>(passes, xq, xscale, xsum, tokens, cols, weights, scales, out_features,
                        group_inputs, output, threads);
}

// One weight's scale (or low) at index `at` of [tiles][groups][16] (see FactoredScales).
inline float scale_at(const void* values, const float* factors, int scale_bits, int64_t at,
                      int64_t groups, int shift, int which) {
  if (scale_bits == 16) return from_float16(static_cast<const uint16_t*>(values)[at]);
  if (scale_bits == 32) return static_cast<const float*>(values)[at];
  const int64_t tile = at / (groups * kLanes), group = at / kLanes % groups, lane = at % kLanes;
  const int64_t factor = ((tile * (groups >> shift) + (group >> shift)) * 2 + which) * kLanes;
  return static_cast<float>(static_cast<const int8_t*>(values)[at]) * factors[factor + lane];
}

}  // namespace

extern "C" {

// Whether this CPU runs this build: AVX-512 F, BW and VNNI, or AVX2, FMA and F16C.
int pagoda_block_dot_supported() {
  __builtin_cpu_init();
#if defined(__AVX512F__)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vnni");
#else
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#endif
}

// out [tokens, out_features] (rows out_stride floats apart) = x [tokens, cols] times the
// tiled weights (bits 4, 6 or 8, groups of group_inputs: 16 or a multiple of 32; scales and
// lows of scale_bits 32 or 16, or 8: int8s times `factors`, 2^shift groups a superblock, see
// FactoredScales), plus bias [out_features] where not null; x quantized first (in 1
// or 2 passes) into the calling thread's scratch (kept for its next call, up to kKeptScratch
// codes): codes [passes, tokens, cols], a scale per block [tokens, cols / 32] and a sum per
// half block [tokens, cols / 16].
void pagoda_block_dot(const float* x, int64_t tokens, int64_t cols, int passes,
                      const uint8_t* weights, int bits, const void* scale, const void* low,
                      int scale_bits, const float* factors, int shift, int64_t out_features,
                      int64_t group_inputs, const float* bias, float* out, int64_t out_stride,
                      int threads) {
  const Output output{out, out_stride, bias};
  static thread_local std::vector<int8_t> codes_scratch;
  static thread_local std::vector<float> scale_scratch, sum_scratch;
  const int64_t blocks = cols / kBlock;
  codes_scratch.resize(passes * tokens * cols);
  scale_scratch.resize(tokens * blocks);
  sum_scratch.resize(2 * tokens * blocks);
  // plain pointers: inside the parallel regions the names would be each thread's own
  int8_t* x_codes = codes_scratch.data();
  float* x_scale = scale_scratch.data();
  float* x_sum = sum_scratch.data();
#pragma omp parallel for num_threads(threads) schedule(static) if (tokens >= 64)
  for (int64_t r = 0; r < tokens; ++r)
    quantize_row(x + r * cols, cols, passes, tokens * cols, x_codes + r * cols,
                 x_scale + r * blocks, x_sum + 2 * r * blocks);
  const int64_t groups = cols / group_inputs;
  if (scale_bits == 8)
    block_dot_bits(bits, passes, x_codes, x_scale, x_sum, tokens, cols, weights,
                   FactoredScales{static_cast<const int8_t*>(scale),
                                  static_cast<const int8_t*>(low), factors, groups, shift},
                   out_features, group_inputs, output, threads);
  else if (scale_bits == 16)
    block_dot_bits(bits, passes, x_codes, x_scale, x_sum, tokens, cols, weights,
                   PlainScales<uint16_t>{static_cast<const uint16_t*>(scale),
                                         static_cast<const uint16_t*>(low), groups},
                   out_features, group_inputs, output, threads);
  else
    block_dot_bits(bits, passes, x_codes, x_scale, x_sum, tokens, cols, weights,
                   PlainScales<float>{static_cast<const float*>(scale),
                                      static_cast<const float*>(low), groups},
                   out_features, group_inputs, output, threads);
  if (codes_scratch.size() > kKeptScratch) {  // a prefill's: not held between calls
    std::vector<int8_t>().swap(codes_scratch);
    std::vector<float>().swap(scale_scratch);
    std::vector<float>().swap(sum_scratch);
  }
}

// out [n, cols] float32: rows ids[0..n) of the tiled weights decoded, code * scale + low, times
// multiplier unless it is 1 (a quantized table's lookup, Gemma's scaled by sqrt(hidden); an id
// outside [0, out_features) is the caller's to rule out).
__attribute__((optimize("fp-contract=off")))  // code * scale rounds before + low, as torch's
void pagoda_block_dot_rows(const int64_t* ids, int64_t n, const uint8_t* weights, int bits,
                           const void* scale, const void* low, int scale_bits,
                           const float* factors, int shift, int64_t cols,
                           int64_t group_inputs, float multiplier, float* out) {
  const int64_t blocks = cols / kBlock, groups = cols / group_inputs;
  const int64_t block_bytes = bits * kBlock * kLanes / 8;
  constexpr int64_t row_bytes = kLanes * 4;  // a block's row: 4 codes (or pairs) per output
  for (int64_t r = 0; r < n; ++r) {
    const int64_t tile = ids[r] / kLanes, lane = ids[r] % kLanes;
    const uint8_t* codes = weights + tile * blocks * block_bytes + lane * 4;
    const int64_t first_group = (tile * groups) * kLanes + lane;
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t block = c / kBlock, row = (c % kBlock) / 4, i = c % 4;
      int code;
      if (bits == 4 || bits == 6) {
        const uint8_t byte = codes[block * block_bytes + (row / 2) * row_bytes + i];
        code = row % 2 == 0 ? byte & 0x0F : byte >> 4;
        if (bits == 6) {
          const uint8_t pairs = codes[block * block_bytes + (4 + row / 4) * row_bytes + i];
          code |= ((pairs >> (2 * (row % 4))) & 0x03) << 4;
        }
      } else {
        code = codes[block * block_bytes + row * row_bytes + i];
      }
      const int64_t at = first_group + (c / group_inputs) * kLanes;
      const float s = scale_at(scale, factors, scale_bits, at, groups, shift, 0);
      const float l = scale_at(low, factors, scale_bits, at, groups, shift, 1);
      const float value = static_cast<float>(code) * s + l;
      out[r * cols + c] = multiplier == 1.0f ? value : value * multiplier;
    }
  }
}

}  // extern "C"
