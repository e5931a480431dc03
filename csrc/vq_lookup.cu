// vq_lookup, CUDA: nearest codeword by squared L2 distance.
// Math: dist(n, k) = sum_d (x[n,d] - c[k,d])^2 in fp32, the direct form (no |x|^2 - 2x.c + |c|^2
// cancellation), so near-ties resolve as in the CPU kernel; ties keep the lowest k (torch.argmin).
// Layout: x [N, D], codebook [K, D], quantized [N, D] row-major contiguous; indices [N] int64.
// Launch: one thread per query row (held in registers, zero-padded to MaxD), 256 threads a block;
// the block stages the codebook through shared memory in tiles of 4096 / MaxD codewords, each
// zero-padded to MaxD floats, so every codeword is read from global memory once per block and the
// distance loop has no width checks: a tile row is MaxD / 4 broadcast float4 loads, and the
// padded lanes add (0 - 0)^2 = 0 exactly. MaxD is 4 (Stage A), 8, 16, 32 or 64 (kVqMaxDim).
// Stage A at 1024^2 is N = 65536 rows per image against K = 8192: 0.5 G distances, compute-bound.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cascade_rt.h"

namespace cascade_rt {
namespace {

constexpr int kThreads = 256;
// Codewords staged per shared-memory tile: 16 KiB of fp32 whatever the width.
template <int MaxD>
__host__ __device__ constexpr int tile_rows() { return 4096 / MaxD; }

template <typename T>
__device__ __forceinline__ float to_f32(T v);
template <>
__device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T, int MaxD>
__global__ void __launch_bounds__(kThreads)
    vq_lookup_kernel(const T* __restrict__ x,         // [N, D]
                     const T* __restrict__ codebook,  // [K, D]
                     int64_t* __restrict__ indices,   // [N]
                     T* __restrict__ quantized,       // [N, D]
                     int64_t n, int k, int d) {
  constexpr int kTile = tile_rows<MaxD>();
  __shared__ __align__(16) float tile[kTile * MaxD];  // [kTile, MaxD] fp32, zero-padded
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const bool active = row < n;
  float q[MaxD];
#pragma unroll
  for (int t = 0; t < MaxD; ++t) q[t] = (active && t < d) ? to_f32(x[row * d + t]) : 0.f;

  float best = INFINITY;
  int best_k = 0;
  for (int base = 0; base < k; base += kTile) {
    const int count = min(kTile, k - base);
    for (int i = threadIdx.x; i < count * MaxD; i += kThreads) {
      const int j = i / MaxD;
      const int t = i % MaxD;
      tile[i] = t < d ? to_f32(codebook[static_cast<int64_t>(base + j) * d + t]) : 0.f;
    }
    __syncthreads();
    if (active) {
#pragma unroll 4
      for (int j = 0; j < count; ++j) {
        const float4* c = reinterpret_cast<const float4*>(tile + j * MaxD);
        float acc = 0.f;
#pragma unroll
        for (int t = 0; t < MaxD / 4; ++t) {
          const float4 c4 = c[t];
          float diff = q[4 * t] - c4.x;
          acc = fmaf(diff, diff, acc);
          diff = q[4 * t + 1] - c4.y;
          acc = fmaf(diff, diff, acc);
          diff = q[4 * t + 2] - c4.z;
          acc = fmaf(diff, diff, acc);
          diff = q[4 * t + 3] - c4.w;
          acc = fmaf(diff, diff, acc);
        }
        if (acc < best) {
          best = acc;
          best_k = base + j;
        }
      }
    }
    __syncthreads();
  }
  if (active) {
    indices[row] = best_k;
    for (int t = 0; t < d; ++t) {
      quantized[row * d + t] = codebook[static_cast<int64_t>(best_k) * d + t];
    }
  }
}

template <typename T>
void launch(const void* x, const void* codebook, int64_t* indices, void* quantized, int64_t n,
            int64_t k, int64_t d, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((n + kThreads - 1) / kThreads));
  const auto* xs = static_cast<const T*>(x);
  const auto* cs = static_cast<const T*>(codebook);
  auto* qs = static_cast<T*>(quantized);
  const int ki = static_cast<int>(k);
  const int di = static_cast<int>(d);
  // The narrowest instantiation that holds D, so padding at most doubles the distance work.
  if (d <= 4) {
    vq_lookup_kernel<T, 4><<<grid, kThreads, 0, stream>>>(xs, cs, indices, qs, n, ki, di);
  } else if (d <= 8) {
    vq_lookup_kernel<T, 8><<<grid, kThreads, 0, stream>>>(xs, cs, indices, qs, n, ki, di);
  } else if (d <= 16) {
    vq_lookup_kernel<T, 16><<<grid, kThreads, 0, stream>>>(xs, cs, indices, qs, n, ki, di);
  } else if (d <= 32) {
    vq_lookup_kernel<T, 32><<<grid, kThreads, 0, stream>>>(xs, cs, indices, qs, n, ki, di);
  } else {
    vq_lookup_kernel<T, kVqMaxDim><<<grid, kThreads, 0, stream>>>(xs, cs, indices, qs, n, ki, di);
  }
}

}  // namespace

void vq_lookup_cuda(const void* x, const void* codebook, int64_t* indices, void* quantized,
                    int64_t n, int64_t k, int64_t d, int dtype, void* stream) {
  if (d < 1 || d > kVqMaxDim) throw std::invalid_argument("vq_lookup_cuda: D out of range");
  // Codeword indices are int inside the kernel; N fills the grid's x dimension.
  if (k < 1 || k > INT32_MAX) throw std::invalid_argument("vq_lookup_cuda: K out of range");
  if (n > static_cast<int64_t>(INT32_MAX) * kThreads) {
    throw std::invalid_argument("vq_lookup_cuda: N too large for one launch");
  }
  if (n == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32: launch<float>(x, codebook, indices, quantized, n, k, d, s); break;
    case kFloat16: launch<__half>(x, codebook, indices, quantized, n, k, d, s); break;
    case kBFloat16: launch<__nv_bfloat16>(x, codebook, indices, quantized, n, k, d, s); break;
    default: throw std::invalid_argument("vq_lookup_cuda: unsupported dtype tag");
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("vq_lookup_cuda: launch failed: ") +
                             cudaGetErrorString(err));
  }
}

}  // namespace cascade_rt
