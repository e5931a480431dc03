// vq_lookup, CPU: nearest codeword by squared L2 distance.
// Math: dist(n, k) = sum_d (x[n,d] - c[k,d])^2 accumulated in fp32 (the direct form, which does not
// cancel like |x|^2 - 2x.c + |c|^2 does); ties keep the lowest k, as torch.argmin does.
// Layout: x [N, D], codebook [K, D], quantized [N, D] row-major; indices [N] int64.
// Method: the codebook is widened to fp32 and transposed to [D, K] once per call, so the distance
// loop runs over contiguous codewords and vectorises (one SIMD lane per codeword). Codewords go in
// blocks of kBlock: a vector min over the block's distances, then a scan for the first index only
// when the block improves on the running best, which keeps "strictly smaller wins" (lowest index).
// Parallel over rows with OpenMP; Stage A's codebook (4 x 8192 fp32 = 128 KiB) stays in L2.
// Width 4 (Stage A) is compiled with the width fixed so the per-codeword loop unrolls; on x86-64
// with GCC the row search is also cloned for AVX-512 and AVX2, picked at load time.
#include <algorithm>
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

constexpr int64_t kBlock = 256;  // codewords per block: kBlock fp32 distances live in L1

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CASCADE_RT_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CASCADE_RT_SIMD_CLONES
#endif

// Nearest codeword to `row` [d] in the transposed codebook `cbt` [d, k]; `dist` is kBlock floats
// of scratch. kD > 0 fixes the width at compile time; kD == 0 reads it from `d`.
template <int kD>
CASCADE_RT_SIMD_CLONES int64_t nearest(const float* row, const float* cbt, int64_t k, int64_t d,
                                       float* dist) {
  const int64_t width = kD > 0 ? kD : d;
  // A local copy: through `row` the compiler would have to reload x after every store to `dist`.
  float xr[kD > 0 ? kD : kVqMaxDim];
  for (int64_t t = 0; t < width; ++t) xr[t] = row[t];
  float best = std::numeric_limits<float>::infinity();
  int64_t best_k = 0;
  for (int64_t base = 0; base < k; base += kBlock) {
    const int64_t count = std::min(kBlock, k - base);
    const float* c = cbt + base;
    float m = std::numeric_limits<float>::infinity();
#pragma omp simd reduction(min : m)
    for (int64_t j = 0; j < count; ++j) {
      float acc = 0.f;
      for (int64_t t = 0; t < width; ++t) {
        const float diff = xr[t] - c[t * k + j];
        acc += diff * diff;
      }
      dist[j] = acc;
      m = std::min(m, acc);
    }
    // NaN distances never win (as in a scalar `acc < best` scan), so a NaN row maps to index 0.
    if (m < best) {
      best = m;
      int64_t j = 0;
      while (j < count - 1 && dist[j] != m) ++j;
      best_k = base + j;
    }
  }
  return best_k;
}

}  // namespace

void vq_lookup_cpu(const void* x, const void* codebook, int64_t* indices, void* quantized,
                   int64_t n, int64_t k, int64_t d, int dtype) {
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16) {
    throw std::invalid_argument("vq_lookup_cpu: unsupported dtype tag");
  }
  if (d < 1 || d > kVqMaxDim || k < 1) {
    throw std::invalid_argument("vq_lookup_cpu: D must be in [1, kVqMaxDim] and K >= 1");
  }
  const size_t elem = dtype == kFloat32 ? 4 : 2;
  std::vector<float> cb(static_cast<size_t>(k * d));  // [K, D] fp32
  to_float(codebook, cb.data(), k * d, dtype);
  std::vector<float> cbt(static_cast<size_t>(k * d));  // [D, K] fp32
  for (int64_t j = 0; j < k; ++j) {
    for (int64_t t = 0; t < d; ++t) cbt[t * k + j] = cb[j * d + t];
  }

#pragma omp parallel
  {
    std::vector<float> row(static_cast<size_t>(d));  // [D] fp32
    std::vector<float> dist(kBlock);                 // [kBlock] fp32 scratch
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      to_float(static_cast<const char*>(x) + i * d * elem, row.data(), d, dtype);
      const int64_t best_k = d == 4 ? nearest<4>(row.data(), cbt.data(), k, d, dist.data())
                                    : nearest<0>(row.data(), cbt.data(), k, d, dist.data());
      indices[i] = best_k;
      std::memcpy(static_cast<char*>(quantized) + i * d * elem,
                  static_cast<const char*>(codebook) + best_k * d * elem, d * elem);
    }
  }
}

}  // namespace cascade_rt
