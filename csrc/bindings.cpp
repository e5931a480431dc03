// The only pybind11 file: one m.def per launcher. Pointers arrive as uintptr_t (from
// tensor.data_ptr()) and CUDA streams as the raw cudaStream_t handle, so no torch headers are needed.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>  // AttentionStrides (std::array) from a Python tuple

#include <cstdint>

#include "cascade_rt.h"

namespace py = pybind11;
using cascade_rt::vq_lookup_cpu;

namespace {
template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "cascade_rt native kernels (CPU C++ and, when built with it, CUDA)";
  m.attr("with_cuda") =
#ifdef CASCADE_RT_WITH_CUDA
      true;
#else
      false;
#endif
  m.attr("vq_max_dim") = cascade_rt::kVqMaxDim;
  m.attr("attention_cuda_max_head_dim") = cascade_rt::kAttentionCudaMaxHeadDim;

  m.def(
      "vq_lookup_cpu",
      [](uintptr_t x, uintptr_t codebook, uintptr_t indices, uintptr_t quantized, int64_t n,
         int64_t k, int64_t d, int dtype) {
        py::gil_scoped_release release;
        vq_lookup_cpu(ptr<const void>(x), ptr<const void>(codebook), ptr<int64_t>(indices),
                      ptr<void>(quantized), n, k, d, dtype);
      },
      py::arg("x"), py::arg("codebook"), py::arg("indices"), py::arg("quantized"), py::arg("n"),
      py::arg("k"), py::arg("d"), py::arg("dtype"));

#ifdef CASCADE_RT_WITH_CUDA
  m.def(
      "vq_lookup_cuda",
      [](uintptr_t x, uintptr_t codebook, uintptr_t indices, uintptr_t quantized, int64_t n,
         int64_t k, int64_t d, int dtype, uintptr_t stream) {
        cascade_rt::vq_lookup_cuda(ptr<const void>(x), ptr<const void>(codebook),
                                   ptr<int64_t>(indices), ptr<void>(quantized), n, k, d, dtype,
                                   ptr<void>(stream));
      },
      py::arg("x"), py::arg("codebook"), py::arg("indices"), py::arg("quantized"), py::arg("n"),
      py::arg("k"), py::arg("d"), py::arg("dtype"), py::arg("stream"));

  using cascade_rt::AttentionStrides;
  m.def(
      "attention_cuda",
      [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t k2, uintptr_t v2, uintptr_t out,
         int64_t batch, int64_t heads, int64_t head_dim, int64_t nq, int64_t nk, int64_t nc,
         const AttentionStrides& q_strides, const AttentionStrides& k_strides,
         const AttentionStrides& v_strides, const AttentionStrides& k2_strides,
         const AttentionStrides& v2_strides, const AttentionStrides& out_strides, int dtype,
         uintptr_t stream) {
        cascade_rt::attention_cuda(ptr<const void>(q), ptr<const void>(k), ptr<const void>(v),
                                   ptr<const void>(k2), ptr<const void>(v2), ptr<void>(out), batch,
                                   heads, head_dim, nq, nk, nc, q_strides, k_strides, v_strides,
                                   k2_strides, v2_strides, out_strides, dtype, ptr<void>(stream));
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("k2"), py::arg("v2"), py::arg("out"),
      py::arg("batch"), py::arg("heads"), py::arg("head_dim"), py::arg("nq"), py::arg("nk"),
      py::arg("nc"), py::arg("q_strides"), py::arg("k_strides"), py::arg("v_strides"),
      py::arg("k2_strides"), py::arg("v2_strides"), py::arg("out_strides"), py::arg("dtype"),
      py::arg("stream"));
#endif

  m.attr("layernorm2d_max_c") = cascade_rt::kLayerNorm2dMaxC;
  m.def(
      "layernorm2d_cpu",
      [](uintptr_t x, uintptr_t residual, uintptr_t scale, uintptr_t shift, int64_t mod_stride,
         uintptr_t post_scale, uintptr_t post_shift, uintptr_t out, uintptr_t pre, int64_t rows,
         int64_t rows_per_sample, int64_t c, float eps, int dtype) {
        py::gil_scoped_release release;
        cascade_rt::layernorm2d_cpu(ptr<const void>(x), ptr<const void>(residual),
                                    ptr<const void>(scale), ptr<const void>(shift), mod_stride,
                                    ptr<const void>(post_scale), ptr<const void>(post_shift),
                                    ptr<void>(out), ptr<void>(pre), rows, rows_per_sample, c, eps,
                                    dtype);
      },
      py::arg("x"), py::arg("residual"), py::arg("scale"), py::arg("shift"), py::arg("mod_stride"),
      py::arg("post_scale"), py::arg("post_shift"), py::arg("out"), py::arg("pre"),
      py::arg("rows"), py::arg("rows_per_sample"), py::arg("c"), py::arg("eps"),
      py::arg("dtype"));
  m.def(
      "grn_gelu_cpu",
      [](uintptr_t h, uintptr_t gamma, uintptr_t beta, uintptr_t out, uintptr_t scale, int64_t b,
         int64_t hw, int64_t c, int dtype) {
        py::gil_scoped_release release;
        cascade_rt::grn_gelu_cpu(ptr<const void>(h), ptr<const void>(gamma),
                                 ptr<const void>(beta), ptr<void>(out), ptr<float>(scale), b, hw,
                                 c, dtype);
      },
      py::arg("h"), py::arg("gamma"), py::arg("beta"), py::arg("out"), py::arg("scale"),
      py::arg("b"), py::arg("hw"), py::arg("c"), py::arg("dtype"));
  m.def(
      "groupnorm_silu_cpu",
      [](uintptr_t x, uintptr_t weight, uintptr_t bias, uintptr_t out, int64_t b, int64_t c,
         int64_t hw, int64_t groups, bool channels_last, float eps, int dtype) {
        py::gil_scoped_release release;
        cascade_rt::groupnorm_silu_cpu(ptr<const void>(x), ptr<const void>(weight),
                                       ptr<const void>(bias), ptr<void>(out), b, c, hw, groups,
                                       channels_last, eps, dtype);
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("out"), py::arg("b"), py::arg("c"),
      py::arg("hw"), py::arg("groups"), py::arg("channels_last"), py::arg("eps"),
      py::arg("dtype"));

#ifdef CASCADE_RT_WITH_CUDA
  m.def(
      "layernorm2d_cuda",
      [](uintptr_t x, uintptr_t residual, uintptr_t scale, uintptr_t shift, int64_t mod_stride,
         uintptr_t post_scale, uintptr_t post_shift, uintptr_t out, uintptr_t pre, int64_t rows,
         int64_t rows_per_sample, int64_t c, float eps, int dtype, uintptr_t stream) {
        cascade_rt::layernorm2d_cuda(ptr<const void>(x), ptr<const void>(residual),
                                     ptr<const void>(scale), ptr<const void>(shift), mod_stride,
                                     ptr<const void>(post_scale), ptr<const void>(post_shift),
                                     ptr<void>(out), ptr<void>(pre), rows, rows_per_sample, c,
                                     eps, dtype, ptr<void>(stream));
      },
      py::arg("x"), py::arg("residual"), py::arg("scale"), py::arg("shift"), py::arg("mod_stride"),
      py::arg("post_scale"), py::arg("post_shift"), py::arg("out"), py::arg("pre"),
      py::arg("rows"), py::arg("rows_per_sample"), py::arg("c"), py::arg("eps"), py::arg("dtype"),
      py::arg("stream"));
  m.def(
      "grn_gelu_cuda",
      [](uintptr_t h, uintptr_t gamma, uintptr_t beta, uintptr_t out, uintptr_t scale,
         uintptr_t partial, int64_t b, int64_t hw, int64_t c, int64_t tiles, int dtype,
         uintptr_t stream) {
        cascade_rt::grn_gelu_cuda(ptr<const void>(h), ptr<const void>(gamma),
                                  ptr<const void>(beta), ptr<void>(out), ptr<float>(scale),
                                  ptr<float>(partial), b, hw, c, tiles, dtype, ptr<void>(stream));
      },
      py::arg("h"), py::arg("gamma"), py::arg("beta"), py::arg("out"), py::arg("scale"),
      py::arg("partial"), py::arg("b"), py::arg("hw"), py::arg("c"), py::arg("tiles"),
      py::arg("dtype"), py::arg("stream"));
  m.def(
      "groupnorm_silu_cuda",
      [](uintptr_t x, uintptr_t weight, uintptr_t bias, uintptr_t out, uintptr_t workspace,
         int64_t b, int64_t c, int64_t hw, int64_t groups, int64_t tiles, bool channels_last,
         float eps, int dtype, uintptr_t stream) {
        cascade_rt::groupnorm_silu_cuda(ptr<const void>(x), ptr<const void>(weight),
                                        ptr<const void>(bias), ptr<void>(out),
                                        ptr<float>(workspace), b, c, hw, groups, tiles,
                                        channels_last, eps, dtype, ptr<void>(stream));
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("out"), py::arg("workspace"),
      py::arg("b"), py::arg("c"), py::arg("hw"), py::arg("groups"), py::arg("tiles"),
      py::arg("channels_last"), py::arg("eps"), py::arg("dtype"), py::arg("stream"));
#endif
}
