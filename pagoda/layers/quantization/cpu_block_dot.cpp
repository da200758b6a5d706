// Products of weights held as 4- or 8-bit codes (a scale and a low per group of inputs) with
// activations quantized to int8 per block of 32 inputs, on AVX-512 VNNI CPUs. The arithmetic
// is llama.cpp's for its quantized types: one integer dot product per block, scaled by the
// block's activation scale and the weights' group scale, plus the group's low times the
// block's quantized activation sum.
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

constexpr int64_t kBlock = 32;  // inputs per activation block
constexpr int64_t kLanes = 16;  // outputs per tile
constexpr int kRows = 8;        // activation rows per pass over a tile

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

// out[r][0..16) = activation rows r < R times one tile's 16 outputs.
template <int R, int BITS>
void tile_product(const int8_t* xq, const float* xscale, const float* xsum, int64_t cols,
                  const uint8_t* tile, const float* scale, const float* low,
                  int64_t group_blocks, float* out, int64_t out_stride) {
  const int64_t blocks = cols / kBlock;
  constexpr int64_t block_bytes = BITS * kBlock * kLanes / 8;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i codes[8];
    load_codes<BITS>(tile + b * block_bytes, codes);
    const int64_t group = b / group_blocks;
    const __m512 group_scale = _mm512_loadu_ps(scale + group * kLanes);
    const __m512 group_low = _mm512_loadu_ps(low + group * kLanes);
    for (int r = 0; r < R; ++r) {
      const int32_t* x = reinterpret_cast<const int32_t*>(xq + r * cols + b * kBlock);
      __m512i even = _mm512_setzero_si512(), odd = _mm512_setzero_si512();
      for (int q = 0; q < 8; q += 2) {
        even = _mm512_dpbusd_epi32(even, codes[q], _mm512_set1_epi32(x[q]));
        odd = _mm512_dpbusd_epi32(odd, codes[q + 1], _mm512_set1_epi32(x[q + 1]));
      }
      const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(even, odd));
      const int64_t at = r * blocks + b;
      acc[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(group_scale, _mm512_set1_ps(xscale[at])),
                               acc[r]);
      acc[r] = _mm512_fmadd_ps(group_low, _mm512_set1_ps(xsum[at]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * out_stride, acc[r]);
}

template <int BITS>
using TileProduct = void (*)(const int8_t*, const float*, const float*, int64_t,
                             const uint8_t*, const float*, const float*, int64_t, float*,
                             int64_t);

template <int BITS>
TileProduct<BITS> tile_product_for(int rows) {
  static constexpr TileProduct<BITS> table[] = {
      tile_product<1, BITS>, tile_product<2, BITS>, tile_product<3, BITS>,
      tile_product<4, BITS>, tile_product<5, BITS>, tile_product<6, BITS>,
      tile_product<7, BITS>, tile_product<8, BITS>};
  return table[rows - 1];
}

// One block of 32 values to int8 codes: scale = max |x| / 127, codes = x / scale rounded to
// nearest even, sum = scale * the sum of the codes. Returns the codes times the scale.
inline void quantize_block(__m512 lo, __m512 hi, int8_t* codes, float* scale, float* sum,
                           __m512* decoded_lo, __m512* decoded_hi) {
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
  const float d = amax / 127.0f;
  const __m512 inverse = _mm512_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
  const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inverse));
  const __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inverse));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(codes), _mm512_cvtsepi32_epi8(qlo));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + kLanes), _mm512_cvtsepi32_epi8(qhi));
  *scale = d;
  *sum = d * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi)));
  *decoded_lo = _mm512_mul_ps(_mm512_cvtepi32_ps(qlo), _mm512_set1_ps(d));
  *decoded_hi = _mm512_mul_ps(_mm512_cvtepi32_ps(qhi), _mm512_set1_ps(d));
}

// One row's blocks to codes (pass 0) and, with two passes, the codes of what the first
// codes miss (pass 1, pass_stride bytes on: the two passes sum to x within ~2^-15 of each
// block's largest).
void quantize_row(const float* x, int64_t cols, int passes, int64_t pass_stride,
                  int64_t block_stride, int8_t* codes, float* scale, float* sum) {
  for (int64_t b = 0; b < cols / kBlock; ++b) {
    __m512 lo = _mm512_loadu_ps(x + b * kBlock), hi = _mm512_loadu_ps(x + b * kBlock + kLanes);
    for (int pass = 0; pass < passes; ++pass) {
      __m512 decoded_lo, decoded_hi;
      quantize_block(lo, hi, codes + pass * pass_stride + b * kBlock,
                     scale + pass * block_stride + b, sum + pass * block_stride + b,
                     &decoded_lo, &decoded_hi);
      lo = _mm512_sub_ps(lo, decoded_lo);
      hi = _mm512_sub_ps(hi, decoded_hi);
    }
  }
}

template <int BITS>
void block_dot(const int8_t* xq, const float* xscale, const float* xsum, int64_t tokens,
               int64_t cols, const uint8_t* weights, const float* scale, const float* low,
               int64_t out_features, int64_t group_blocks, float* out, int threads) {
  const int64_t tiles = out_features / kLanes;
  const int64_t blocks = cols / kBlock;
  const int64_t groups = blocks / group_blocks;
  const int64_t tile_bytes = blocks * BITS * kBlock * kLanes / 8;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < tiles; ++t) {
    for (int64_t r = 0; r < tokens; r += kRows) {
      const int count = tokens - r < kRows ? static_cast<int>(tokens - r) : kRows;
      tile_product_for<BITS>(count)(xq + r * cols, xscale + r * blocks, xsum + r * blocks,
                                    cols, weights + t * tile_bytes,
                                    scale + t * groups * kLanes, low + t * groups * kLanes,
                                    group_blocks, out + r * out_features + t * kLanes,
                                    out_features);
    }
  }
}

}  // namespace

extern "C" {

// Whether this CPU runs the kernels: AVX-512 F, BW and VNNI.
int pagoda_block_dot_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vnni");
}

// out [passes * tokens, out_features] = x [tokens, cols] times the tiled weights (bits 4
// or 8): x quantized first into codes [passes * tokens, cols] with a scale and a sum per
// block [passes * tokens, cols / 32] (the caller's scratch); with two passes, rows
// tokens.. hold the product of what the first codes miss (the caller adds the halves).
void pagoda_block_dot(const float* x, int64_t tokens, int64_t cols, int passes,
                      int8_t* x_codes, float* x_scale, float* x_sum, const uint8_t* weights,
                      int bits, const float* scale, const float* low, int64_t out_features,
                      int64_t group_blocks, float* out, int threads) {
  const int64_t blocks = cols / kBlock;
#pragma omp parallel for num_threads(threads) schedule(static) if (tokens >= 64)
  for (int64_t r = 0; r < tokens; ++r)
    quantize_row(x + r * cols, cols, passes, tokens * cols, tokens * blocks,
                 x_codes + r * cols, x_scale + r * blocks, x_sum + r * blocks);
  const int64_t rows = passes * tokens;
  if (bits == 4)
    block_dot<4>(x_codes, x_scale, x_sum, rows, cols, weights, scale, low, out_features,
                 group_blocks, out, threads);
  else
    block_dot<8>(x_codes, x_scale, x_sum, rows, cols, weights, scale, low, out_features,
                 group_blocks, out, threads);
}

}  // extern "C"
