// Input validation shared by the kernels (C++ side of the shape rules in sdetr/ops/ms_deform_attn.py).
// Failures raise ValueError (TORCH_CHECK_VALUE) or TypeError (TORCH_CHECK_TYPE) with a one-line
// message naming the culprit.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

namespace sdetr_kernels {

// One level of the flattened multi-scale map: (H_l, W_l) and its offset into N.
struct Level {
  int64_t height;
  int64_t width;
  int64_t start;
};

// value (B, N, M, D); sampling_locations (B, Q, M, L, P, 2) in value's dtype;
// spatial_shapes (L, 2) int64; level_start_index (L,) int64; all on value's device.
inline void check_sampling_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                  const at::Tensor& level_start_index, const at::Tensor& sampling_locations) {
  TORCH_CHECK_VALUE(value.dim() == 4, "value must be (B, N, M, D), got ", value.sizes());
  TORCH_CHECK_VALUE(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
                    "sampling_locations must be (B, Q, M, L, P, 2), got ", sampling_locations.sizes());
  TORCH_CHECK_VALUE(sampling_locations.size(0) == value.size(0) && sampling_locations.size(2) == value.size(2),
                    "sampling_locations (B, M) = (", sampling_locations.size(0), ", ", sampling_locations.size(2),
                    ") do not match value (B, M) = (", value.size(0), ", ", value.size(2), ")");
  const int64_t levels = sampling_locations.size(3);
  TORCH_CHECK_VALUE(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == levels && spatial_shapes.size(1) == 2 &&
                        spatial_shapes.scalar_type() == at::kLong,
                    "spatial_shapes must be int64 of shape (", levels, ", 2), got ", spatial_shapes.scalar_type(),
                    " ", spatial_shapes.sizes());
  TORCH_CHECK_VALUE(level_start_index.dim() == 1 && level_start_index.size(0) == levels &&
                        level_start_index.scalar_type() == at::kLong,
                    "level_start_index must be int64 of shape (", levels, ",), got ",
                    level_start_index.scalar_type(), " ", level_start_index.sizes());
  TORCH_CHECK_TYPE(value.scalar_type() == sampling_locations.scalar_type(),
                   "value and sampling_locations must share a dtype, got ", value.scalar_type(), ", ",
                   sampling_locations.scalar_type());
  for (const at::Tensor* t : {&spatial_shapes, &level_start_index, &sampling_locations}) {
    TORCH_CHECK_VALUE(t->device() == value.device(), "all inputs must be on value's device ", value.device(),
                      ", got a tensor on ", t->device());
  }
}

// check_sampling_inputs plus attention_weights (B, Q, M, L, P) in value's dtype on value's device.
inline void check_msda_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                              const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                              const at::Tensor& attention_weights) {
  check_sampling_inputs(value, spatial_shapes, level_start_index, sampling_locations);
  TORCH_CHECK_VALUE(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
                    "attention_weights shape ", attention_weights.sizes(),
                    " must equal sampling_locations.shape[:-1] = ", sampling_locations.sizes().slice(0, 5));
  TORCH_CHECK_TYPE(value.scalar_type() == attention_weights.scalar_type(),
                   "value, sampling_locations and attention_weights must share a dtype, got ", value.scalar_type(),
                   ", ", sampling_locations.scalar_type(), ", ", attention_weights.scalar_type());
  TORCH_CHECK_VALUE(attention_weights.device() == value.device(), "all inputs must be on value's device ",
                    value.device(), ", got a tensor on ", attention_weights.device());
}

// Read the level table on the host and check it: sum of H*W must be num_tokens and
// level_start_index the exclusive cumulative sum of H*W (a device tensor is copied to the host).
inline std::vector<Level> read_levels(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                                      int64_t num_tokens) {
  const at::Tensor shapes = spatial_shapes.to(at::kCPU).contiguous();
  const at::Tensor starts = level_start_index.to(at::kCPU).contiguous();
  const int64_t* shape_ptr = shapes.data_ptr<int64_t>();
  const int64_t* start_ptr = starts.data_ptr<int64_t>();
  std::vector<Level> levels(static_cast<size_t>(shapes.size(0)));
  int64_t offset = 0;
  for (size_t l = 0; l < levels.size(); ++l) {
    const int64_t height = shape_ptr[2 * l];
    const int64_t width = shape_ptr[2 * l + 1];
    TORCH_CHECK_VALUE(height >= 0 && width >= 0, "spatial_shapes[", l, "] = (", height, ", ", width,
                      ") must be non-negative");
    TORCH_CHECK_VALUE(start_ptr[l] == offset, "level_start_index[", l, "] = ", start_ptr[l],
                      " must be the exclusive cumsum of H*W = ", offset);
    levels[l] = Level{height, width, offset};
    offset += height * width;
  }
  TORCH_CHECK_VALUE(offset == num_tokens, "spatial_shapes cover ", offset, " tokens but the flat map has N = ",
                    num_tokens);
  return levels;
}

}  // namespace sdetr_kernels
