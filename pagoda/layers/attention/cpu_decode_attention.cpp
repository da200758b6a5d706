// Decode attention on CPU: one query token per sequence against its cached keys and values,
// read where they lie in the paged cache (no gather into a padded copy), float32, bfloat16
// or float8 (E4M3, E5M2; their scales applied by the caller) caches. One task per sequence
// (or per part of its KV heads, where sequences are few) computes its heads' attention
// block by block of the cache with a running softmax (each block: the scores, the running
// maximum and sum rescaled, the values' weighted sum), all in float32. The loops over a
// head's dimension are written for the compiler to vectorize: pagoda builds this source
// with AVX-512 flags, with AVX2 flags and with none (cpu_decode_attention.py), and the CPU
// picks the build it runs. The AVX-512 build takes runs of 16 cached rows with intrinsics
// where a head's dimension is 64, 128 or 256: the 16 scores without a horizontal sum per
// row, and the weighted values with the sums in registers.

#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../cpu_math.h"

namespace {

// Float8 cache elements: a byte each, E4M3 (NaN only at 0x7F and 0xFF) or E5M2 (a float16's
// upper byte).
struct E4M3 {
  uint8_t bits;
};
struct E5M2 {
  uint8_t bits;
};

inline float as_float(float value) { return value; }

inline float as_float(uint16_t bfloat16) {
  uint32_t bits = static_cast<uint32_t>(bfloat16) << 16;
  float value;
  memcpy(&value, &bits, sizeof(value));
  return value;
}

// Every byte's value, as the AVX-512 build decodes it: E4M3's bits sign-extended to 16 and
// shifted left by 7, bit 14 cleared, are the float16 of its value / 2^8 (so its NaN bytes
// read as -+480, which a cache written from finite values does not hold); E5M2's bits
// shifted left by 8 are the float16 of its value.
struct Float8Tables {
  float e4m3[256], e5m2[256];
  Float8Tables() {
    for (int byte = 0; byte < 256; ++byte) {
      const uint16_t widened = static_cast<uint16_t>(static_cast<int8_t>(byte)) << 7;
      e4m3[byte] = 256.0f * from_float16(widened & 0xBFFF);
      e5m2[byte] = from_float16(static_cast<uint16_t>(byte << 8));
    }
  }
};
const Float8Tables kFloat8;

inline float as_float(E4M3 value) { return kFloat8.e4m3[value.bits]; }
inline float as_float(E5M2 value) { return kFloat8.e5m2[value.bits]; }

constexpr int64_t kPrefetchBlocks = 2;  // how many blocks ahead a task asks for its rows

struct Cache {
  const void* keys;
  const void* values;
  int64_t slot_stride;  // elements between consecutive slots
  int64_t head_stride;  // elements between a slot's KV heads
};

struct Task {
  const float* q;        // [heads, dim]: the query heads of KV heads [kv_first, kv_end)
  const int32_t* table;  // the sequence's blocks
  int64_t first, end;    // the visible positions [first, end)
  int64_t kv_first, kv_end;
  float* out;            // [heads, dim]
};

// A head's dimension: DIM when it is one of the sizes compiled for (the loops then unroll
// and a head's running sum stays in registers), else `dim`.
template <int DIM>
struct Width {
  int64_t dim;
  constexpr int64_t operator()() const { return DIM > 0 ? DIM : dim; }
};

#if defined(__AVX512F__)

inline __m512 load16(const float* at) { return _mm512_loadu_ps(at); }
inline __m512 load16(const uint16_t* bfloat16) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bfloat16));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}
inline __m256i load16_bytes(const void* at) {
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(static_cast<const __m128i*>(at)));
}
inline __m512 load16(const E4M3* at) {  // as Float8Tables: float16s of the values / 2^8
  const __m256i halves = _mm256_and_si256(_mm256_slli_epi16(load16_bytes(at), 7),
                                          _mm256_set1_epi16(static_cast<int16_t>(0xBFFF)));
  return _mm512_mul_ps(_mm512_cvtph_ps(halves), _mm512_set1_ps(256.0f));
}
inline __m512 load16(const E5M2* at) {
  return _mm512_cvtph_ps(_mm256_slli_epi16(load16_bytes(at), 8));
}

// Lane i of the result: the sum of p[i]'s 16 lanes. Pairs of vectors are folded into one at
// each step (their two halves' sums side by side), 16 -> 8 -> 4 -> 2 -> 1, which leaves row
// 4e + l's sum in lane 4l + e; a last permutation puts it in lane 4e + l. 45 shuffles and
// adds for 16 rows, where one horizontal sum a row takes 9 or more.
inline __m512 lane_sums(const __m512 p[16]) {
  __m512 halves[8], quarters[4], eighths[2];
  for (int j = 0; j < 8; ++j)  // 128-bit lanes 0-1: row 2j's partial sums, 2-3: row 2j + 1's
    halves[j] = _mm512_add_ps(_mm512_shuffle_f32x4(p[2 * j], p[2 * j + 1], 0x44),
                              _mm512_shuffle_f32x4(p[2 * j], p[2 * j + 1], 0xEE));
  for (int j = 0; j < 4; ++j)  // 128-bit lane l: row 4j + l's
    quarters[j] = _mm512_add_ps(_mm512_shuffle_f32x4(halves[2 * j], halves[2 * j + 1], 0x88),
                                _mm512_shuffle_f32x4(halves[2 * j], halves[2 * j + 1], 0xDD));
  for (int j = 0; j < 2; ++j)  // lane l, elements 0-1: row 8j + l's, 2-3: row 8j + 4 + l's
    eighths[j] = _mm512_add_ps(_mm512_shuffle_ps(quarters[2 * j], quarters[2 * j + 1], 0x44),
                               _mm512_shuffle_ps(quarters[2 * j], quarters[2 * j + 1], 0xEE));
  const __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(eighths[0], eighths[1], 0x88),
                                    _mm512_shuffle_ps(eighths[0], eighths[1], 0xDD));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, sums);
}

// q's dot products with 16 rows of keys (rows `stride` apart; DIM a multiple of 16), scaled:
// each row's multiply-adds in a 16-lane vector, the 16 vectors' sums by lane_sums.
template <typename T, int DIM>
inline void sixteen_dots(const float* q, const T* keys, int64_t stride, float scale,
                         float* scores) {
  __m512 partial[16];
  for (int i = 0; i < 16; ++i) {
    const T* k = keys + i * stride;
    __m512 sum = _mm512_mul_ps(load16(q), load16(k));
    for (int d = 16; d < DIM; d += 16) sum = _mm512_fmadd_ps(load16(q + d), load16(k + d), sum);
    partial[i] = sum;
  }
  _mm512_storeu_ps(scores, _mm512_mul_ps(lane_sums(partial), _mm512_set1_ps(scale)));
}

// acc[0..DIM) + the sum over 16 rows of values (rows `stride` apart; DIM a multiple of 16)
// times their weights, with acc in registers: even and odd rows in separate sums (twice the
// independent chains of multiply-adds).
template <typename T, int DIM>
inline void sixteen_weighted_rows(float* acc, const float* weights, const T* values,
                                  int64_t stride) {
  constexpr int kVectors = DIM / 16;
  __m512 even[kVectors], odd[kVectors];
  for (int c = 0; c < kVectors; ++c) {
    even[c] = load16(acc + 16 * c);
    odd[c] = _mm512_setzero_ps();
  }
  for (int i = 0; i < 16; i += 2) {
    const T *v0 = values + i * stride, *v1 = v0 + stride;
    const __m512 w0 = _mm512_set1_ps(weights[i]), w1 = _mm512_set1_ps(weights[i + 1]);
    for (int c = 0; c < kVectors; ++c) {
      even[c] = _mm512_fmadd_ps(w0, load16(v0 + 16 * c), even[c]);
      odd[c] = _mm512_fmadd_ps(w1, load16(v1 + 16 * c), odd[c]);
    }
  }
  for (int c = 0; c < kVectors; ++c) _mm512_storeu_ps(acc + 16 * c, _mm512_add_ps(even[c], odd[c]));
}

#endif

// q's dot products with `count` rows of keys (rows `stride` apart): 16 rows at a time where
// the AVX-512 build knows the head's dimension, then four rows at a time (four independent
// sums: one sum's chain of multiply-adds would wait on each one's latency)
template <typename T, int DIM>
inline void dots(const float* q, const T* keys, int64_t stride, int64_t count, float scale,
                 float* scores, Width<DIM> width) {
  int64_t i = 0;
#if defined(__AVX512F__)
  if constexpr (DIM > 0 && DIM % 16 == 0) {
    for (; i + 16 <= count; i += 16)
      sixteen_dots<T, DIM>(q, keys + i * stride, stride, scale, scores + i);
  }
#endif
  for (; i + 4 <= count; i += 4) {
    const T *k0 = keys + i * stride, *k1 = k0 + stride, *k2 = k1 + stride, *k3 = k2 + stride;
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t d = 0; d < width(); ++d) {
      s0 += q[d] * as_float(k0[d]);
      s1 += q[d] * as_float(k1[d]);
      s2 += q[d] * as_float(k2[d]);
      s3 += q[d] * as_float(k3[d]);
    }
    scores[i] = scale * s0;
    scores[i + 1] = scale * s1;
    scores[i + 2] = scale * s2;
    scores[i + 3] = scale * s3;
  }
  for (; i < count; ++i) {
    const T* k = keys + i * stride;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t d = 0; d < width(); ++d) sum += q[d] * as_float(k[d]);
    scores[i] = scale * sum;
  }
}

// acc += sum over i of weights[i] * row i of `values` (rows `stride` apart); acc shares no
// memory with them (so the compiler keeps it in registers across the rows)
template <typename T, int DIM>
inline void add_weighted_rows(float* __restrict acc, const float* __restrict weights,
                              const T* __restrict values, int64_t stride, int64_t count,
                              Width<DIM> width) {
  int64_t i = 0;
#if defined(__AVX512F__)
  if constexpr (DIM > 0 && DIM % 16 == 0) {
    for (; i + 16 <= count; i += 16)
      sixteen_weighted_rows<T, DIM>(acc, weights + i, values + i * stride, stride);
  }
#endif
  for (; i < count; ++i) {
    const T* v = values + i * stride;
#pragma omp simd
    for (int64_t d = 0; d < width(); ++d) acc[d] += weights[i] * as_float(v[d]);
  }
}

// One block's scores of one query head: e^(s - the running maximum), with the running
// maximum, total and weighted sum `acc` moved to the block's maximum first.
template <int DIM>
inline void softmax_step(float* scores, int64_t count, float* largest, float* total,
                         float* acc, Width<DIM> width) {
  float high = *largest;
#pragma omp simd reduction(max : high)
  for (int64_t i = 0; i < count; ++i) high = scores[i] > high ? scores[i] : high;
  const float shrink = exp_approx(*largest - high);  // ~0 on the first block
  *largest = high;
#pragma omp simd
  for (int64_t d = 0; d < width(); ++d) acc[d] *= shrink;
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < count; ++i) {
    scores[i] = exp_approx(scores[i] - high);
    sum += scores[i];
  }
  *total = *total * shrink + sum;
}

// Asks for the cache lines of `rows` rows of `kv_heads` KV heads from `first` on (rows
// `slot_stride` apart, heads `head_stride`) to be fetched into the L2 cache: a later block's
// keys and values while this block's are used (blocks lie anywhere in the cache, so the
// hardware's own prefetchers cannot guess the next one; into L1 they would evict the rows
// in use).
template <typename T>
inline void prefetch_rows(const T* first, int64_t rows, int64_t kv_heads, const Cache& cache,
                          int64_t dim) {
  constexpr int64_t kLine = 64 / sizeof(T);  // elements per cache line
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t h = 0; h < kv_heads; ++h) {
      const T* row = first + i * cache.slot_stride + h * cache.head_stride;
      for (int64_t d = 0; d < dim; d += kLine) __builtin_prefetch(row + d, 0, 2);
    }
}

// One task: for each of its query heads (`group` per KV head), softmax(q k^T scale) v over
// the visible positions, a block of the cache at a time (a block's rows of every KV head of
// the task in turn, so that its memory is read while it is near).
template <typename T, int DIM>
void attend(const Cache& cache, const Task& task, int64_t group, Width<DIM> width,
            int64_t block_size, float scale) {
  const int64_t dim = width(), kv_heads = task.kv_end - task.kv_first;
  const int64_t heads = kv_heads * group;
  const T* keys = static_cast<const T*>(cache.keys) + task.kv_first * cache.head_stride;
  const T* values = static_cast<const T*>(cache.values) + task.kv_first * cache.head_stride;
  std::vector<float> scores(heads * block_size);
  std::vector<float> largest(heads, -std::numeric_limits<float>::infinity());
  std::vector<float> total(heads, 0.0f);
  std::vector<float> acc(heads * dim, 0.0f);
  for (int64_t start = task.first; start < task.end;) {
    const int64_t block = start / block_size;
    const int64_t stop = std::min(task.end, (block + 1) * block_size);
    const int64_t count = stop - start;
    const int64_t slot = int64_t(task.table[block]) * block_size + start % block_size;
    // the blocks kPrefetchBlocks on (at the first block, every block up to there)
    const int64_t nearest = start == task.first ? 1 : kPrefetchBlocks;
    for (int64_t ahead = nearest; ahead <= kPrefetchBlocks; ++ahead) {
      const int64_t from = (block + ahead) * block_size;
      if (from >= task.end) break;
      const int64_t rows = std::min(block_size, task.end - from);
      const int64_t first_slot = int64_t(task.table[block + ahead]) * block_size;
      prefetch_rows(keys + first_slot * cache.slot_stride, rows, kv_heads, cache, dim);
      prefetch_rows(values + first_slot * cache.slot_stride, rows, kv_heads, cache, dim);
    }
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t at = slot * cache.slot_stride + (h / group) * cache.head_stride;
      float* s = &scores[h * block_size];
      float* a = &acc[h * dim];
      dots(task.q + h * dim, keys + at, cache.slot_stride, count, scale, s, width);
      softmax_step(s, count, &largest[h], &total[h], a, width);
      add_weighted_rows(a, s, values + at, cache.slot_stride, count, width);
    }
    start = stop;
  }
  for (int64_t h = 0; h < heads; ++h) {
    const float inverse = total[h] > 0.0f ? 1.0f / total[h] : 0.0f;
    for (int64_t d = 0; d < dim; ++d) task.out[h * dim + d] = acc[h * dim + d] * inverse;
  }
}

template <typename T>
void attend_any_width(const Cache& cache, const Task& task, int64_t group, int64_t dim,
                      int64_t block_size, float scale) {
  switch (dim) {
    case 64: return attend<T>(cache, task, group, Width<64>{dim}, block_size, scale);
    case 128: return attend<T>(cache, task, group, Width<128>{dim}, block_size, scale);
    case 256: return attend<T>(cache, task, group, Width<256>{dim}, block_size, scale);
    default: return attend<T>(cache, task, group, Width<0>{dim}, block_size, scale);
  }
}

}  // namespace

extern "C" {

int pagoda_decode_attention_supported() {
#if defined(__AVX512F__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f");
#elif defined(__AVX2__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return 1;
#endif
}

// out [n, heads, dim] float32: row r's query q [n, heads, dim] float32 (rows q_stride
// floats apart, heads contiguous) attends to the positions [firsts[r], seq_lens[r]) of its
// sequence, whose position p lies in slot block_tables[r * table_stride + p / block_size] *
// block_size + p % block_size of the caches (cache_type: 0 float32, 1 bfloat16, 2 float8
// E4M3, 3 float8 E5M2; key and value caches share the strides). Query head h reads KV head
// h / (heads / kv_heads).
void pagoda_decode_attention(const float* q, int64_t q_stride, const void* key_cache,
                             const void* value_cache, int cache_type, int64_t slot_stride,
                             int64_t head_stride,
                             const int32_t* block_tables, int64_t table_stride,
                             const int32_t* seq_lens, const int32_t* firsts, int64_t block_size,
                             int64_t n, int64_t heads, int64_t kv_heads, int64_t dim,
                             float scale, float* out, int threads) {
  const Cache cache{key_cache, value_cache, slot_stride, head_stride};
  const int64_t group = heads / kv_heads;
  // a task per sequence, or per part of its KV heads where sequences are fewer than twice
  // the threads (the parts never change a result: each head's sums are its own)
  const int64_t parts = std::min(kv_heads, std::max<int64_t>(1, (2 * threads + n - 1) / n));
#pragma omp parallel for num_threads(threads) schedule(dynamic)
  for (int64_t index = 0; index < n * parts; ++index) {
    const int64_t row = index / parts, part = index % parts;
    const int64_t kv_first = part * kv_heads / parts, kv_end = (part + 1) * kv_heads / parts;
    const int64_t head_offset = kv_first * group * dim;
    const Task task{q + row * q_stride + head_offset, block_tables + row * table_stride,
                    firsts[row], seq_lens[row], kv_first, kv_end,
                    out + row * heads * dim + head_offset};
    switch (cache_type) {
      case 1: attend_any_width<uint16_t>(cache, task, group, dim, block_size, scale); break;
      case 2: attend_any_width<E4M3>(cache, task, group, dim, block_size, scale); break;
      case 3: attend_any_width<E5M2>(cache, task, group, dim, block_size, scale); break;
      default: attend_any_width<float>(cache, task, group, dim, block_size, scale);
    }
  }
}

// cache[slots[t]] = rows[t] for each of `tokens` rows of `width` float32s (rows row_stride
// floats apart, cache slots slot_stride elements apart; cache_type 0 float32, 1 bfloat16,
// rounded to nearest even as torch rounds); a negative slot writes nothing.
void pagoda_store_rows(void* cache, int cache_type, int64_t slot_stride, const int64_t* slots,
                       const float* rows, int64_t tokens, int64_t width, int64_t row_stride) {
  for (int64_t t = 0; t < tokens; ++t) {
    if (slots[t] < 0) continue;
    const float* row = rows + t * row_stride;
    if (cache_type == 1) {
      uint16_t* to = static_cast<uint16_t*>(cache) + slots[t] * slot_stride;
      for (int64_t i = 0; i < width; ++i) {
        uint32_t bits;
        memcpy(&bits, &row[i], sizeof(bits));
        to[i] = std::isnan(row[i]) ? uint16_t(0x7FC0)
                                   : uint16_t((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
      }
    } else {
      memcpy(static_cast<float*>(cache) + slots[t] * slot_stride, row, width * sizeof(float));
    }
  }
}

}  // extern "C"
