// cascade_rt native launchers: torch-free declarations shared by the CPU (.cpp) and CUDA (.cu)
// sources and by bindings.cpp. Tensors travel as raw pointers plus sizes; CUDA launchers take the
// stream to launch on (cudaStream_t passed as void*) so they land in whatever graph is capturing.
#pragma once
#include <array>
#include <cstdint>

namespace cascade_rt {

// Element type tags, shared with cascade_rt/_ext.py.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Upper bound on the codeword width the VQ kernels hold in registers (Stage A uses 4).
constexpr int kVqMaxDim = 64;

// vq_lookup: for each row x[n, :] (n < N, width D) find k* = argmin_k ||x[n] - codebook[k]||^2
// (ties -> lowest k), write indices[n] = k* and quantized[n, :] = codebook[k*, :].
// x, codebook and quantized share `dtype`; all are row-major and contiguous.
void vq_lookup_cpu(const void* x, const void* codebook, int64_t* indices, void* quantized,
                   int64_t n, int64_t k, int64_t d, int dtype);

#ifdef CASCADE_RT_WITH_CUDA
void vq_lookup_cuda(const void* x, const void* codebook, int64_t* indices, void* quantized,
                    int64_t n, int64_t k, int64_t d, int dtype, void* stream);
#endif

// Largest head dim the CUDA attention kernels hold in registers (the models use 64).
constexpr int kAttentionCudaMaxHeadDim = 128;

// Element strides (batch, token, head) of a [B, N, H, D] tensor whose head dim is unit-stride.
using AttentionStrides = std::array<int64_t, 3>;

// attention: out = softmax(q [k; k2]^T / sqrt(D)) [v; v2] per (batch, head), fp32 softmax.
// q, out: [B, Nq, H, D]; k, v: [B, Nk, H, D]; k2, v2: [B, Nc, H, D], null when nc == 0. All share
// `dtype`; each has its own strides, so slices of a fused qkv projection are read in place.
#ifdef CASCADE_RT_WITH_CUDA
void attention_cuda(const void* q, const void* k, const void* v, const void* k2, const void* v2,
                    void* out, int64_t batch, int64_t heads, int64_t head_dim, int64_t nq,
                    int64_t nk, int64_t nc, const AttentionStrides& q_strides,
                    const AttentionStrides& k_strides, const AttentionStrides& v_strides,
                    const AttentionStrides& k2_strides, const AttentionStrides& v2_strides,
                    const AttentionStrides& out_strides, int dtype, void* stream);
#endif

}  // namespace cascade_rt
