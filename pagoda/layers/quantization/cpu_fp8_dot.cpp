// Products of float8 (E4M3) weights with float32 activations on CPU, the weights held as
// their bytes (a quarter of float32's) and decoded in registers: a byte sign-extended to 16
// bits and shifted left by 7, bit 14 cleared, is the float16 whose value is the float8's
// divided by 2^8 (subnormals included: both formats' exponent fields line up, their biases
// differ by 8), which the CPU converts to float32 (F16C); the factor 2^8 rides in the
// weights' scales. The bytes 0x7F and 0xFF (float8's NaN) decode as 480 and -480; float8
// checkpoints hold none. Products and sums in float32 (multiply-adds), scaled once per group
// of inputs: per output row (one group) or per block of columns.
//
// Weights are laid out in tiles of 16 outputs: tile t holds, input by input, the 16 outputs'
// bytes (16 bytes an input). Scales are [tiles][groups][16] floats.
//
// Built by pagoda at first use (cpu_fp8_dot.py) with g++ and OpenMP, once with AVX-512 flags
// and once with AVX2 ones: the 16-lane vectors below are one zmm register or two ymm ones.

#include <immintrin.h>
#include <stdint.h>

#include <utility>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;          // outputs per tile
constexpr int64_t kPrefetchInputs = 64;  // how far ahead a sweep asks for weights (1 KiB)
constexpr size_t kKeptScratch = 1 << 18;  // activations a thread keeps between calls

#if defined(__AVX512F__)

constexpr int kRows = 16;  // activation rows per sweep over a tile (their sums in registers)

using Floats = __m512;

// Inputs i and i + 1 of a tile: its 32 bytes at `at` as two vectors of 16 outputs, times 2^-8.
inline void decode_pair(const uint8_t* at, Floats* first, Floats* second) {
  const __m512i words = _mm512_cvtepi8_epi16(_mm256_loadu_si256(
      reinterpret_cast<const __m256i*>(at)));
  const __m512i halves = _mm512_and_si512(_mm512_slli_epi16(words, 7),
                                          _mm512_set1_epi16(static_cast<int16_t>(0xBFFF)));
  *first = _mm512_cvtph_ps(_mm512_castsi512_si256(halves));
  *second = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(halves, 1));
}

inline Floats zero_floats() { return _mm512_setzero_ps(); }
inline Floats broadcast(float value) { return _mm512_set1_ps(value); }
inline Floats load_floats(const float* at) { return _mm512_loadu_ps(at); }
inline void store_floats(float* at, Floats v) { _mm512_storeu_ps(at, v); }
inline Floats fmadd(Floats a, Floats b, Floats c) { return _mm512_fmadd_ps(a, b, c); }
inline Floats add(Floats a, Floats b) { return _mm512_add_ps(a, b); }

#else  // AVX2 and F16C: each 16-lane vector is two ymm registers

constexpr int kRows = 4;  // activation rows per sweep (more sums would not fit 16 registers)

struct Floats {
  __m256 lo, hi;
};

inline __m256i halves_of(const uint8_t* at) {
  const __m256i words = _mm256_cvtepi8_epi16(_mm_loadu_si128(
      reinterpret_cast<const __m128i*>(at)));
  return _mm256_and_si256(_mm256_slli_epi16(words, 7),
                          _mm256_set1_epi16(static_cast<int16_t>(0xBFFF)));
}

inline Floats to_floats(__m256i halves) {
  return {_mm256_cvtph_ps(_mm256_castsi256_si128(halves)),
          _mm256_cvtph_ps(_mm256_extracti128_si256(halves, 1))};
}

inline void decode_pair(const uint8_t* at, Floats* first, Floats* second) {
  *first = to_floats(halves_of(at));
  *second = to_floats(halves_of(at + kLanes));
}

inline Floats zero_floats() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline Floats broadcast(float value) { return {_mm256_set1_ps(value), _mm256_set1_ps(value)}; }
inline Floats load_floats(const float* at) {
  return {_mm256_loadu_ps(at), _mm256_loadu_ps(at + 8)};
}
inline void store_floats(float* at, Floats v) {
  _mm256_storeu_ps(at, v.lo);
  _mm256_storeu_ps(at + 8, v.hi);
}
inline Floats fmadd(Floats a, Floats b, Floats c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline Floats add(Floats a, Floats b) {
  return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)};
}

#endif

// Independent sums a row keeps (each one a chain of multiply-adds waiting on the last one's
// latency): more where the rows are few, within the registers.
template <int R>
constexpr int kChains = R >= kRows / 2 ? 1 : R >= kRows / 4 ? 2 : 4;

// out[r][0..16) = activation rows r < R times one tile's 16 outputs: each group's products
// summed in registers, then scaled into the rows' totals. `x` holds the rows' activations
// input by input, kRows floats an input (x[i * kRows + r]).
template <int R>
void tile_product(const float* x, int64_t cols, const uint8_t* tile, const float* scale,
                  int64_t group, float* out, int64_t out_stride) {
  constexpr int C = kChains<R>;
  Floats total[R];
  for (int r = 0; r < R; ++r) total[r] = zero_floats();
  for (int64_t start = 0; start < cols; start += group) {
    Floats sums[R][C];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) sums[r][c] = zero_floats();
    for (int64_t i = start; i < start + group; i += 4) {
      __builtin_prefetch(tile + (i + kPrefetchInputs) * kLanes);  // 4 inputs: a cache line
      Floats w[4];
      decode_pair(tile + i * kLanes, &w[0], &w[1]);
      decode_pair(tile + (i + 2) * kLanes, &w[2], &w[3]);
      const float* inputs = x + i * kRows;
      for (int r = 0; r < R; ++r)
        for (int k = 0; k < 4; ++k)
          sums[r][k % C] = fmadd(broadcast(inputs[k * kRows + r]), w[k], sums[r][k % C]);
    }
    const Floats group_scale = load_floats(scale + (start / group) * kLanes);
    for (int r = 0; r < R; ++r) {
      Floats sum = sums[r][0];
      for (int c = 1; c < C; ++c) sum = add(sum, sums[r][c]);
      total[r] = fmadd(sum, group_scale, total[r]);
    }
  }
  for (int r = 0; r < R; ++r) store_floats(out + r * out_stride, total[r]);
}

using TileProduct = void (*)(const float*, int64_t, const uint8_t*, const float*, int64_t,
                             float*, int64_t);

// tile_product<rows>, rows in 1..kRows
template <int... R>
TileProduct tile_product_for(int rows, std::integer_sequence<int, R...>) {
  static constexpr TileProduct table[] = {tile_product<R + 1>...};
  return table[rows - 1];
}

}  // namespace

extern "C" {

// Whether this CPU runs this build: AVX-512 F and BW, or AVX2, FMA and F16C.
int pagoda_fp8_dot_supported() {
  __builtin_cpu_init();
#if defined(__AVX512F__)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
#else
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#endif
}

// out [tokens, out_features] = x [tokens, cols] (float32) times the tiled float8 weights, a
// scale per output and group of `group` inputs (group a multiple of 4 dividing cols;
// out_features a multiple of 16). The activations are first copied input by input for each
// kRows rows into the calling thread's scratch: one cache line then holds an input's rows,
// and rows a power of two apart no longer share the L1 cache's sets (at 4096 inputs and 16
// rows, 2.2x faster).
void pagoda_fp8_dot(const float* x, int64_t tokens, int64_t cols, const uint8_t* weights,
                    const float* scale, int64_t out_features, int64_t group, float* out,
                    int threads) {
  static thread_local std::vector<float> scratch;
  const int64_t tiles = out_features / kLanes;
  const int64_t groups = cols / group;
  scratch.resize((tokens + kRows - 1) / kRows * kRows * cols);
  float* packed = scratch.data();  // inside the parallel regions the name is each thread's
#pragma omp parallel for num_threads(threads) schedule(static) if (tokens >= 64)
  for (int64_t r = 0; r < tokens; ++r) {
    float* rows = packed + (r / kRows) * kRows * cols + r % kRows;
    for (int64_t i = 0; i < cols; ++i) rows[i * kRows] = x[r * cols + i];
  }
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < tiles; ++t) {
    for (int64_t r = 0; r < tokens; r += kRows) {
      const int count = tokens - r < kRows ? static_cast<int>(tokens - r) : kRows;
      tile_product_for(count, std::make_integer_sequence<int, kRows>{})(
          packed + r * cols, cols, weights + t * cols * kLanes, scale + t * groups * kLanes,
          group, out + r * out_features + t * kLanes, out_features);
    }
  }
  if (scratch.size() > kKeptScratch) std::vector<float>().swap(scratch);  // a prefill's
}

}  // extern "C"
