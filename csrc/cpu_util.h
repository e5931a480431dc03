// Helpers shared by the CPU kernels: fp32 <-> fp16/bf16 scalar conversions, a dispatch from the
// dtype tag, an accurate fp32 sum, and exp / GELU / SiLU written branch-free so that loops over
// them vectorise (libm's expf and erff are scalar calls). The conversions use integer bit
// operations, so the build needs no compiler support for _Float16 or __bf16; both directions
// round to nearest even, keep infinities and keep NaNs quiet, like torch.
//
// Vectorisation: the build targets baseline x86-64 (SSE2), so the hot loops of each kernel sit in
// functions marked CASCADE_RT_SIMD_CLONES, which GCC compiles three times (AVX-512, AVX2+FMA,
// baseline) and picks from at load time by the CPU's features. Their branch-free selects
// vectorise only when both sides of a condition may be evaluated, which GCC allows under
// -fno-trapping-math, which CMakeLists.txt passes for all C++ sources (no kernel reads the
// floating-point exception flags).
#pragma once
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "cascade_rt.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define CASCADE_RT_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CASCADE_RT_SIMD_CLONES
#endif

namespace cascade_rt {

// Storage types for the 16-bit formats: plain bits, converted through fp32 for all arithmetic.
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

inline float to_f32(float v) { return v; }

inline float to_f32(BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline float to_f32(Half v) {
  const uint32_t sign = (v.bits & 0x8000u) << 16;
  uint32_t exp = (v.bits >> 10) & 0x1fu;
  uint32_t mant = v.bits & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: shift the leading one into the implicit bit
    exp = 127 - 15 + 1;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename T>
T from_f32(float f);

template <>
inline float from_f32<float>(float f) {
  return f;
}

template <>
inline BFloat16 from_f32<BFloat16>(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof(x));
  if ((x & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((x >> 16) | 0x40u)};
  x += 0x7fffu + ((x >> 16) & 1u);
  return {static_cast<uint16_t>(x >> 16)};
}

template <>
inline Half from_f32<Half>(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof(x));
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return {static_cast<uint16_t>(sign | 0x7e00u)};   // NaN
  if (a >= 0x477ff000u) return {static_cast<uint16_t>(sign | 0x7c00u)};  // rounds past 65504
  if (a < 0x38800000u) {  // below 2^-14: a half subnormal (units of 2^-24) or zero
    const uint32_t e = a >> 23;
    if (e < 102) return {static_cast<uint16_t>(sign)};  // below 2^-25: rounds to zero
    const uint32_t mant = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;  // 14..24
    uint32_t r = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (r & 1u))) ++r;
    return {static_cast<uint16_t>(sign | r)};
  }
  uint32_t h = (a >> 13) - (112u << 10);  // rebias the exponent from 127 to 15
  const uint32_t rem = a & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return {static_cast<uint16_t>(sign | h)};
}

// Calls f(T{}) with T the storage type of `dtype`, so one generic lambda serves all three.
template <typename F>
void dispatch_dtype(int dtype, const char* op, F&& f) {
  switch (dtype) {
    case kFloat32:
      f(float{});
      break;
    case kFloat16:
      f(Half{});
      break;
    case kBFloat16:
      f(BFloat16{});
      break;
    default:
      throw std::invalid_argument(std::string(op) + ": unsupported dtype tag");
  }
}

// Sum of value(0) ... value(n - 1) in fp32: 8 interleaved lanes within blocks of 256 terms, block
// sums added in order. The rounding error grows like 32 + n / 256 ulps instead of n for one
// running sum, and the fixed order vectorises without -ffast-math.
template <typename F>
inline float accurate_sum(int64_t n, F&& value) {
  float total = 0.f;
  for (int64_t b = 0; b < n; b += 256) {
    const int64_t e = b + 256 < n ? b + 256 : n;
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    int64_t j = b;
    for (; j + 8 <= e; j += 8) {
      for (int k = 0; k < 8; ++k) acc[k] += value(j + k);
    }
    for (; j < e; ++j) acc[(j - b) & 7] += value(j);  // fewer than 8 left
    total += ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
  }
  return total;
}

// e^-a for a >= 0 (a NaN propagates), within 2 ulp: a = k ln2 + r with |r| <= ln2 / 2
// (Cody-Waite split of ln2), e^-r by its degree-7 Taylor polynomial (truncation below 1e-8),
// 2^-k built in the exponent bits. a is capped at 87, so the result never leaves the normal range.
inline float exp_neg(float a) {
  const float c = a > 87.f ? 87.f : a;
  const float k = (c * 1.44269504088896341f + 12582912.f) - 12582912.f;       // round(c / ln2)
  const float r = (k * 0.693145751953125f - c) + k * 1.428606765330187e-06f;  // -(c - k ln2)
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (127 - static_cast<int32_t>(k)) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// y * sigmoid(y), with e^-|y| so the exponential never overflows.
inline float silu(float y) {
  const float t = exp_neg(y < 0.f ? -y : y);
  const float inv = 1.f / (1.f + t);
  return y * (y >= 0.f ? inv : t * inv);
}

// GELU, exact (erf) form: 0.5 x (1 + erf(z)), z = x / sqrt(2), within 2e-7 * max(1, |gelu|) of
// the float64 value (libm's erff gives 1.2e-7). For |z| < 1, erf(z) = z S(z^2); beyond,
// erfc(|z|) = t exp(P(t) - z^2) with t = 1 / (1 + |z| / 2) (Numerical Recipes' form, refitted:
// S and P are Chebyshev least-squares fits in float64, max fit error 5e-9 and 2e-9), so the
// negative tail 0.5 x erfc(|z|) keeps its relative accuracy instead of cancelling in 1 - erf.
inline float gelu(float x) {
  constexpr float kS[] = {1.128379166e+00f, -3.761262977e-01f, 1.128363465e-01f, -2.685607041e-02f,
                          5.192959800e-03f, -8.053771133e-04f, 8.006950616e-05f};
  constexpr float kP[] = {-1.265527621e+00f, 1.000469467e+00f, 3.687925730e-01f,  1.303695150e-01f,
                          -3.109727712e-01f, 5.595719626e-01f, -1.515907713e+00f, 1.782378321e+00f,
                          -9.324561198e-01f, 1.829265675e-01f};
  const float z = x * 0.70710678118654752f;
  const float a = z < 0.f ? -z : z;
  const float s = a * a;
  float sp = kS[6];
  for (int i = 5; i >= 0; --i) sp = sp * s + kS[i];
  const float erf_small = a * sp;  // erf(a), a < 1
  const float t = 1.f / (1.f + 0.5f * (a > 10.f ? 10.f : a));
  float pp = kP[9];
  for (int i = 8; i >= 0; --i) pp = pp * t + kP[i];
  const float erfc_large = t * exp_neg(s - pp);  // erfc(a), a >= 1
  const float small_pos = 1.f + erf_small, small_neg = 1.f - erf_small;
  const float large_pos = 2.f - erfc_large;
  const float one_plus_erf =
      a < 1.f ? (z >= 0.f ? small_pos : small_neg) : (z >= 0.f ? large_pos : erfc_large);
  return 0.5f * x * one_plus_erf;
}

}  // namespace cascade_rt
