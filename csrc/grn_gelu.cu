// grn_gelu, CUDA: GlobalResponseNorm(GELU(h)) between the two channel-MLP GEMMs of a ResBlock.
// Math (ConvNeXt-V2 GRN on g = GELU(h), exact erf form), per sample b and channel c:
//   S[b,c] = sum_p g^2;  G = sqrt(S);  scale[b,c] = 1 + gamma[c] * G / (mean_c G + 1e-6)
//   out = g * scale + beta                       (= gamma * g * N + beta + g)
// With beta == nullptr the folded form is written: out = g and scale, no fourth kernel.
// Layout: h, out contiguous [B, HW, C]; gamma, beta [C] in h's dtype; scale [B, C] fp32;
// partial [B, tiles, C] fp32 workspace.
// Kernels (one stream, no atomics, so results are bitwise reproducible):
//   1. stats   grid (tiles, C / (32 kV), B), block 32 x 8: a tile of ceil(HW / tiles) pixels;
//              lanes over channels (kV-element packs), rows over pixels; fp32 sums of g^2 per
//              thread, then the 8 rows added in order -> partial[b, tile, c]. Folded: writes g.
//   2. colsum  grid (C / 32, B), block 32 x 8: partial summed over tiles -> G into `scale`.
//   3. scale   grid (B), block 256: mean_c G by a fixed tree, then scale in place.
//   4. apply   one thread per kV-pack of out: g recomputed from h (a re-read is cheaper than
//              writing g and reading it back), out = g * scale + beta.
// Limits: none beyond int64 sizes; kV = 16 bytes when C and every pointer allow it, else 1.
#include "cascade_rt.h"
#include "cuda_util.cuh"

namespace cascade_rt {
namespace {

using cuda::cdiv;
using cuda::load_f32;
using cuda::store_f32;
using cuda::to_f32;

constexpr int kLanes = 32;  // threads across channels
constexpr int kRows = 8;    // threads across pixels

__device__ __forceinline__ float gelu(float v) {
  return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
}

template <typename T, int kV>
__global__ void __launch_bounds__(kLanes* kRows)
    grn_stats_kernel(const T* __restrict__ h,      // [B, HW, C]
                     T* __restrict__ g_out,        // [B, HW, C] or null
                     float* __restrict__ partial,  // [B, tiles, C]
                     int64_t hw, int c, int tile_pixels) {
  const int tile = blockIdx.x;
  const int64_t b = blockIdx.z;
  const int c0 = (blockIdx.y * kLanes + threadIdx.x) * kV;
  const int64_t p0 = static_cast<int64_t>(tile) * tile_pixels;
  const int64_t p1 = min(hw, p0 + tile_pixels);
  float acc[kV];
#pragma unroll
  for (int i = 0; i < kV; ++i) acc[i] = 0.f;
  if (c0 < c) {
    for (int64_t px = p0 + threadIdx.y; px < p1; px += kRows) {
      const int64_t off = (b * hw + px) * c + c0;
      float g[kV];
      load_f32<T, kV>(h + off, g);
#pragma unroll
      for (int i = 0; i < kV; ++i) {
        g[i] = gelu(g[i]);
        acc[i] = fmaf(g[i], g[i], acc[i]);
      }
      if (g_out) store_f32<T, kV>(g_out + off, g);
    }
  }
  __shared__ float rows[kRows][kLanes * kV];
#pragma unroll
  for (int i = 0; i < kV; ++i) rows[threadIdx.y][threadIdx.x * kV + i] = acc[i];
  __syncthreads();
  const int tid = threadIdx.y * kLanes + threadIdx.x;
  for (int col = tid; col < kLanes * kV; col += kLanes * kRows) {
    const int ch = blockIdx.y * kLanes * kV + col;
    if (ch < c) {
      float s = 0.f;
#pragma unroll
      for (int r = 0; r < kRows; ++r) s += rows[r][col];
      partial[(b * gridDim.x + tile) * c + ch] = s;
    }
  }
}

__global__ void __launch_bounds__(kLanes* kRows)
    grn_colsum_kernel(const float* __restrict__ partial,  // [B, tiles, C]
                      float* __restrict__ gx,             // [B, C]
                      int tiles, int c) {
  const int ch = blockIdx.x * kLanes + threadIdx.x;
  const int64_t b = blockIdx.y;
  float s = 0.f;
  if (ch < c) {
    for (int t = threadIdx.y; t < tiles; t += kRows) s += partial[(b * tiles + t) * c + ch];
  }
  __shared__ float rows[kRows][kLanes];
  rows[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && ch < c) {
    float total = 0.f;
#pragma unroll
    for (int r = 0; r < kRows; ++r) total += rows[r][threadIdx.x];
    gx[b * c + ch] = sqrtf(total);
  }
}

constexpr int kScaleThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kScaleThreads)
    grn_scale_kernel(const T* __restrict__ gamma,  // [C]
                     float* __restrict__ scale,    // [B, C]: G in, scale out
                     int c) {
  float* row = scale + static_cast<int64_t>(blockIdx.x) * c;
  float s = 0.f;
  for (int ch = threadIdx.x; ch < c; ch += kScaleThreads) s += row[ch];
  __shared__ float tree[kScaleThreads];
  tree[threadIdx.x] = s;
  __syncthreads();
  for (int half = kScaleThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) tree[threadIdx.x] += tree[threadIdx.x + half];
    __syncthreads();
  }
  const float inv = 1.f / (tree[0] / static_cast<float>(c) + 1e-6f);
  for (int ch = threadIdx.x; ch < c; ch += kScaleThreads) {
    row[ch] = fmaf(to_f32(gamma[ch]), row[ch] * inv, 1.f);
  }
}

template <typename T, int kV>
__global__ void __launch_bounds__(256) grn_apply_kernel(const T* __restrict__ h,     // [B, HW, C]
                                                        const T* __restrict__ beta,  // [C]
                                                        const float* __restrict__ scale,  // [B, C]
                                                        T* __restrict__ out,  // [B, HW, C]
                                                        int64_t packs, int64_t hw, int c) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= packs) return;
  const int64_t e = i * kV;
  const int ch = static_cast<int>(e % c);  // a pack never crosses a row: C % kV == 0
  const float* sc = scale + (e / (hw * c)) * c + ch;
  float g[kV], bt[kV];
  load_f32<T, kV>(h + e, g);
  load_f32<T, kV>(beta + ch, bt);
#pragma unroll
  for (int k = 0; k < kV; ++k) g[k] = fmaf(gelu(g[k]), sc[k], bt[k]);
  store_f32<T, kV>(out + e, g);
}

template <typename T, int kV>
void launch(const T* h, const T* gamma, const T* beta, T* out, float* scale, float* partial,
            int64_t b, int64_t hw, int c, int tiles, cudaStream_t s) {
  const int tile_pixels = cdiv(hw, tiles);
  const dim3 block(kLanes, kRows);
  grn_stats_kernel<T, kV><<<dim3(tiles, cdiv(c, kLanes * kV), b), block, 0, s>>>(
      h, beta ? nullptr : out, partial, hw, c, tile_pixels);
  grn_colsum_kernel<<<dim3(cdiv(c, kLanes), b), block, 0, s>>>(partial, scale, tiles, c);
  grn_scale_kernel<T><<<static_cast<unsigned>(b), kScaleThreads, 0, s>>>(gamma, scale, c);
  if (beta) {
    const int64_t packs = b * hw * c / kV;
    grn_apply_kernel<T, kV><<<static_cast<unsigned>((packs + 255) / 256), 256, 0, s>>>(
        h, beta, scale, out, packs, hw, c);
  }
}

}  // namespace

void grn_gelu_cuda(const void* h, const void* gamma, const void* beta, void* out, float* scale,
                   float* partial, int64_t b, int64_t hw, int64_t c, int64_t tiles, int dtype,
                   void* stream) {
  if (c < 1 || c > INT32_MAX || tiles < 1 || tiles > 65535 || b > 65535) {
    throw std::invalid_argument("grn_gelu_cuda: sizes out of range");
  }
  if (b * hw == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  cuda::dispatch_dtype(dtype, "grn_gelu_cuda", [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    bool vec = c % kVec == 0;
    for (const void* ptr : {h, beta, static_cast<const void*>(out)}) {
      vec = vec && (ptr == nullptr || cuda::aligned(ptr, 16));
    }
    const auto* ht = static_cast<const T*>(h);
    const auto* gt = static_cast<const T*>(gamma);
    const auto* bt = static_cast<const T*>(beta);
    auto* ot = static_cast<T*>(out);
    const int ci = static_cast<int>(c);
    const int ti = static_cast<int>(tiles);
    if (vec) {
      launch<T, kVec>(ht, gt, bt, ot, scale, partial, b, hw, ci, ti, s);
    } else {
      launch<T, 1>(ht, gt, bt, ot, scale, partial, b, hw, ci, ti, s);
    }
  });
  cuda::check_launch("grn_gelu_cuda");
}

}  // namespace cascade_rt
