// Scalar arithmetic shared by pagoda's CPU kernels, included by their sources (a build's
// cache key covers it: pagoda/layers/cpu_kernels.py).
#pragma once

#include <stdint.h>
#include <string.h>

#include <cmath>
#include <limits>

// e^x in float32, in plain arithmetic the compiler vectorizes (std::exp is a scalar call):
// x = n ln 2 + r with |r| <= ln 2 / 2 (ln 2 in two parts, so r is exact to float32), e^r by
// its Taylor series to r^6 (relative error under 2e-7), times 2^n from the exponent bits.
// x is clamped to [-87, 88]: below, about 1e-38 (e^x under float32's least normal); above,
// about 1.6e38.
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

// A float16's value from its bits (subnormals, infinities and NaN included).
inline float from_float16(uint16_t bits) {
  const float sign = bits & 0x8000 ? -1.0f : 1.0f;
  const int exponent = (bits >> 10) & 0x1F, mantissa = bits & 0x3FF;
  if (exponent == 0x1F)
    return mantissa ? std::numeric_limits<float>::quiet_NaN()
                    : sign * std::numeric_limits<float>::infinity();
  if (exponent == 0) return sign * std::ldexp(static_cast<float>(mantissa), -24);
  return sign * std::ldexp(static_cast<float>(1024 + mantissa), exponent - 25);
}
