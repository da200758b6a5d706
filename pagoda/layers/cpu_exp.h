// e^x in float32 for pagoda's CPU kernels, in plain arithmetic the compiler vectorizes
// (std::exp is a scalar call): x = n ln 2 + r with |r| <= ln 2 / 2 (ln 2 in two parts, so r
// is exact to float32), e^r by its Taylor series to r^6 (relative error under 2e-7), times
// 2^n from the exponent bits. x is clamped to [-87, 88]: below, about 1e-38 (e^x under
// float32's least normal); above, about 1.6e38. Included by the kernels' sources (their
// build's cache key covers it: pagoda/layers/cpu_kernels.py).
#pragma once

#include <stdint.h>
#include <string.h>

inline float exp_approx(float x) {
  x = x > -87.0f ? (x < 88.0f ? x : 88.0f) : -87.0f;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (x * 1.44269504088896341f + shifter) - shifter;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float power;
  memcpy(&power, &bits, sizeof(power));
  return p * power;
}
