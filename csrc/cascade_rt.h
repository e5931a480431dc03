// cascade_rt native launchers: torch-free declarations shared by the CPU (.cpp) and CUDA (.cu)
// sources and by bindings.cpp. Tensors travel as raw pointers plus sizes; CUDA launchers take the
// stream to launch on (cudaStream_t passed as void*) so they land in whatever graph is capturing.
#pragma once
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

}  // namespace cascade_rt
