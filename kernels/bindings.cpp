// Op schemas of the compiled kernels and the Python module entry point of sdetr._C.
//
// The ops live in their own namespace, sdetr_C (the public ops sdetr::ms_deform_attn* and
// sdetr::dam_splat are defined in Python by sdetr/ops and dispatch to these through the backend
// registry). Device implementations are registered next to their kernels with
// TORCH_LIBRARY_IMPL(sdetr_C, CPU, m) in kernels/cpu/ and TORCH_LIBRARY_IMPL(sdetr_C, CUDA, m) in
// kernels/cuda/. Fake (meta) implementations and autograd are registered from Python in
// sdetr/ops/compiled.py (see set_python_module below).
#include <Python.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>

#include "cpu/cpu_kernels.h"

#define SDETR_STR_(...) #__VA_ARGS__
#define SDETR_STR(...) SDETR_STR_(__VA_ARGS__)

namespace sdetr_kernels {
namespace {

std::string json_bool(bool flag) { return flag ? "true" : "false"; }

std::string compiler_name() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#else
  return "unknown";
#endif
}

std::string simd_flags() {
  std::string out;
#if defined(__SSE2__)
  out += "sse2,";
#endif
#if defined(__AVX2__)
  out += "avx2,";
#endif
#if defined(__FMA__)
  out += "fma,";
#endif
#if defined(__AVX512F__)
  out += "avx512f,";
#endif
#if defined(__ARM_NEON)
  out += "neon,";
#endif
  if (!out.empty()) out.pop_back();
  return out;
}

// A JSON object describing the build; parsed by sdetr.ops.compiled.compiled_build_info().
std::string build_info() {
#if defined(SDETR_BUILD_CXX_FLAGS)
  const std::string cxx_flags = SDETR_STR(SDETR_BUILD_CXX_FLAGS);
#else
  const std::string cxx_flags;
#endif
#if defined(SDETR_WITH_CUDA)
  const bool with_cuda = true;
#else
  const bool with_cuda = false;
#endif
#if defined(SDETR_BUILD_CUDA_ARCHS)
  const std::string archs = SDETR_STR(SDETR_BUILD_CUDA_ARCHS);
#else
  const std::string archs;
#endif
#if defined(_OPENMP)
  const bool openmp = true;
#else
  const bool openmp = false;
#endif
  return std::string("{") + "\"compiler\": \"" + compiler_name() + "\", \"cxx_flags\": \"" + cxx_flags +
         "\", \"simd\": \"" + simd_flags() + "\", \"cpu_capability\": \"" + cpu_capability() +
         "\", \"openmp\": " + json_bool(openmp) +
         ", \"cuda\": " + json_bool(with_cuda) + ", \"cuda_archs\": \"" + archs + "\", \"torch_version\": \"" +
         TORCH_VERSION + "\"}";
}

}  // namespace
}  // namespace sdetr_kernels

TORCH_LIBRARY(sdetr_C, m) {
  m.set_python_module("sdetr.ops.compiled");
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) -> (Tensor, Tensor, Tensor)");
  m.def(
      "dam_splat(Tensor sampling_locations, Tensor attention_weights, Tensor spatial_shapes, "
      "Tensor level_start_index, int num_tokens) -> Tensor");
  m.def(
      "kda_forward(Tensor query, Tensor key, Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations) -> (Tensor, Tensor)");
  m.def(
      "kda_backward(Tensor grad_output, Tensor grad_attention_weights, Tensor query, Tensor key, Tensor value, "
      "Tensor spatial_shapes, Tensor level_start_index, Tensor sampling_locations) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("stem_max_pool_forward(Tensor input) -> (Tensor, Tensor)");
  m.def("build_info() -> str", &sdetr_kernels::build_info);
}

// `import sdetr._C` loads this library, which runs the registrations above; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                          "sdetr compiled kernels; the ops are torch.ops.sdetr_C.*", -1, nullptr};
  return PyModule_Create(&module_def);
}
