// grn_gelu, CPU: GlobalResponseNorm(GELU(h)) between the two channel-MLP GEMMs of a ResBlock.
// Math (ConvNeXt-V2 GRN on g = GELU(h), exact erf form), per sample b and channel c:
//   S[b,c] = sum_p g[b,p,c]^2;  G = sqrt(S);  N = G / (mean_c G + 1e-6)
//   scale[b,c] = 1 + gamma[c] * N[b,c];   out = g * scale + beta    (= gamma*g*N + beta + g)
// With beta == nullptr the folded form is written instead: out = g and scale only (the caller
// applies scale and beta in its next GEMM, see cascade_rt/ops/grn_gelu.py).
// Layout: h, out contiguous [B, HW, C]; gamma, beta [C] in h's dtype; scale [B, C] fp32.
// Passes: (1) per (sample, tile of kTile pixels) a partial S, OpenMP over tiles; (2) per sample,
// the partials summed in tile order (so the result does not depend on the thread count), the
// mean over C (accurate_sum), the scale; (3) OpenMP over pixels, g recomputed from h (cheaper than
// writing and re-reading it). fp32 throughout; GELU is cpu_util.h's vectorisable form and the
// per-pixel loops are CASCADE_RT_SIMD_CLONES functions.
#if defined(__GNUC__) && !defined(__clang__)
#endif
#include <algorithm>
#include <cmath>
#include <vector>

#include "cascade_rt.h"
#include "cpu_util.h"

namespace cascade_rt {
namespace {

constexpr int64_t kTile = 64;  // pixels per partial sum

// acc[c] += GELU(h[p, c])^2 over n pixels of c channels; g (if not null) receives GELU(h).
template <typename T>
CASCADE_RT_SIMD_CLONES void tile_sums(const T* __restrict h, T* __restrict g, float* __restrict acc,
                                      int64_t n, int64_t c) {
  for (int64_t j = 0; j < c; ++j) acc[j] = 0.f;
  for (int64_t p = 0; p < n; ++p) {
    const T* hr = h + p * c;
    if (g) {
      T* gr = g + p * c;
      for (int64_t j = 0; j < c; ++j) {
        const float v = gelu(to_f32(hr[j]));
        acc[j] += v * v;
        gr[j] = from_f32<T>(v);
      }
    } else {
      for (int64_t j = 0; j < c; ++j) {
        const float v = gelu(to_f32(hr[j]));
        acc[j] += v * v;
      }
    }
  }
}

template <typename T>
CASCADE_RT_SIMD_CLONES void apply_row(const T* __restrict h, const float* __restrict scale,
                                      const T* __restrict beta, T* __restrict out, int64_t c) {
  for (int64_t j = 0; j < c; ++j) {
    out[j] = from_f32<T>(gelu(to_f32(h[j])) * scale[j] + to_f32(beta[j]));
  }
}

template <typename T>
void run(const T* h, const T* gamma, const T* beta, T* out, float* scale, int64_t b, int64_t hw,
         int64_t c) {
  const int64_t tiles = (hw + kTile - 1) / kTile;
  std::vector<float> partial(static_cast<size_t>(b * tiles * c));  // [B, tiles, C]
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < b * tiles; ++task) {
    const int64_t s = task / tiles;
    const int64_t p0 = (task % tiles) * kTile;
    const int64_t offset = (s * hw + p0) * c;
    tile_sums(h + offset, beta ? nullptr : out + offset, partial.data() + task * c,
              std::min(kTile, hw - p0), c);
  }
  for (int64_t s = 0; s < b; ++s) {
    float* sc = scale + s * c;
    for (int64_t j = 0; j < c; ++j) {
      float sum = 0.f;
      for (int64_t t = 0; t < tiles; ++t) sum += partial[(s * tiles + t) * c + j];
      sc[j] = std::sqrt(sum);
    }
    const float total = accurate_sum(c, [sc](int64_t j) { return sc[j]; });
    const float inv = 1.f / (total / static_cast<float>(c) + 1e-6f);
    for (int64_t j = 0; j < c; ++j) sc[j] = 1.f + to_f32(gamma[j]) * (sc[j] * inv);
  }
  if (!beta) return;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < b * hw; ++r)
    apply_row(h + r * c, scale + (r / hw) * c, beta, out + r * c, c);
}

}  // namespace

void grn_gelu_cpu(const void* h, const void* gamma, const void* beta, void* out, float* scale,
                  int64_t b, int64_t hw, int64_t c, int dtype) {
  if (c < 1) throw std::invalid_argument("grn_gelu_cpu: C must be positive");
  if (b * hw == 0) return;
  dispatch_dtype(dtype, "grn_gelu_cpu", [&](auto tag) {
    using T = decltype(tag);
    run<T>(static_cast<const T*>(h), static_cast<const T*>(gamma), static_cast<const T*>(beta),
           static_cast<T*>(out), scale, b, hw, c);
  });
}

}  // namespace cascade_rt
