// The only pybind11 file: one m.def per launcher. Pointers arrive as uintptr_t (from
// tensor.data_ptr()) and CUDA streams as the raw cudaStream_t handle, so no torch headers are needed.
#include <pybind11/pybind11.h>

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
#endif
}
