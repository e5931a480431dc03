// groupnorm_silu, CUDA: SiLU(GroupNorm(x)) with a per-channel affine, NCHW or channels-last.
// Math, per sample b and group g of Cg = C / G channels x HW pixels:
//   mean, var = biased moments;  y = (x - mean) * rsqrt(var + eps) * w[c] + bias[c];  out = y *
//   sigmoid(y)
// Layout: x, out contiguous, both [B, C, HW] (NCHW) or both [B, HW, C] (channels-last); weight,
// bias [C] in x's dtype; workspace fp32 [B * G * (3 * tiles + 2)].
// Statistics: fp32 Welford per thread, merged with Chan's formula (shuffle tree, then warps in
// order) into one (count, mean, M2) per (sample, group, tile); a warp per (sample, group) merges
// the tiles in a fixed tree. No atomics, so results are bitwise reproducible.
// Kernels: 1. stats grid (tiles, G, B), 256 threads, a tile = ceil(HW / tiles) pixels x Cg
// channels walked in memory order (NCHW: pixels fastest; channels-last: channels fastest; see
// TileWalk);
// 2. finalize, a warp per (sample, group) -> mean, rstd; 3. apply, same grid as 1.
// Limits: a tile holds < 2^31 elements; loads are scalar (coalesced along the contiguous dim).
#include "cascade_rt.h"
#include "cuda_util.cuh"

namespace cascade_rt {
namespace {

using cuda::cdiv;
using cuda::from_f32;
using cuda::to_f32;

constexpr int kThreads = 256;

struct Shape {
  int64_t hw;
  int c, cg, tile_pixels, tiles;
  bool channels_last;
  float eps;
};

struct Moments {
  float n, mean, m2;
};

__device__ __forceinline__ Moments merge(const Moments& a, const Moments& b) {
  const float n = a.n + b.n;
  if (n == 0.f) return a;
  const float delta = b.mean - a.mean;
  const float w = b.n / n;
  return {n, fmaf(delta, w, a.mean), a.m2 + b.m2 + delta * delta * a.n * w};
}

// Lane 0 ends with the merge of the warp's 32 values; the tree is fixed.
__device__ __forceinline__ Moments warp_merge(Moments m) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) {
    const Moments other{__shfl_down_sync(0xffffffffu, m.n, o),
                        __shfl_down_sync(0xffffffffu, m.mean, o),
                        __shfl_down_sync(0xffffffffu, m.m2, o)};
    m = merge(m, other);
  }
  return m;
}

// Walks the elements of one tile (np pixels from p0 x the group's Cg channels) in memory order,
// kThreads apart: `inner` runs along the contiguous dim (pixels in NCHW, channels in
// channels-last), `outer` along the other. Coordinates advance by adds, not a division per element.
struct TileWalk {
  int inner, outer, inner_size, outer_size, d_inner, d_outer;

  __device__ TileWalk(const Shape& s, int np)
      : inner_size(s.channels_last ? s.cg : np), outer_size(s.channels_last ? np : s.cg) {
    inner = static_cast<int>(threadIdx.x) % inner_size;
    outer = static_cast<int>(threadIdx.x) / inner_size;
    d_inner = kThreads % inner_size;
    d_outer = kThreads / inner_size;
  }
  __device__ bool valid() const { return outer < outer_size; }
  __device__ void next() {
    inner += d_inner;
    outer += d_outer;
    if (inner >= inner_size) {
      inner -= inner_size;
      ++outer;
    }
  }
  __device__ int channel(const Shape& s, int g) const {
    return g * s.cg + (s.channels_last ? inner : outer);
  }
  __device__ int64_t offset(const Shape& s, int64_t b, int g, int64_t p0) const {
    return s.channels_last ? (b * s.hw + p0 + outer) * s.c + g * s.cg + inner
                           : (b * s.c + g * s.cg + outer) * s.hw + p0 + inner;
  }
};

// Pixels of tile `tile` (0 for a tile past the end).
__device__ __forceinline__ int tile_pixels(const Shape& s, int64_t p0) {
  return static_cast<int>(max(int64_t{0}, min(s.hw - p0, int64_t{s.tile_pixels})));
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    gn_stats_kernel(const T* __restrict__ x, float* __restrict__ partial, const Shape s) {
  const int tile = blockIdx.x, g = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int64_t p0 = static_cast<int64_t>(tile) * s.tile_pixels;
  const int np = tile_pixels(s, p0);
  Moments m{0.f, 0.f, 0.f};
  if (np > 0) {
    for (TileWalk w(s, np); w.valid(); w.next()) {
      const float v = to_f32(x[w.offset(s, b, g, p0)]);
      m.n += 1.f;
      const float d = v - m.mean;
      m.mean += d / m.n;
      m.m2 = fmaf(d, v - m.mean, m.m2);
    }
  }
  m = warp_merge(m);
  __shared__ Moments warps[kThreads / 32];
  if (threadIdx.x % 32 == 0) warps[threadIdx.x / 32] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    Moments t = warps[0];
    for (int w = 1; w < kThreads / 32; ++w) t = merge(t, warps[w]);
    float* dst = partial + (((b * gridDim.y + g) * s.tiles) + tile) * 3;
    dst[0] = t.n;
    dst[1] = t.mean;
    dst[2] = t.m2;
  }
}

// One warp per (sample, group): lane l merges tiles l, l + 32, ... in order, then the warp tree.
__global__ void gn_finalize_kernel(const float* __restrict__ partial,  // [B*G, tiles, 3]
                                   float* __restrict__ stats,          // [B*G, 2]: mean, rstd
                                   int64_t groups_total, int tiles, float eps) {
  const int64_t bg = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  Moments m{0.f, 0.f, 0.f};
  if (bg < groups_total) {
    for (int t = lane; t < tiles; t += 32) {
      const float* p = partial + (bg * tiles + t) * 3;
      m = merge(m, Moments{p[0], p[1], p[2]});
    }
  }
  m = warp_merge(m);
  if (lane == 0 && bg < groups_total) {
    stats[bg * 2] = m.mean;
    stats[bg * 2 + 1] = rsqrtf(fmaxf(m.m2 / m.n, 0.f) + eps);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    gn_apply_kernel(const T* __restrict__ x, const T* __restrict__ weight,
                    const T* __restrict__ bias, const float* __restrict__ stats,
                    T* __restrict__ out, const Shape s) {
  const int tile = blockIdx.x, g = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int64_t p0 = static_cast<int64_t>(tile) * s.tile_pixels;
  const int np = tile_pixels(s, p0);
  if (np == 0) return;
  const float* st = stats + (b * gridDim.y + g) * 2;
  const float mean = st[0], rstd = st[1];
  for (TileWalk w(s, np); w.valid(); w.next()) {
    const int ch = w.channel(s, g);
    const int64_t off = w.offset(s, b, g, p0);
    const float y = fmaf((to_f32(x[off]) - mean) * rstd, to_f32(weight[ch]), to_f32(bias[ch]));
    out[off] = from_f32<T>(y / (1.f + expf(-y)));
  }
}

}  // namespace

void groupnorm_silu_cuda(const void* x, const void* weight, const void* bias, void* out,
                         float* workspace, int64_t b, int64_t c, int64_t hw, int64_t groups,
                         int64_t tiles, bool channels_last, float eps, int dtype, void* stream) {
  if (c < 1 || groups < 1 || c % groups != 0 || tiles < 1 || tiles > hw || groups > 65535 ||
      b > 65535) {
    throw std::invalid_argument("groupnorm_silu_cuda: sizes out of range");
  }
  const Shape s{hw,
                static_cast<int>(c),
                static_cast<int>(c / groups),
                cdiv(hw, tiles),
                static_cast<int>(tiles),
                channels_last,
                eps};
  if (static_cast<int64_t>(s.tile_pixels) * s.cg >= INT32_MAX) {
    throw std::invalid_argument("groupnorm_silu_cuda: tile too large; use more tiles");
  }
  if (b == 0) return;
  float* partial = workspace;                         // [B*G, tiles, 3]
  float* stats = workspace + b * groups * tiles * 3;  // [B*G, 2]
  auto st = static_cast<cudaStream_t>(stream);
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(groups),
                  static_cast<unsigned>(b));
  cuda::dispatch_dtype(dtype, "groupnorm_silu_cuda", [&](auto tag) {
    using T = decltype(tag);
    const auto* xt = static_cast<const T*>(x);
    gn_stats_kernel<T><<<grid, kThreads, 0, st>>>(xt, partial, s);
    constexpr int kWarpsPerBlock = 8;
    gn_finalize_kernel<<<cdiv(b * groups, kWarpsPerBlock), 32 * kWarpsPerBlock, 0, st>>>(
        partial, stats, b * groups, s.tiles, eps);
    gn_apply_kernel<T><<<grid, kThreads, 0, st>>>(xt, static_cast<const T*>(weight),
                                                  static_cast<const T*>(bias), stats,
                                                  static_cast<T*>(out), s);
  });
  cuda::check_launch("groupnorm_silu_cuda");
}

}  // namespace cascade_rt
