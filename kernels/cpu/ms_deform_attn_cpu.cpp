// CPU implementations of sdetr_C::ms_deform_attn_forward / sdetr_C::ms_deform_attn_backward
// (REFERENCE.md §3.3-§3.4): input checks, output allocation and the run-time choice of the
// instruction set; the kernels themselves are in msda_cpu_kernels.h.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <cstdlib>
#include <tuple>

#include "cpu_kernels.h"

namespace sdetr_kernels {

std::string cpu_capability() {
  static const std::string chosen = [] {
    const char* forced = std::getenv("SDETR_CPU_CAPABILITY");
    if (forced != nullptr && std::string(forced) == "default") return std::string("default");
#if defined(SDETR_HAVE_AVX2_KERNELS) && (defined(__GNUC__) || defined(__clang__))
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return std::string("avx2");
#endif
    return std::string("default");
  }();
  return chosen;
}

namespace {

bool use_avx2() {
  static const bool avx2 = cpu_capability() == "avx2";
  return avx2;
}

void check_cpu(const at::Tensor& value) {
  TORCH_CHECK_VALUE(value.device().is_cpu(), "sdetr_C CPU kernel called with value on ", value.device());
}

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  check_msda_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_cpu(value);
  const MsdaSizes sz = msda_sizes(value, sampling_locations);
  const std::vector<Level> levels = read_levels(spatial_shapes, level_start_index, sz.tokens);
  const at::Tensor value_c = value.contiguous();
  const at::Tensor loc_c = sampling_locations.contiguous();
  const at::Tensor attn_c = attention_weights.contiguous();
  at::Tensor out = at::empty({sz.batch, sz.queries, sz.heads * sz.channels}, value.options());
#if defined(SDETR_HAVE_AVX2_KERNELS)
  if (use_avx2()) {
    cpu_avx2::msda_forward(sz, levels, value_c, loc_c, attn_c, out);
    return out;
  }
#endif
  cpu_default::msda_forward(sz, levels, value_c, loc_c, attn_c, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  check_msda_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_cpu(value);
  const MsdaSizes sz = msda_sizes(value, sampling_locations);
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef({sz.batch, sz.queries, sz.heads * sz.channels}),
                    "grad_output must be (B, Q, M*D) = (", sz.batch, ", ", sz.queries, ", ", sz.heads * sz.channels,
                    "), got ", grad_output.sizes());
  TORCH_CHECK_TYPE(grad_output.scalar_type() == value.scalar_type(), "grad_output dtype ", grad_output.scalar_type(),
                   " must equal value dtype ", value.scalar_type());
  const std::vector<Level> levels = read_levels(spatial_shapes, level_start_index, sz.tokens);
  const at::Tensor grad_c = grad_output.contiguous();
  const at::Tensor value_c = value.contiguous();
  const at::Tensor loc_c = sampling_locations.contiguous();
  const at::Tensor attn_c = attention_weights.contiguous();
  const at::ScalarType acc_type = at::toOpMathType(value.scalar_type());
  at::Tensor grad_value = at::zeros(value.sizes(), value.options().dtype(acc_type));
  at::Tensor grad_loc = at::zeros_like(loc_c);
  at::Tensor grad_attn = at::zeros_like(attn_c);
#if defined(SDETR_HAVE_AVX2_KERNELS)
  if (use_avx2()) {
    cpu_avx2::msda_backward(sz, levels, grad_c, value_c, loc_c, attn_c, grad_value, grad_loc, grad_attn);
  } else {
    cpu_default::msda_backward(sz, levels, grad_c, value_c, loc_c, attn_c, grad_value, grad_loc, grad_attn);
  }
#else
  cpu_default::msda_backward(sz, levels, grad_c, value_c, loc_c, attn_c, grad_value, grad_loc, grad_attn);
#endif
  if (acc_type != value.scalar_type()) grad_value = grad_value.to(value.scalar_type());
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace
}  // namespace sdetr_kernels

TORCH_LIBRARY_IMPL(sdetr_C, CPU, m) {
  m.impl("ms_deform_attn_forward", &sdetr_kernels::ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &sdetr_kernels::ms_deform_attn_backward_cpu);
}
