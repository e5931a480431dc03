// layernorm2d, CUDA: LayerNorm over the channel (last) dim of channels-last activations, no
// affine, fused with its neighbours in the blocks (cascade_rt/ops/layernorm2d.py has the API).
// Math, per row r of C channels, sample s = r / rows_per_sample:
//   m = x[r] (+ residual[r]);  m = m * (1 + scale[s]) + shift[s];  pre[r] = m
//   out[r] = (m - mean) * rsqrt(var + eps) (* (1 + post_scale) + post_shift)
// Layout: x, residual, out, pre contiguous [rows, C]; scale/shift rows at unit stride, mod_stride
// elements apart (0 broadcasts one row); post_* single elements; all in one dtype.
// Accumulation: fp32. The row stays in registers, so mean and variance are an exact two-pass
// (sum, then sum of squared deviations), each a per-thread sum and a fixed shuffle/shared-memory
// tree: deterministic, and no E[x^2] - E[x]^2 cancellation.
// Launch: 256-thread blocks; a row is owned by kR threads (8 for C <= 64, a warp for C <= 1024,
// the whole block above), each holding kK packs of kV elements (kV = 16 bytes when C and every
// pointer allow it, else 1), at most 32 fp32 values per thread. Limits: C <= kLayerNorm2dMaxC.
#include "cascade_rt.h"
#include "cuda_util.cuh"

namespace cascade_rt {
namespace {

using cuda::cdiv;
using cuda::load_f32;
using cuda::store_f32;
using cuda::to_f32;

constexpr int kBlock = 256;

struct Params {
  const void* x;
  const void* residual;
  const void* scale;
  const void* shift;
  int64_t mod_stride;
  const void* post_scale;
  const void* post_shift;
  void* out;
  void* pre;
  int64_t rows;
  int64_t rows_per_sample;
  int c;
  float eps;
};

// Sum over the kR threads that own a row; every one of them gets the same value, because the xor
// butterfly adds the same two operands on both sides of each exchange.
template <int kR>
__device__ __forceinline__ float row_sum(float s) {
  constexpr int kWidth = kR < 32 ? kR : 32;
#pragma unroll
  for (int o = kWidth / 2; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o, kWidth);
  if constexpr (kR > 32) {
    static_assert(kR == kBlock, "a row wider than a warp spans the whole block");
    __shared__ float warp_sums[kBlock / 32];
    __syncthreads();  // the previous call's readers are done with warp_sums
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = s;
    __syncthreads();
    s = 0.f;
#pragma unroll
    for (int w = 0; w < kBlock / 32; ++w) s += warp_sums[w];
  }
  return s;
}

template <typename T, int kV, int kR, int kK>
__global__ void __launch_bounds__(kBlock) layernorm2d_kernel(const Params p) {
  constexpr int kRowsPerBlock = kBlock / kR;
  const int lane = threadIdx.x % kR;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kR;
  const bool active = row < p.rows;  // inactive threads still join the reductions
  const int packs = p.c / kV;
  const int64_t base = row * p.c;
  const int64_t mod_base = (row / p.rows_per_sample) * p.mod_stride;
  const T* x = static_cast<const T*>(p.x) + base;
  const T* res = p.residual ? static_cast<const T*>(p.residual) + base : nullptr;
  const T* sc = p.scale ? static_cast<const T*>(p.scale) + mod_base : nullptr;
  const T* sh = p.scale ? static_cast<const T*>(p.shift) + mod_base : nullptr;
  T* pre = p.pre ? static_cast<T*>(p.pre) + base : nullptr;
  T* out = static_cast<T*>(p.out) + base;

  float v[kK][kV];  // the row's values owned by this thread, fp32
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < kK; ++k) {
    const int pack = k * kR + lane;
    if (active && pack < packs) {
      const int off = pack * kV;
      load_f32<T, kV>(x + off, v[k]);
      if (res) {
        float r[kV];
        load_f32<T, kV>(res + off, r);
#pragma unroll
        for (int i = 0; i < kV; ++i) v[k][i] += r[i];
      }
      if (sc) {
        float a[kV], b[kV];
        load_f32<T, kV>(sc + off, a);
        load_f32<T, kV>(sh + off, b);
#pragma unroll
        for (int i = 0; i < kV; ++i) v[k][i] = fmaf(v[k][i], 1.f + a[i], b[i]);
      }
      if (pre) store_f32<T, kV>(pre + off, v[k]);
#pragma unroll
      for (int i = 0; i < kV; ++i) sum += v[k][i];
    }
  }
  const float mean = row_sum<kR>(sum) / static_cast<float>(p.c);
  float sq = 0.f;
#pragma unroll
  for (int k = 0; k < kK; ++k) {
    if (active && k * kR + lane < packs) {
#pragma unroll
      for (int i = 0; i < kV; ++i) {
        const float d = v[k][i] - mean;
        sq = fmaf(d, d, sq);
      }
    }
  }
  const float rstd = rsqrtf(row_sum<kR>(sq) / static_cast<float>(p.c) + p.eps);
  const float ps = p.post_scale ? to_f32(*static_cast<const T*>(p.post_scale)) : 0.f;
  const float pb = p.post_shift ? to_f32(*static_cast<const T*>(p.post_shift)) : 0.f;
  const float gain = rstd * (1.f + ps);
#pragma unroll
  for (int k = 0; k < kK; ++k) {
    const int pack = k * kR + lane;
    if (active && pack < packs) {
      float y[kV];
#pragma unroll
      for (int i = 0; i < kV; ++i) y[i] = fmaf(v[k][i] - mean, gain, pb);
      store_f32<T, kV>(out + pack * kV, y);
    }
  }
}

// Instantiates packs-per-thread kK = 1, 2, 4, ... and launches the smallest one that holds `k`.
template <typename T, int kV, int kR, int kK>
void launch_packs(const Params& p, int k, cudaStream_t stream) {
  constexpr int kMaxValues = kR == 8 ? 8 : 32;  // fp32 registers of the row per thread
  if constexpr (kK * kV <= kMaxValues) {
    if (k <= kK) {
      const dim3 grid(cdiv(p.rows, kBlock / kR));
      layernorm2d_kernel<T, kV, kR, kK><<<grid, kBlock, 0, stream>>>(p);
      return;
    }
    launch_packs<T, kV, kR, kK * 2>(p, k, stream);
  } else {
    throw std::logic_error("layernorm2d_cuda: row does not fit the register plan");
  }
}

template <typename T, int kV>
void launch_width(const Params& p, cudaStream_t stream) {
  const int packs = p.c / kV;
  if (p.c <= 64) {
    launch_packs<T, kV, 8, 1>(p, cdiv(packs, 8), stream);
  } else if (p.c <= 1024) {
    launch_packs<T, kV, 32, 1>(p, cdiv(packs, 32), stream);
  } else {
    launch_packs<T, kV, kBlock, 1>(p, cdiv(packs, kBlock), stream);
  }
}

}  // namespace

void layernorm2d_cuda(const void* x, const void* residual, const void* scale, const void* shift,
                      int64_t mod_stride, const void* post_scale, const void* post_shift, void* out,
                      void* pre, int64_t rows, int64_t rows_per_sample, int64_t c, float eps,
                      int dtype, void* stream) {
  if (c < 1 || c > kLayerNorm2dMaxC || rows_per_sample < 1) {
    throw std::invalid_argument("layernorm2d_cuda: C out of range");
  }
  if ((scale == nullptr) != (shift == nullptr) ||
      (post_scale == nullptr) != (post_shift == nullptr)) {
    throw std::invalid_argument("layernorm2d_cuda: scale/shift and post_scale/post_shift pair up");
  }
  if (rows == 0) return;
  const Params p{x,   residual, scale, shift,           mod_stride,          post_scale, post_shift,
                 out, pre,      rows,  rows_per_sample, static_cast<int>(c), eps};
  auto s = static_cast<cudaStream_t>(stream);
  cuda::dispatch_dtype(dtype, "layernorm2d_cuda", [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    // 16-byte packs need every row (and modulation row) to start on a 16-byte boundary.
    bool vec = c % kVec == 0 && mod_stride % kVec == 0;
    for (const void* ptr : {x, residual, scale, shift, static_cast<const void*>(out),
                            static_cast<const void*>(pre)}) {
      vec = vec && (ptr == nullptr || cuda::aligned(ptr, 16));
    }
    if (vec) {
      launch_width<T, kVec>(p, s);
    } else {
      launch_width<T, 1>(p, s);
    }
  });
  cuda::check_launch("layernorm2d_cuda");
}

}  // namespace cascade_rt
