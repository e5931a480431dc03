// groupnorm_silu, CPU: SiLU(GroupNorm(x)) with a per-channel affine, NCHW or channels-last.
// Math, per sample b and group g of Cg = C / G channels (n = Cg * HW elements):
//   mean, var = biased moments of the group;  y = (x - mean) / sqrt(var + eps) * w[c] + bias[c]
//   out = y * sigmoid(y)
// Layout: x, out [B, C, HW] (NCHW) or [B, HW, C] (channels-last), same layout for both, contiguous;
// weight, bias [C] in x's dtype.
// Statistics: each group is cut into fixed chunks (NCHW: kChunk consecutive elements; channels-
// last: kPixels pixels, every group at once along the contiguous channels); a chunk's (count,
// mean, M2) is an exact two-pass over it, and a group's chunks are merged pairwise with Chan's
// formula in a fixed tree. fp32 throughout, never
// E[x^2] - E[x]^2, and the result does not depend on the thread count.
// Parallel: OpenMP over chunks, then over channel planes (NCHW) or pixels (channels-last); the
// per-chunk and per-plane/row loops are CASCADE_RT_SIMD_CLONES functions with cpu_util.h's SiLU.
#if defined(__GNUC__) && !defined(__clang__)
#endif
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

// NCHW: the moments of n consecutive elements, by two passes over them.
template <typename T>
CASCADE_RT_SIMD_CLONES Moments range_moments(const T* __restrict src, int64_t n) {
  const float mean =
      accurate_sum(n, [src](int64_t i) { return to_f32(src[i]); }) / static_cast<float>(n);
  const float m2 = accurate_sum(n, [src, mean](int64_t i) {
    const float d = to_f32(src[i]) - mean;
    return d * d;
  });
  return {static_cast<float>(n), mean, m2};
}

// Channels-last: the moments of every group over np pixels (rows of C), two passes that run
// along the contiguous channels; col and group_mean are [C] scratch. Writes out[g * stride].
template <typename T>
CASCADE_RT_SIMD_CLONES void pixels_moments(const T* __restrict src, int64_t np, int64_t c,
                                           int64_t cg, float* __restrict col,
                                           float* __restrict group_mean, Moments* out,
                                           int64_t stride) {
  const float n = static_cast<float>(np * cg);
  for (int64_t j = 0; j < c; ++j) col[j] = 0.f;
  for (int64_t p = 0; p < np; ++p) {
    for (int64_t j = 0; j < c; ++j) col[j] += to_f32(src[p * c + j]);
  }
  for (int64_t j0 = 0; j0 < c; j0 += cg) {
    const float mean = accurate_sum(cg, [&](int64_t j) { return col[j0 + j]; }) / n;
    for (int64_t j = j0; j < j0 + cg; ++j) group_mean[j] = mean;
  }
  for (int64_t j = 0; j < c; ++j) col[j] = 0.f;
  for (int64_t p = 0; p < np; ++p) {
    for (int64_t j = 0; j < c; ++j) {
      const float d = to_f32(src[p * c + j]) - group_mean[j];
      col[j] += d * d;
    }
  }
  for (int64_t j0 = 0; j0 < c; j0 += cg) {
    out[(j0 / cg) * stride] = {n, group_mean[j0],
                               accurate_sum(cg, [&](int64_t j) { return col[j0 + j]; })};
  }
}

// NCHW: one channel plane, out = silu((x - mean) * gain + bias) with scalar mean, gain, bias.
template <typename T>
CASCADE_RT_SIMD_CLONES void apply_plane(const T* __restrict src, T* __restrict dst, int64_t n,
                                        float mean, float gain, float bias) {
  for (int64_t i = 0; i < n; ++i) dst[i] = from_f32<T>(silu((to_f32(src[i]) - mean) * gain + bias));
}

// Channels-last: one pixel, mean, gain and bias per channel.
template <typename T>
CASCADE_RT_SIMD_CLONES void apply_pixel(const T* __restrict src, T* __restrict dst, int64_t c,
                                        const float* __restrict mean, const float* __restrict gain,
                                        const float* __restrict bias) {
  for (int64_t j = 0; j < c; ++j) {
    dst[j] = from_f32<T>(silu((to_f32(src[j]) - mean[j]) * gain[j] + bias[j]));
  }
}

template <typename T>
void run(const T* x, const T* weight, const T* bias, T* out, int64_t b, int64_t c, int64_t hw,
         int64_t groups, bool channels_last, float eps) {
  const int64_t cg = c / groups;
  const int64_t per_group = cg * hw;
  const int64_t chunks =
      channels_last ? (hw + kPixels - 1) / kPixels : (per_group + kChunk - 1) / kChunk;
  std::vector<Moments> partial(static_cast<size_t>(b * groups * chunks));  // [B, G, chunks]
  if (channels_last) {  // a task: kPixels pixels x all C channels of one sample
#pragma omp parallel
    {
      std::vector<float> col(static_cast<size_t>(c)), group_mean(col.size());
#pragma omp for schedule(static)
      for (int64_t task = 0; task < b * chunks; ++task) {
        const int64_t s = task / chunks;
        const int64_t t = task % chunks;
        const int64_t p0 = t * kPixels;
        pixels_moments(x + (s * hw + p0) * c, std::min(kPixels, hw - p0), c, cg, col.data(),
                       group_mean.data(), &partial[s * groups * chunks + t], chunks);
      }
    }
  } else {  // a task: kChunk consecutive elements of one group
#pragma omp parallel for schedule(static)
    for (int64_t task = 0; task < b * groups * chunks; ++task) {
      const int64_t e0 = (task % chunks) * kChunk;
      const T* src = x + (task / chunks) * per_group + e0;
      partial[task] = range_moments(src, std::min(kChunk, per_group - e0));
    }
  }
  // Per (sample, channel): the group mean and the gain rstd * w[c]; the bias widened once.
  std::vector<float> mean_c(static_cast<size_t>(b * c)), gain_c(mean_c.size()), bias_c(c);
  for (int64_t j = 0; j < c; ++j) bias_c[j] = to_f32(bias[j]);
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
      apply_plane(x + plane * hw, out + plane * hw, hw, mean_c[plane], gain_c[plane],
                  bias_c[plane % c]);
    }
  } else {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < b * hw; ++r) {
      const int64_t s = r / hw;
      apply_pixel(x + r * c, out + r * c, c, &mean_c[s * c], &gain_c[s * c], bias_c.data());
    }
  }
}

}  // namespace

void groupnorm_silu_cpu(const void* x, const void* weight, const void* bias, void* out, int64_t b,
                        int64_t c, int64_t hw, int64_t groups, bool channels_last, float eps,
                        int dtype) {
  if (c < 1 || groups < 1 || c % groups != 0) {
    throw std::invalid_argument("groupnorm_silu_cpu: groups must divide C");
  }
  if (b * hw == 0) return;
  dispatch_dtype(dtype, "groupnorm_silu_cpu", [&](auto tag) {
    using T = decltype(tag);
    run<T>(static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<const T*>(bias),
           static_cast<T*>(out), b, c, hw, groups, channels_last, eps);
  });
}

}  // namespace cascade_rt
