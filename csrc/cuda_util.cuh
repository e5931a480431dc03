// Helpers shared by the CUDA kernels: fp32 <-> element conversions, aligned vector packs, the
// dtype-tag dispatch and launch error checking. Torch-free, like every file in csrc/.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cascade_rt.h"

namespace cascade_rt {
namespace cuda {

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// kN elements moved as one aligned load or store (16 bytes for 8 x bf16 or 4 x fp32).
template <typename T, int kN>
struct alignas(sizeof(T) * kN) Pack {
  T v[kN];
};

template <typename T, int kN>
__device__ __forceinline__ void load_f32(const T* p, float (&out)[kN]) {
  const Pack<T, kN> pk = *reinterpret_cast<const Pack<T, kN>*>(p);
#pragma unroll
  for (int i = 0; i < kN; ++i) out[i] = to_f32(pk.v[i]);
}

template <typename T, int kN>
__device__ __forceinline__ void store_f32(T* p, const float (&in)[kN]) {
  Pack<T, kN> pk;
#pragma unroll
  for (int i = 0; i < kN; ++i) pk.v[i] = from_f32<T>(in[i]);
  *reinterpret_cast<Pack<T, kN>*>(p) = pk;
}

inline bool aligned(const void* p, int bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

inline int cdiv(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// Calls f(T{}) with T the CUDA element type of `dtype`.
template <typename F>
void dispatch_dtype(int dtype, const char* op, F&& f) {
  switch (dtype) {
    case kFloat32:
      f(float{});
      break;
    case kFloat16:
      f(__half{});
      break;
    case kBFloat16:
      f(__nv_bfloat16{});
      break;
    default:
      throw std::invalid_argument(std::string(op) + ": unsupported dtype tag");
  }
}

inline void check_launch(const char* op) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(op) + ": launch failed: " + cudaGetErrorString(err));
  }
}

}  // namespace cuda
}  // namespace cascade_rt
