// CPU implementations of sdetr_C::kda_forward / sdetr_C::kda_backward (key-aware deformable
// attention of Lite-DETR, REFERENCE.md §9.4): input checks, output allocation and the run-time
// choice of the instruction set; the kernels are in kda_cpu_kernels.h.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <tuple>

#include "cpu_kernels.h"

namespace sdetr_kernels {
namespace {

// query (B, Q, M, D); key, value (B, N, M, D); sampling_locations (B, Q, M, L, P, 2); one dtype, CPU.
MsdaSizes check_kda(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                    const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                    const at::Tensor& sampling_locations) {
  check_sampling_inputs(value, spatial_shapes, level_start_index, sampling_locations);
  TORCH_CHECK_VALUE(value.device().is_cpu(), "sdetr_C CPU kernel called with value on ", value.device());
  TORCH_CHECK_VALUE(key.sizes() == value.sizes(), "key shape ", key.sizes(), " must equal value shape ",
                    value.sizes());
  const MsdaSizes sz = msda_sizes(value, sampling_locations);
  TORCH_CHECK_VALUE(query.sizes() == at::IntArrayRef({sz.batch, sz.queries, sz.heads, sz.channels}),
                    "query must be (B, Q, M, D) = (", sz.batch, ", ", sz.queries, ", ", sz.heads, ", ", sz.channels,
                    "), got ", query.sizes());
  TORCH_CHECK_TYPE(query.scalar_type() == value.scalar_type() && key.scalar_type() == value.scalar_type(),
                   "query, key and value must share a dtype, got ", query.scalar_type(), ", ", key.scalar_type(),
                   ", ", value.scalar_type());
  TORCH_CHECK_VALUE(query.device() == value.device() && key.device() == value.device(),
                    "query, key and value must be on one device");
  return sz;
}

bool use_avx2() {
  static const bool avx2 = cpu_capability() == "avx2";
  return avx2;
}

std::tuple<at::Tensor, at::Tensor> kda_forward_cpu(const at::Tensor& query, const at::Tensor& key,
                                                   const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                   const at::Tensor& level_start_index,
                                                   const at::Tensor& sampling_locations) {
  const MsdaSizes sz = check_kda(query, key, value, spatial_shapes, level_start_index, sampling_locations);
  const std::vector<Level> levels = read_levels(spatial_shapes, level_start_index, sz.tokens);
  const at::Tensor q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
  const at::Tensor loc = sampling_locations.contiguous();
  at::Tensor out = at::empty({sz.batch, sz.queries, sz.heads * sz.channels}, value.options());
  at::Tensor attn = at::empty(sampling_locations.sizes().slice(0, 5), value.options());
#if defined(SDETR_HAVE_AVX2_KERNELS)
  if (use_avx2()) {
    cpu_avx2::kda_forward(sz, levels, q, k, v, loc, out, attn);
    return {out, attn};
  }
#endif
  cpu_default::kda_forward(sz, levels, q, k, v, loc, out, attn);
  return {out, attn};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kda_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& grad_weights, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations) {
  const MsdaSizes sz = check_kda(query, key, value, spatial_shapes, level_start_index, sampling_locations);
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef({sz.batch, sz.queries, sz.heads * sz.channels}),
                    "grad_output must be (B, Q, M*D), got ", grad_output.sizes());
  TORCH_CHECK_VALUE(grad_weights.sizes() == sampling_locations.sizes().slice(0, 5),
                    "grad_attention_weights must be (B, Q, M, L, P), got ", grad_weights.sizes());
  TORCH_CHECK_TYPE(grad_output.scalar_type() == value.scalar_type() && grad_weights.scalar_type() == value.scalar_type(),
                   "gradients must have value's dtype ", value.scalar_type());
  const std::vector<Level> levels = read_levels(spatial_shapes, level_start_index, sz.tokens);
  const at::Tensor g = grad_output.contiguous(), gw = grad_weights.contiguous();
  const at::Tensor q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
  const at::Tensor loc = sampling_locations.contiguous();
  const at::ScalarType acc_type = at::toOpMathType(value.scalar_type());
  at::Tensor grad_query = at::empty_like(q);
  at::Tensor grad_key = at::zeros(value.sizes(), value.options().dtype(acc_type));
  at::Tensor grad_value = at::zeros(value.sizes(), value.options().dtype(acc_type));
  at::Tensor grad_loc = at::zeros_like(loc);
#if defined(SDETR_HAVE_AVX2_KERNELS)
  if (use_avx2()) {
    cpu_avx2::kda_backward(sz, levels, g, gw, q, k, v, loc, grad_query, grad_key, grad_value, grad_loc);
  } else {
    cpu_default::kda_backward(sz, levels, g, gw, q, k, v, loc, grad_query, grad_key, grad_value, grad_loc);
  }
#else
  cpu_default::kda_backward(sz, levels, g, gw, q, k, v, loc, grad_query, grad_key, grad_value, grad_loc);
#endif
  if (acc_type != value.scalar_type()) {
    grad_key = grad_key.to(value.scalar_type());
    grad_value = grad_value.to(value.scalar_type());
  }
  return {grad_query, grad_key, grad_value, grad_loc};
}

}  // namespace
}  // namespace sdetr_kernels

TORCH_LIBRARY_IMPL(sdetr_C, CPU, m) {
  m.impl("kda_forward", &sdetr_kernels::kda_forward_cpu);
  m.impl("kda_backward", &sdetr_kernels::kda_backward_cpu);
}
