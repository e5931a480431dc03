// Helpers shared by the CPU kernels: fp32 <-> fp16/bf16 scalar conversions, a dispatch from the
// dtype tag, and an accurate fp32 sum. The conversions use integer bit operations, so the build
// needs no compiler support for _Float16 or __bf16; both directions round to nearest even, keep
// infinities and keep NaNs quiet, like torch.
#pragma once
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "cascade_rt.h"

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
  if (a > 0x7f800000u) return {static_cast<uint16_t>(sign | 0x7e00u)};  // NaN
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
    case kFloat32: f(float{}); break;
    case kFloat16: f(Half{}); break;
    case kBFloat16: f(BFloat16{}); break;
    default: throw std::invalid_argument(std::string(op) + ": unsupported dtype tag");
  }
}

// Sum of v[0, n) in fp32: 8 interleaved lanes within blocks of 256 elements, block sums added in
// order. The rounding error grows like 32 + n / 256 ulps instead of n for one running sum, and the
// fixed order vectorises without -ffast-math.
inline float accurate_sum(const float* v, int64_t n) {
  float total = 0.f;
  for (int64_t b = 0; b < n; b += 256) {
    const int64_t e = b + 256 < n ? b + 256 : n;
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    int64_t j = b;
    for (; j + 8 <= e; j += 8) {
      for (int k = 0; k < 8; ++k) acc[k] += v[j + k];
    }
    for (; j < e; ++j) acc[(j - b) & 7] += v[j];  // fewer than 8 left
    total += ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
  }
  return total;
}

}  // namespace cascade_rt
