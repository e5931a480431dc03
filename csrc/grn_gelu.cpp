// grn_gelu, CPU: GlobalResponseNorm(GELU(h)) between the two channel-MLP GEMMs of a ResBlock.
// Math (ConvNeXt-V2 GRN on g = GELU(h), exact erf form), per sample b and channel c:
//   S[b,c] = sum_p g[b,p,c]^2;  G = sqrt(S);  N = G / (mean_c G + 1e-6)
//   scale[b,c] = 1 + gamma[c] * N[b,c];   out = g * scale + beta    (= gamma*g*N + beta + g)
// With beta == nullptr the folded form is written instead: out = g and scale only (the caller
// applies scale and beta in its next GEMM, see cascade_rt/ops/grn_gelu.py).
// Layout: h, out contiguous [B, HW, C]; gamma, beta [C] in h's dtype; scale [B, C] fp32.
// Passes: (1) per (sample, tile of kTile pixels) a partial S over the tile, OpenMP over tasks;
// (2) per sample, the partials summed in tile order (so the result does not depend on the thread
// count), the mean over C, the scale; (3) OpenMP over pixels, g recomputed from h (cheaper than
// writing and re-reading it). All accumulation in fp32.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cascade_rt.h"
#include "cpu_util.h"

namespace cascade_rt {
namespace {

constexpr int64_t kTile = 64;  // pixels per partial sum

inline float gelu(float v) { return 0.5f * v * (1.f + std::erf(v * 0.70710678118654752f)); }

template <typename T>
void run(const T* h, const T* gamma, const T* beta, T* out, float* scale, int64_t b, int64_t hw,
         int64_t c) {
  const int64_t tiles = (hw + kTile - 1) / kTile;
  std::vector<float> partial(static_cast<size_t>(b * tiles * c));  // [B, tiles, C]
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < b * tiles; ++task) {
    const int64_t s = task / tiles;
    const int64_t p0 = (task % tiles) * kTile;
    const int64_t p1 = std::min(hw, p0 + kTile);
    float* acc = partial.data() + task * c;
    for (int64_t j = 0; j < c; ++j) acc[j] = 0.f;
    for (int64_t p = p0; p < p1; ++p) {
      const T* hr = h + (s * hw + p) * c;
      T* gr = beta ? nullptr : out + (s * hw + p) * c;
      for (int64_t j = 0; j < c; ++j) {
        const float g = gelu(to_f32(hr[j]));
        acc[j] += g * g;
        if (gr) gr[j] = from_f32<T>(g);
      }
    }
  }
  for (int64_t s = 0; s < b; ++s) {
    float* sc = scale + s * c;
    float total = 0.f;
    for (int64_t j = 0; j < c; ++j) {
      float sum = 0.f;
      for (int64_t t = 0; t < tiles; ++t) sum += partial[(s * tiles + t) * c + j];
      sc[j] = std::sqrt(sum);
      total += sc[j];
    }
    const float inv = 1.f / (total / static_cast<float>(c) + 1e-6f);
    for (int64_t j = 0; j < c; ++j) sc[j] = 1.f + to_f32(gamma[j]) * (sc[j] * inv);
  }
  if (!beta) return;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < b * hw; ++r) {
    const float* sc = scale + (r / hw) * c;
    const T* hr = h + r * c;
    T* orow = out + r * c;
    for (int64_t j = 0; j < c; ++j) {
      orow[j] = from_f32<T>(gelu(to_f32(hr[j])) * sc[j] + to_f32(beta[j]));
    }
  }
}

}  // namespace

void grn_gelu_cpu(const void* h, const void* gamma, const void* beta, void* out, float* scale,
                  int64_t b, int64_t hw, int64_t c, int dtype) {
  if (b * hw == 0) return;
  if (c < 1) throw std::invalid_argument("grn_gelu_cpu: C must be positive");
  dispatch_dtype(dtype, "grn_gelu_cpu", [&](auto tag) {
    using T = decltype(tag);
    run<T>(static_cast<const T*>(h), static_cast<const T*>(gamma), static_cast<const T*>(beta),
           static_cast<T*>(out), scale, b, hw, c);
  });
}

}  // namespace cascade_rt
