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
// Parallel: OpenMP over rows. Limits: none on C beyond memory.
#include <cmath>
#include <vector>

#include "cascade_rt.h"
#include "cpu_util.h"

namespace cascade_rt {
namespace {

template <typename T>
void run(const T* x, const T* residual, const T* scale, const T* shift, int64_t mod_stride,
         const T* post_scale, const T* post_shift, T* out, T* pre, int64_t rows,
         int64_t rows_per_sample, int64_t c, float eps) {
  const float ps = post_scale ? to_f32(*post_scale) : 0.f;
  const float pb = post_shift ? to_f32(*post_shift) : 0.f;
#pragma omp parallel
  {
    std::vector<float> m(static_cast<size_t>(c));  // [C] the row, fp32
    std::vector<float> d(static_cast<size_t>(c));  // [C] squared deviations
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const T* xr = x + r * c;
      for (int64_t j = 0; j < c; ++j) m[j] = to_f32(xr[j]);
      if (residual) {
        const T* rr = residual + r * c;
        for (int64_t j = 0; j < c; ++j) m[j] += to_f32(rr[j]);
      }
      if (scale) {
        const int64_t s = r / rows_per_sample;
        const T* a = scale + s * mod_stride;
        const T* b = shift + s * mod_stride;
        for (int64_t j = 0; j < c; ++j) m[j] = m[j] * (1.f + to_f32(a[j])) + to_f32(b[j]);
      }
      if (pre) {
        T* pr = pre + r * c;
        for (int64_t j = 0; j < c; ++j) pr[j] = from_f32<T>(m[j]);
      }
      const float mean = accurate_sum(m.data(), c) / static_cast<float>(c);
      for (int64_t j = 0; j < c; ++j) d[j] = (m[j] - mean) * (m[j] - mean);
      const float var = accurate_sum(d.data(), c) / static_cast<float>(c);
      const float rstd = 1.f / std::sqrt(var + eps);
      const float gain = rstd * (1.f + ps);
      T* orow = out + r * c;
      for (int64_t j = 0; j < c; ++j) orow[j] = from_f32<T>((m[j] - mean) * gain + pb);
    }
  }
}

}  // namespace

void layernorm2d_cpu(const void* x, const void* residual, const void* scale, const void* shift,
                     int64_t mod_stride, const void* post_scale, const void* post_shift,
                     void* out, void* pre, int64_t rows, int64_t rows_per_sample, int64_t c,
                     float eps, int dtype) {
  if (rows == 0) return;
  if (c < 1 || rows_per_sample < 1) throw std::invalid_argument("layernorm2d_cpu: bad sizes");
  if ((scale == nullptr) != (shift == nullptr) ||
      (post_scale == nullptr) != (post_shift == nullptr)) {
    throw std::invalid_argument("layernorm2d_cpu: scale/shift and post_scale/post_shift pair up");
  }
  dispatch_dtype(dtype, "layernorm2d_cpu", [&](auto tag) {
    using T = decltype(tag);
    run<T>(static_cast<const T*>(x), static_cast<const T*>(residual),
           static_cast<const T*>(scale), static_cast<const T*>(shift), mod_stride,
           static_cast<const T*>(post_scale), static_cast<const T*>(post_shift),
           static_cast<T*>(out), static_cast<T*>(pre), rows, rows_per_sample, c, eps);
  });
}

}  // namespace cascade_rt
