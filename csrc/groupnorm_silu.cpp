// groupnorm_silu, CPU: SiLU(GroupNorm(x)) with a per-channel affine, NCHW or channels-last.
// Math, per sample b and group g of Cg = C / G channels (n = Cg * HW elements):
//   mean, var = biased moments of the group;  y = (x - mean) / sqrt(var + eps) * w[c] + bias[c]
//   out = y * sigmoid(y)
// Layout: x, out [B, C, HW] (NCHW) or [B, HW, C] (channels-last), same layout for both, contiguous;
// weight, bias [C] in x's dtype.
// Statistics: each group is cut into fixed chunks (NCHW: kChunk consecutive elements; channels-
// last: kPixels pixels); a chunk's (count, mean, M2) is an exact two-pass over it, and a group's
// chunks are merged pairwise with Chan's formula in a fixed tree. fp32 throughout, never
// E[x^2] - E[x]^2, and the result does not depend on the thread count.
// Parallel: OpenMP over chunks, then over channel planes (NCHW) or pixels (channels-last).
#include <algorithm>
#include <cmath>
#include <vector>

#include "cascade_rt.h"
#include "cpu_util.h"

namespace cascade_rt {
namespace {

constexpr int64_t kChunk = 4096;  // NCHW: elements per partial
constexpr int64_t kPixels = 32;   // channels-last: pixels per partial

struct Moments {
  float n = 0.f, mean = 0.f, m2 = 0.f;
};

// Chan et al.: the moments of the union of two disjoint sets.
inline Moments merge(const Moments& a, const Moments& b) {
  if (b.n == 0.f) return a;
  if (a.n == 0.f) return b;
  const float n = a.n + b.n;
  const float delta = b.mean - a.mean;
  const float w = b.n / n;
  return {n, a.mean + delta * w, a.m2 + b.m2 + delta * delta * a.n * w};
}

// Pairwise over p[0, count): error grows with log(count), not count.
Moments merge_all(const Moments* p, int64_t count) {
  if (count == 1) return p[0];
  const int64_t half = count / 2;
  return merge(merge_all(p, half), merge_all(p + half, count - half));
}

// Moments of v[0, n) by two passes over the values.
Moments moments(const float* v, float* scratch, int64_t n) {
  const float mean = accurate_sum(v, n) / static_cast<float>(n);
  for (int64_t i = 0; i < n; ++i) scratch[i] = (v[i] - mean) * (v[i] - mean);
  return {static_cast<float>(n), mean, accurate_sum(scratch, n)};
}

inline float silu(float y) { return y / (1.f + std::exp(-y)); }

template <typename T>
void run(const T* x, const T* weight, const T* bias, T* out, int64_t b, int64_t c, int64_t hw,
         int64_t groups, bool channels_last, float eps) {
  const int64_t cg = c / groups;
  const int64_t per_group = cg * hw;
  const int64_t chunks =
      channels_last ? (hw + kPixels - 1) / kPixels : (per_group + kChunk - 1) / kChunk;
  const int64_t chunk_elems = channels_last ? kPixels * cg : kChunk;
  std::vector<Moments> partial(static_cast<size_t>(b * groups * chunks));  // [B, G, chunks]
#pragma omp parallel
  {
    std::vector<float> v(static_cast<size_t>(chunk_elems)), scratch(v.size());
#pragma omp for schedule(static)
    for (int64_t task = 0; task < b * groups * chunks; ++task) {
      const int64_t bg = task / chunks;
      const int64_t t = task % chunks;
      int64_t n = 0;
      if (channels_last) {  // pixels [p0, p1) x the group's cg channels
        const int64_t p1 = std::min(hw, (t + 1) * kPixels);
        const int64_t g = bg % groups;
        for (int64_t p = t * kPixels; p < p1; ++p) {
          const T* row = x + ((bg / groups) * hw + p) * c + g * cg;
          for (int64_t j = 0; j < cg; ++j) v[n++] = to_f32(row[j]);
        }
      } else {  // a contiguous range of the group
        const T* src = x + bg * per_group + t * kChunk;
        n = std::min(per_group - t * kChunk, kChunk);
        for (int64_t i = 0; i < n; ++i) v[i] = to_f32(src[i]);
      }
      partial[task] = moments(v.data(), scratch.data(), n);
    }
  }
  // Per (sample, channel): the group mean and the gain rstd * w[c].
  std::vector<float> mean_c(static_cast<size_t>(b * c)), gain_c(static_cast<size_t>(b * c));
  for (int64_t bg = 0; bg < b * groups; ++bg) {
    const Moments m = merge_all(partial.data() + bg * chunks, chunks);
    const float rstd = 1.f / std::sqrt(std::max(m.m2 / m.n, 0.f) + eps);
    const int64_t s = bg / groups;
    const int64_t g = bg % groups;
    for (int64_t j = g * cg; j < (g + 1) * cg; ++j) {
      mean_c[s * c + j] = m.mean;
      gain_c[s * c + j] = rstd * to_f32(weight[j]);
    }
  }
  if (!channels_last) {
#pragma omp parallel for schedule(static)
    for (int64_t plane = 0; plane < b * c; ++plane) {
      const float mu = mean_c[plane], k = gain_c[plane], beta = to_f32(bias[plane % c]);
      const T* src = x + plane * hw;
      T* dst = out + plane * hw;
      for (int64_t i = 0; i < hw; ++i) dst[i] = from_f32<T>(silu((to_f32(src[i]) - mu) * k + beta));
    }
  } else {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < b * hw; ++r) {
      const float* mu = mean_c.data() + (r / hw) * c;
      const float* k = gain_c.data() + (r / hw) * c;
      const T* src = x + r * c;
      T* dst = out + r * c;
      for (int64_t j = 0; j < c; ++j) {
        dst[j] = from_f32<T>(silu((to_f32(src[j]) - mu[j]) * k[j] + to_f32(bias[j])));
      }
    }
  }
}

}  // namespace

void groupnorm_silu_cpu(const void* x, const void* weight, const void* bias, void* out, int64_t b,
                        int64_t c, int64_t hw, int64_t groups, bool channels_last, float eps,
                        int dtype) {
  if (b * hw == 0) return;
  if (c < 1 || groups < 1 || c % groups != 0) {
    throw std::invalid_argument("groupnorm_silu_cpu: groups must divide C");
  }
  dispatch_dtype(dtype, "groupnorm_silu_cpu", [&](auto tag) {
    using T = decltype(tag);
    run<T>(static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<const T*>(bias),
           static_cast<T*>(out), b, c, hw, groups, channels_last, eps);
  });
}

}  // namespace cascade_rt
