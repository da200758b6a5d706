// Products of weights held as 4- or 8-bit codes (a scale and a low per group of 16 inputs or
// a multiple of 32) with activations quantized to int8 per block of 32 inputs, on AVX-512
// VNNI CPUs: one integer dot product per block (vpdpbusd; per half block in groups of 16),
// scaled by the block's activation scale and the weights' group scale, plus the group's low
// times its inputs' quantized activation sum. In one pass this is llama.cpp's arithmetic for
// its quantized types; a second pass adds int8 codes of what the first codes miss, at
// 1/256 of the first scale (the activations to ~2^-16 of each block's largest), in the same
// sweep over the weights: its products join the first's, shifted by 8 bits, as integers.
//
// Weights are laid out in tiles of 16 outputs: for tile t and block b, 4-bit codes take 256
// bytes (four 64-byte rows; in row l, byte 4j+i holds output j's inputs 8l+i in its low
// nibble and 8l+4+i in its high nibble), 8-bit codes 512 bytes (eight rows; in row q, byte
// 4j+i holds output j's input 4q+i). Scales and lows are [tiles][groups][16] floats.
//
// Built by pagoda at first use (cpu_block_dot.py) with g++ and OpenMP.

#include <immintrin.h>
#include <stdint.h>

namespace {

constexpr int64_t kBlock = 32;    // inputs per activation block
constexpr int64_t kLanes = 16;    // outputs per tile
constexpr int kRows = 8;          // activation rows per sweep over a tile
constexpr int kSecondShift = 8;   // the first pass's scale is the second's times 2^8

// The eight [16 outputs x 4 inputs] code vectors of one tile's block.
template <int BITS>
inline void load_codes(const uint8_t* block, __m512i codes[8]) {
  if constexpr (BITS == 4) {
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    for (int row = 0; row < 4; ++row) {
      const __m512i packed = _mm512_loadu_si512(block + 64 * row);
      codes[2 * row] = _mm512_and_si512(packed, nibble);
      codes[2 * row + 1] = _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble);
    }
  } else {
    for (int row = 0; row < 8; ++row) codes[row] = _mm512_loadu_si512(block + 64 * row);
  }
}

// Adds the products of one block's codes with one row's 32 activation codes to `first`
// (inputs 0..15) and `second` (inputs 16..31): two independent chains.
inline void add_block_products(const __m512i codes[8], const int8_t* activations,
                               __m512i* first, __m512i* second) {
  const int32_t* x = reinterpret_cast<const int32_t*>(activations);
  for (int q = 0; q < 4; ++q) {
    *first = _mm512_dpbusd_epi32(*first, codes[q], _mm512_set1_epi32(x[q]));
    *second = _mm512_dpbusd_epi32(*second, codes[q + 4], _mm512_set1_epi32(x[q + 4]));
  }
}

// out[r][0..16) = activation rows r < R times one tile's 16 outputs. xq: PASSES planes of
// [rows, cols] codes (plane stride pass_stride); xscale: each block's scale (of the last
// pass's codes); xsum: each half block's activation sum. HALVES: groups of 16 inputs (two a
// block), else of group_blocks blocks.
template <int R, int BITS, int PASSES, bool HALVES>
void tile_product(const int8_t* xq, int64_t pass_stride, const float* xscale,
                  const float* xsum, int64_t cols, const uint8_t* tile, const float* scale,
                  const float* low, int64_t group_blocks, float* out, int64_t out_stride) {
  const int64_t blocks = cols / kBlock;
  constexpr int64_t block_bytes = BITS * kBlock * kLanes / 8;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i codes[8];
    load_codes<BITS>(tile + b * block_bytes, codes);
    const int64_t group = HALVES ? 2 * b : b / group_blocks;
    const __m512 scale0 = _mm512_loadu_ps(scale + group * kLanes);
    const __m512 low0 = _mm512_loadu_ps(low + group * kLanes);
    for (int r = 0; r < R; ++r) {
      const int8_t* x = xq + r * cols + b * kBlock;
      __m512i first = _mm512_setzero_si512(), second = _mm512_setzero_si512();
      add_block_products(codes, x, &first, &second);
      if constexpr (PASSES == 2) {  // in units of the second pass's scale
        first = _mm512_slli_epi32(first, kSecondShift);
        second = _mm512_slli_epi32(second, kSecondShift);
        add_block_products(codes, x + pass_stride, &first, &second);
      }
      __m512 dot0, dot1;  // the halves' products
      if constexpr (HALVES) {
        dot0 = _mm512_cvtepi32_ps(first);
        dot1 = _mm512_cvtepi32_ps(second);
      } else {
        dot0 = _mm512_cvtepi32_ps(_mm512_add_epi32(first, second));
      }
      const int64_t at = r * blocks + b;
      const __m512 activation_scale = _mm512_set1_ps(xscale[at]);
      const float sum0 = xsum[2 * at], sum1 = xsum[2 * at + 1];
      if constexpr (HALVES) {
        const __m512 scale1 = _mm512_loadu_ps(scale + (group + 1) * kLanes);
        const __m512 low1 = _mm512_loadu_ps(low + (group + 1) * kLanes);
        acc[r] = _mm512_fmadd_ps(dot0, _mm512_mul_ps(scale0, activation_scale), acc[r]);
        acc[r] = _mm512_fmadd_ps(dot1, _mm512_mul_ps(scale1, activation_scale), acc[r]);
        acc[r] = _mm512_fmadd_ps(low0, _mm512_set1_ps(sum0), acc[r]);
        acc[r] = _mm512_fmadd_ps(low1, _mm512_set1_ps(sum1), acc[r]);
      } else {
        acc[r] = _mm512_fmadd_ps(dot0, _mm512_mul_ps(scale0, activation_scale), acc[r]);
        acc[r] = _mm512_fmadd_ps(low0, _mm512_set1_ps(sum0 + sum1), acc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * out_stride, acc[r]);
}

using TileProduct = void (*)(const int8_t*, int64_t, const float*, const float*, int64_t,
                             const uint8_t*, const float*, const float*, int64_t, float*,
                             int64_t);

template <int BITS, int PASSES, bool HALVES>
TileProduct tile_product_for(int rows) {
  static constexpr TileProduct table[] = {
      tile_product<1, BITS, PASSES, HALVES>, tile_product<2, BITS, PASSES, HALVES>,
      tile_product<3, BITS, PASSES, HALVES>, tile_product<4, BITS, PASSES, HALVES>,
      tile_product<5, BITS, PASSES, HALVES>, tile_product<6, BITS, PASSES, HALVES>,
      tile_product<7, BITS, PASSES, HALVES>, tile_product<8, BITS, PASSES, HALVES>};
  return table[rows - 1];
}

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

template <int BITS, int PASSES, bool HALVES>
void block_dot(const int8_t* xq, const float* xscale, const float* xsum, int64_t tokens,
               int64_t cols, const uint8_t* weights, const float* scale, const float* low,
               int64_t out_features, int64_t group_blocks, float* out, int threads) {
  const int64_t tiles = out_features / kLanes;
  const int64_t blocks = cols / kBlock;
  const int64_t groups = HALVES ? 2 * blocks : blocks / group_blocks;
  const int64_t tile_bytes = blocks * BITS * kBlock * kLanes / 8;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < tiles; ++t) {
    for (int64_t r = 0; r < tokens; r += kRows) {
      const int count = tokens - r < kRows ? static_cast<int>(tokens - r) : kRows;
      tile_product_for<BITS, PASSES, HALVES>(count)(
          xq + r * cols, tokens * cols, xscale + r * blocks, xsum + 2 * r * blocks, cols,
          weights + t * tile_bytes, scale + t * groups * kLanes, low + t * groups * kLanes,
          group_blocks, out + r * out_features + t * kLanes, out_features);
    }
  }
}

template <int BITS, int PASSES>
void block_dot_groups(const int8_t* xq, const float* xscale, const float* xsum,
                      int64_t tokens, int64_t cols, const uint8_t* weights,
                      const float* scale, const float* low, int64_t out_features,
                      int64_t group_inputs, float* out, int threads) {
  if (group_inputs == kBlock / 2)
    block_dot<BITS, PASSES, true>(xq, xscale, xsum, tokens, cols, weights, scale, low,
                                  out_features, 0, out, threads);
  else
    block_dot<BITS, PASSES, false>(xq, xscale, xsum, tokens, cols, weights, scale, low,
                                   out_features, group_inputs / kBlock, out, threads);
}

template <int BITS>
void block_dot_passes(int passes, const int8_t* xq, const float* xscale, const float* xsum,
                      int64_t tokens, int64_t cols, const uint8_t* weights,
                      const float* scale, const float* low, int64_t out_features,
                      int64_t group_inputs, float* out, int threads) {
  if (passes == 2)
    block_dot_groups<BITS, 2>(xq, xscale, xsum, tokens, cols, weights, scale, low,
                              out_features, group_inputs, out, threads);
  else
    block_dot_groups<BITS, 1>(xq, xscale, xsum, tokens, cols, weights, scale, low,
                              out_features, group_inputs, out, threads);
}

}  // namespace

extern "C" {

// Whether this CPU runs the kernels: AVX-512 F, BW and VNNI.
int pagoda_block_dot_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vnni");
}

// out [tokens, out_features] = x [tokens, cols] times the tiled weights (bits 4 or 8, groups
// of group_inputs: 16 or a multiple of 32), x quantized first (in 1 or 2 passes) into the
// caller's scratch: codes [passes, tokens, cols], a scale per block [tokens, cols / 32] and
// a sum per half block [tokens, cols / 16].
void pagoda_block_dot(const float* x, int64_t tokens, int64_t cols, int passes,
                      int8_t* x_codes, float* x_scale, float* x_sum, const uint8_t* weights,
                      int bits, const float* scale, const float* low, int64_t out_features,
                      int64_t group_inputs, float* out, int threads) {
  const int64_t blocks = cols / kBlock;
#pragma omp parallel for num_threads(threads) schedule(static) if (tokens >= 64)
  for (int64_t r = 0; r < tokens; ++r)
    quantize_row(x + r * cols, cols, passes, tokens * cols, x_codes + r * cols,
                 x_scale + r * blocks, x_sum + 2 * r * blocks);
  if (bits == 4)
    block_dot_passes<4>(passes, x_codes, x_scale, x_sum, tokens, cols, weights, scale, low,
                        out_features, group_inputs, out, threads);
  else
    block_dot_passes<8>(passes, x_codes, x_scale, x_sum, tokens, cols, weights, scale, low,
                        out_features, group_inputs, out, threads);
}

}  // extern "C"
