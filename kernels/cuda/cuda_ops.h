// Host entry points of the CUDA kernels (kernels/cuda/*.cu), registered as the CUDA implementations
// of the sdetr_C ops in cuda_ops.cpp. Shapes, dtypes and conventions: kernels/README.md and the
// header comment of each .cu file. Every function checks its inputs (one-line ValueError/TypeError
// naming the culprit), runs on the device of its inputs and on torch's current stream.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace sdetr_kernels {
namespace cuda {

at::Tensor ms_deform_attn_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                  const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                  const at::Tensor& attention_weights);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights);

at::Tensor dam_splat(const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                     const at::Tensor& spatial_shapes, const at::Tensor& level_start_index, int64_t num_tokens);

std::tuple<at::Tensor, at::Tensor> kda_forward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                               const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                                               const at::Tensor& sampling_locations);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kda_backward(
    const at::Tensor& grad_output, const at::Tensor& grad_weights, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations);

}  // namespace cuda
}  // namespace sdetr_kernels
