// pagoda's fused CPU layers in float32: the residual add with RMSNorm (or RMSNorm of each
// head of q or k), RoPE in place on q and k, and the gated activations (SiLU or GELU's tanh
// form of the gate, times up). Each does in one pass over a row what the torch path does in
// two to eight operator calls (a dispatch and a pass over memory each). Built by
// pagoda/layers/cpu_fused.py with -ffp-contract=off, which keeps the compiler from
// contracting a * b + c into one fused multiply-add: RoPE's products round as torch's do;
// the norm's sum of squares is added in another order than torch's mean, so it may differ
// in the last bit.
#include <cmath>
#include <cstdint>
#include <omp.h>

#include "cpu_math.h"

namespace {

constexpr int64_t kLanes = 16;            // partial sums per row: a vector register's floats
constexpr int64_t kRowsPerThread = 16;    // fewer rows a thread than this run on one thread

int threads_for(int64_t rows, int threads) {
  int64_t wanted = rows / kRowsPerThread;
  if (wanted < 1) return 1;
  return wanted < threads ? static_cast<int>(wanted) : threads;
}

float sum_of_squares(const float* h, int64_t cols) {
  float lanes[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= cols; c += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += h[c + l] * h[c + l];
  }
  for (int64_t l = 0; c < cols; ++c, ++l) lanes[l] += h[c] * h[c];
  float total = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

inline float silu(float x) { return x / (1.0f + exp_approx(-x)); }

// GELU's tanh form: x / 2 (1 + tanh(u)) = x / (1 + e^{-2u}), u = sqrt(2 / pi)
// (x + 0.044715 x^3) (the second form keeps its precision where the result is near 0).
inline float gelu_tanh(float x) {
  const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  return x / (1.0f + exp_approx(-2.0f * u));
}

template <float (*ACTIVATION)(float)>
void gated(const float* x, int64_t tokens, int64_t width, int64_t x_stride, float* out,
           int threads) {
#pragma omp parallel for num_threads(threads_for(tokens, threads)) schedule(static)
  for (int64_t t = 0; t < tokens; ++t) {
    const float* gate = x + t * x_stride;
    const float* up = gate + width;
    float* o = out + t * width;
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) o[i] = ACTIVATION(gate[i]) * up[i];
  }
}

}  // namespace

extern "C" {

int pagoda_fused_supported() {
#if defined(__AVX512F__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f");
#elif defined(__AVX2__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2");
#else
  return 1;
#endif
}

// out[r] = h / sqrt(mean(h^2) + eps) * weight with h = x[r] + residual[r] (x[r] without a
// residual), and residual_out[r] = h where a residual is given; every array [rows, cols].
void pagoda_add_rms_norm(const float* x, const float* residual, const float* weight,
                         int64_t rows, int64_t cols, float eps, float* out, float* residual_out,
                         int threads) {
#pragma omp parallel for num_threads(threads_for(rows, threads)) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * cols;
    float* o = out + r * cols;
    const float* h = xr;
    if (residual != nullptr) {
      float* sum = residual_out + r * cols;
      const float* res = residual + r * cols;
      for (int64_t c = 0; c < cols; ++c) sum[c] = xr[c] + res[c];
      h = sum;
    }
    float inv = 1.0f / std::sqrt(sum_of_squares(h, cols) / static_cast<float>(cols) + eps);
    for (int64_t c = 0; c < cols; ++c) o[c] = (h[c] * inv) * weight[c];
  }
}

// out [tokens, heads, cols] = each head of x normed as pagoda_add_rms_norm norms a row
// without a residual; x's heads lie contiguously within a token, its tokens token_stride
// floats apart (q or k as a view of a qkv row).
void pagoda_rms_norm_heads(const float* x, int64_t tokens, int64_t heads, int64_t cols,
                           int64_t token_stride, const float* weight, float eps, float* out,
                           int threads) {
  const int64_t rows = tokens * heads;
#pragma omp parallel for num_threads(threads_for(rows, threads)) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* h = x + (r / heads) * token_stride + (r % heads) * cols;
    float* o = out + r * cols;
    float inv = 1.0f / std::sqrt(sum_of_squares(h, cols) / static_cast<float>(cols) + eps);
    for (int64_t c = 0; c < cols; ++c) o[c] = (h[c] * inv) * weight[c];
  }
}

// Rotate-half RoPE in place on the first rotary_dim dimensions of each head of q [tokens,
// q_heads, head_dim] and k [tokens, k_heads, head_dim] (heads contiguous within a token,
// tokens q_stride and k_stride floats apart) at positions[t]; cos_sin rows are
// [cos (rotary_dim / 2) | sin (rotary_dim / 2)], cache_stride floats apart.
void pagoda_rope(const int64_t* positions, float* q, float* k, const float* cos_sin,
                 int64_t tokens, int64_t q_heads, int64_t k_heads, int64_t head_dim,
                 int64_t rotary_dim, int64_t q_stride, int64_t k_stride, int64_t cache_stride,
                 int threads) {
  const int64_t half = rotary_dim / 2;
#pragma omp parallel for num_threads(threads_for(tokens, threads)) schedule(static)
  for (int64_t t = 0; t < tokens; ++t) {
    const float* cos = cos_sin + positions[t] * cache_stride;
    const float* sin = cos + half;
    for (int64_t which = 0; which < 2; ++which) {
      float* base = which == 0 ? q + t * q_stride : k + t * k_stride;
      const int64_t heads = which == 0 ? q_heads : k_heads;
      for (int64_t h = 0; h < heads; ++h) {
        float* x1 = base + h * head_dim;
        float* x2 = x1 + half;
        for (int64_t i = 0; i < half; ++i) {
          float a = x1[i], b = x2[i];
          float first = a * cos[i] - b * sin[i];
          float second = b * cos[i] + a * sin[i];
          x1[i] = first;
          x2[i] = second;
        }
      }
    }
  }
}

// out [tokens, width] = silu(gate) * up, where token t's row of x (x_stride floats apart) is
// [gate (width) | up (width)].
void pagoda_silu_and_mul(const float* x, int64_t tokens, int64_t width, int64_t x_stride,
                         float* out, int threads) {
  gated<silu>(x, tokens, width, x_stride, out, threads);
}

// The same with GELU's tanh approximation (Gemma's gelu_pytorch_tanh) for silu.
void pagoda_gelu_tanh_and_mul(const float* x, int64_t tokens, int64_t width,
                              int64_t x_stride, float* out, int threads) {
  gated<gelu_tanh>(x, tokens, width, x_stride, out, threads);
}

}  // extern "C"
