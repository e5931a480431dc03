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

// layernorm2d: LayerNorm over the last dim (no affine) of x [rows, C], fused with its neighbours.
// Per row r, sample s = r / rows_per_sample:
//   m = x[r] (+ residual[r]);  m = m * (1 + scale[s]) + shift[s];  pre[r] = m
//   out[r] = (m - mean(m)) / sqrt(var(m) + eps) (* (1 + post_scale[0]) + post_shift[0])
// A null residual, scale (with shift), post_scale (with post_shift) or pre drops that part.
// x, residual, out, pre: contiguous [rows, C]; scale/shift: rows of C at unit stride, mod_stride
// elements apart (0: one row for every sample); everything in `dtype`.
void layernorm2d_cpu(const void* x, const void* residual, const void* scale, const void* shift,
                     int64_t mod_stride, const void* post_scale, const void* post_shift,
                     void* out, void* pre, int64_t rows, int64_t rows_per_sample, int64_t c,
                     float eps, int dtype);

// grn_gelu: g = GELU(h) (erf form), S[b,c] = sum over pixels of g^2, G = sqrt(S),
// scale[b,c] = 1 + gamma[c] * G[b,c] / (mean_c G[b,:] + 1e-6), out = g * scale + beta.
// With beta == nullptr (the folded form) only out = g and scale are written.
// h, out: contiguous [B, HW, C]; gamma, beta: [C] in `dtype`; scale: [B, C] fp32.
void grn_gelu_cpu(const void* h, const void* gamma, const void* beta, void* out, float* scale,
                  int64_t b, int64_t hw, int64_t c, int dtype);

// groupnorm_silu: y = (x - mean) / sqrt(var + eps) * weight[c] + bias[c] over each group of
// C / groups channels x HW pixels of a sample, out = y * sigmoid(y). x, out: contiguous, both
// [B, C, HW] or both [B, HW, C] (channels_last); weight, bias: [C]; all in `dtype`.
void groupnorm_silu_cpu(const void* x, const void* weight, const void* bias, void* out, int64_t b,
                        int64_t c, int64_t hw, int64_t groups, bool channels_last, float eps,
                        int dtype);

// Widest row layernorm2d_cuda holds in registers (32 fp32 values per thread, 256 threads).
constexpr int kLayerNorm2dMaxC = 8192;

#ifdef CASCADE_RT_WITH_CUDA
void layernorm2d_cuda(const void* x, const void* residual, const void* scale, const void* shift,
                      int64_t mod_stride, const void* post_scale, const void* post_shift,
                      void* out, void* pre, int64_t rows, int64_t rows_per_sample, int64_t c,
                      float eps, int dtype, void* stream);
// partial: fp32 workspace [B, tiles, C], 1 <= tiles <= 65535.
void grn_gelu_cuda(const void* h, const void* gamma, const void* beta, void* out, float* scale,
                   float* partial, int64_t b, int64_t hw, int64_t c, int64_t tiles, int dtype,
                   void* stream);
// workspace: fp32 [B * groups * (3 * tiles + 2)], 1 <= tiles <= HW.
void groupnorm_silu_cuda(const void* x, const void* weight, const void* bias, void* out,
                         float* workspace, int64_t b, int64_t c, int64_t hw, int64_t groups,
                         int64_t tiles, bool channels_last, float eps, int dtype, void* stream);
#endif

}  // namespace cascade_rt
