// layernorm2d, CPU: LayerNorm over the channel (last) dim of channels-last activations, no affine,
// fused with the neighbours it has in the blocks (cascade_rt/ops/layernorm2d.py has the API).
// Math, per row r of C channels, sample s = r / rows_per_sample:
//   m = x[r] (+ residual[r])                     residual add (ResBlock output + its input)
//   m = m * (1 + scale[s]) + shift[s]            TimestepBlock modulation; pre[r] = m
//   out[r] = (m - mean) / sqrt(var + eps)        biased variance, two passes over the row
//   out[r] = out[r] * (1 + post_scale) + post_shift   Stage A's scalar form
// Layout: x, residual, out, pre contiguous [rows, C]; scale/shift rows of C at unit stride,
// mod_stride elements apart (0 broadcasts one row to every sample); post_* are single elements.
// Accumulation: fp32, the row widened once into a per-thread buffer; mean and variance are two
// passes over it, each an accurate_sum (cpu_util.h).
// Parallel: OpenMP over rows; each row in a CASCADE_RT_SIMD_CLONES function. Limits: none on C.
#if defined(__GNUC__) && !defined(__clang__)
#endif
#include <cmath>
#include <vector>

#include "cascade_rt.h"
#include "cpu_util.h"

namespace cascade_rt {
namespace {

template <typename T>
struct Args {
  const T *x, *residual, *scale, *shift;
  int64_t mod_stride;
  T *out, *pre;
  int64_t rows_per_sample, c;
  float eps, post_scale, post_shift;
};

// One row; m is [C] fp32 scratch.
template <typename T>
CASCADE_RT_SIMD_CLONES void row(const Args<T>& a, int64_t r, float* __restrict m) {
  const int64_t c = a.c;
  const T* xr = a.x + r * c;
  for (int64_t j = 0; j < c; ++j) m[j] = to_f32(xr[j]);
  if (a.residual) {
    const T* rr = a.residual + r * c;
    for (int64_t j = 0; j < c; ++j) m[j] += to_f32(rr[j]);
  }
  if (a.scale) {
    const int64_t s = r / a.rows_per_sample;
    const T* sc = a.scale + s * a.mod_stride;
    const T* sh = a.shift + s * a.mod_stride;
    for (int64_t j = 0; j < c; ++j) m[j] = m[j] * (1.f + to_f32(sc[j])) + to_f32(sh[j]);
  }
  if (a.pre) {
    T* pr = a.pre + r * c;
    for (int64_t j = 0; j < c; ++j) pr[j] = from_f32<T>(m[j]);
  }
  const float mean = accurate_sum(c, [m](int64_t j) { return m[j]; }) / static_cast<float>(c);
  const float var =
      accurate_sum(c, [m, mean](int64_t j) { return (m[j] - mean) * (m[j] - mean); }) /
      static_cast<float>(c);
  const float gain = (1.f + a.post_scale) / std::sqrt(var + a.eps);
  T* o = a.out + r * c;
  for (int64_t j = 0; j < c; ++j) o[j] = from_f32<T>((m[j] - mean) * gain + a.post_shift);
}

template <typename T>
void run(const Args<T>& a, int64_t rows) {
#pragma omp parallel
  {
    std::vector<float> m(static_cast<size_t>(a.c));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) row(a, r, m.data());
  }
}

}  // namespace

void layernorm2d_cpu(const void* x, const void* residual, const void* scale, const void* shift,
                     int64_t mod_stride, const void* post_scale, const void* post_shift, void* out,
                     void* pre, int64_t rows, int64_t rows_per_sample, int64_t c, float eps,
                     int dtype) {
  if (c < 1 || rows_per_sample < 1) throw std::invalid_argument("layernorm2d_cpu: bad sizes");
  if ((scale == nullptr) != (shift == nullptr) ||
      (post_scale == nullptr) != (post_shift == nullptr)) {
    throw std::invalid_argument("layernorm2d_cpu: scale/shift and post_scale/post_shift pair up");
  }
  if (rows == 0) return;
  dispatch_dtype(dtype, "layernorm2d_cpu", [&](auto tag) {
    using T = decltype(tag);
    const auto* ps = static_cast<const T*>(post_scale);
    const auto* pb = static_cast<const T*>(post_shift);
    const Args<T> a{static_cast<const T*>(x),
                    static_cast<const T*>(residual),
                    static_cast<const T*>(scale),
                    static_cast<const T*>(shift),
                    mod_stride,
                    static_cast<T*>(out),
                    static_cast<T*>(pre),
                    rows_per_sample,
                    c,
                    eps,
                    ps ? to_f32(*ps) : 0.f,
                    pb ? to_f32(*pb) : 0.f};
    run(a, rows);
  });
}

}  // namespace cascade_rt
