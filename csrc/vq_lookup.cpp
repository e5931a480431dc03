// vq_lookup, CPU: nearest codeword by squared L2 distance.
// Math: dist(n, k) = sum_d (x[n,d] - c[k,d])^2 accumulated in fp32 (the direct form, which does not
// cancel like |x|^2 - 2x.c + |c|^2 does); ties keep the lowest k, as torch.argmin does.
// Layout: x [N, D], codebook [K, D], quantized [N, D] row-major; indices [N] int64.
// Parallel over rows with OpenMP; the codebook (8192 x 4 fp32 = 128 KiB for Stage A) stays in L2.
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

#include "cascade_rt.h"

namespace cascade_rt {
namespace {

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Widens `count` elements of `src` (tagged `dtype`) into fp32.
void to_float(const void* src, float* dst, int64_t count, int dtype) {
  if (dtype == kFloat32) {
    std::memcpy(dst, src, static_cast<size_t>(count) * sizeof(float));
    return;
  }
  const auto* s = static_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < count; ++i) {
    dst[i] = dtype == kBFloat16 ? bf16_to_float(s[i]) : half_to_float(s[i]);
  }
}

}  // namespace

void vq_lookup_cpu(const void* x, const void* codebook, int64_t* indices, void* quantized,
                   int64_t n, int64_t k, int64_t d, int dtype) {
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16) {
    throw std::invalid_argument("vq_lookup_cpu: unsupported dtype tag");
  }
  const size_t elem = dtype == kFloat32 ? 4 : 2;
  std::vector<float> cb(static_cast<size_t>(k * d));  // [K, D] fp32
  to_float(codebook, cb.data(), k * d, dtype);

#pragma omp parallel
  {
    std::vector<float> row(static_cast<size_t>(d));  // [D] fp32
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      to_float(static_cast<const char*>(x) + i * d * elem, row.data(), d, dtype);
      float best = std::numeric_limits<float>::infinity();
      int64_t best_k = 0;
      for (int64_t j = 0; j < k; ++j) {
        const float* c = cb.data() + j * d;
        float acc = 0.f;
        for (int64_t t = 0; t < d; ++t) {
          const float diff = row[t] - c[t];
          acc += diff * diff;
        }
        if (acc < best) {
          best = acc;
          best_k = j;
        }
      }
      indices[i] = best_k;
      std::memcpy(static_cast<char*>(quantized) + i * d * elem,
                  static_cast<const char*>(codebook) + best_k * d * elem, d * elem);
    }
  }
}

}  // namespace cascade_rt
