// CUDA implementation of sdetr_C::dam_splat, the Sparse DETR decoder cross-attention map
// (REFERENCE.md §5.2).
//
// Shapes: sampling_locations (B, S, M, L, P, 2) as (x, y) in [0, 1] of the padded level map,
// attention_weights (B, S, M, L, P), spatial_shapes (L, 2) int64, level_start_index (L,) int64;
// output (B, N) with N = num_tokens, in the dtype of attention_weights.
// Convention (NOT the attention's): f = (x*W, y*H) with no -0.5 shift; (c0, r0) = floor(f),
// (dx, dy) = f - (c0, r0); corners (c0, r0), (c0+1, r0), (c0, r0+1), (c0+1, r0+1) get
// a(1-dx)(1-dy), a dx(1-dy), a(1-dx)dy, a dx dy at flat index level_start_index[l] + r*W + c;
// corners outside the level are dropped; summed over S, M, L, P.
// Computation in the promoted dtype of the two inputs (as the CPU kernel); one thread per sample
// (b, s, m, l, p), atomicAdd into a float32 (float64 for float64) (B, N) buffer that is cast to the
// output dtype at the end. The summation order (and so the last bits) is not deterministic.
#include <ATen/Dispatch.h>
#include <ATen/ops/result_type.h>
#include <ATen/ops/zeros.h>

#include <algorithm>

#include "cuda_common.cuh"
#include "cuda_ops.h"

namespace sdetr_kernels {
namespace cuda {
namespace {

struct SplatDims {
  int64_t samples;    // B * S * M * L * P
  int64_t per_image;  // S * M * L * P
  int64_t levels, points, tokens;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    dam_splat_kernel(const scalar_t* __restrict__ loc, const scalar_t* __restrict__ attn,
                     const int64_t* __restrict__ spatial_shapes, const int64_t* __restrict__ level_start_index,
                     at::opmath_type<scalar_t>* __restrict__ dam, const SplatDims dims) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= dims.samples) return;
  const DeviceLevel lv = load_level(spatial_shapes, level_start_index, (i / dims.points) % dims.levels, dims.tokens);
  if (lv.height == 0) return;
  const acc_t a = static_cast<acc_t>(attn[i]);
  const acc_t fx = static_cast<acc_t>(loc[2 * i]) * static_cast<acc_t>(lv.width);
  const acc_t fy = static_cast<acc_t>(loc[2 * i + 1]) * static_cast<acc_t>(lv.height);
  // Every corner is outside unless -1 < f < size; this also drops NaN / inf and avoids int overflow.
  if (!(fx > acc_t(-1) && fx < static_cast<acc_t>(lv.width) && fy > acc_t(-1) && fy < static_cast<acc_t>(lv.height))) {
    return;
  }
  const acc_t cf = device_floor(fx), rf = device_floor(fy);
  const acc_t dx = fx - cf, dy = fy - rf;
  const int64_t c0 = static_cast<int64_t>(cf), r0 = static_cast<int64_t>(rf);
  const bool left = c0 >= 0, right = c0 + 1 < lv.width, top = r0 >= 0, bottom = r0 + 1 < lv.height;
  acc_t* level = dam + (i / dims.per_image) * dims.tokens + lv.start;
  if (top && left) atomicAdd(level + r0 * lv.width + c0, a * (1 - dx) * (1 - dy));
  if (top && right) atomicAdd(level + r0 * lv.width + c0 + 1, a * dx * (1 - dy));
  if (bottom && left) atomicAdd(level + (r0 + 1) * lv.width + c0, a * (1 - dx) * dy);
  if (bottom && right) atomicAdd(level + (r0 + 1) * lv.width + c0 + 1, a * dx * dy);
}

}  // namespace

at::Tensor dam_splat(const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                     const at::Tensor& spatial_shapes, const at::Tensor& level_start_index, int64_t num_tokens) {
  check_cuda_device({{"attention_weights", attention_weights},
                     {"sampling_locations", sampling_locations},
                     {"spatial_shapes", spatial_shapes},
                     {"level_start_index", level_start_index}});
  TORCH_CHECK_VALUE(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
                    "sampling_locations must be (B, S, M, L, P, 2), got ", sampling_locations.sizes());
  TORCH_CHECK_VALUE(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
                    "attention_weights shape ", attention_weights.sizes(),
                    " must equal sampling_locations.shape[:-1] = ", sampling_locations.sizes().slice(0, 5));
  const int64_t levels = sampling_locations.size(3);
  TORCH_CHECK_VALUE(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == levels && spatial_shapes.size(1) == 2 &&
                        spatial_shapes.scalar_type() == at::kLong,
                    "spatial_shapes must be int64 of shape (", levels, ", 2), got ", spatial_shapes.scalar_type(), " ",
                    spatial_shapes.sizes());
  TORCH_CHECK_VALUE(level_start_index.dim() == 1 && level_start_index.size(0) == levels &&
                        level_start_index.scalar_type() == at::kLong,
                    "level_start_index must be int64 of shape (", levels, ",), got ", level_start_index.scalar_type(),
                    " ", level_start_index.sizes());
  TORCH_CHECK_VALUE(num_tokens >= 0, "num_tokens must be non-negative, got ", num_tokens);
  const c10::cuda::CUDAGuard guard(attention_weights.device());
  const at::ScalarType compute = at::result_type(sampling_locations, attention_weights);
  const at::Tensor loc_c = sampling_locations.to(compute).contiguous();
  const at::Tensor attn_c = attention_weights.to(compute).contiguous();
  const at::Tensor shapes_c = spatial_shapes.contiguous(), starts_c = level_start_index.contiguous();
  at::Tensor dam = at::zeros({sampling_locations.size(0), num_tokens},
                             attention_weights.options().dtype(at::toOpMathType(compute)));
  const SplatDims dims{attn_c.numel(), attn_c.numel() / std::max<int64_t>(1, attn_c.size(0)), levels,
                       sampling_locations.size(4), num_tokens};
  if (dims.samples > 0 && num_tokens > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, compute, "dam_splat_cuda", [&] {
      dam_splat_kernel<scalar_t><<<num_blocks(dims.samples), kThreads, 0, stream>>>(
          loc_c.const_data_ptr<scalar_t>(), attn_c.const_data_ptr<scalar_t>(), shapes_c.const_data_ptr<int64_t>(),
          starts_c.const_data_ptr<int64_t>(), dam.mutable_data_ptr<at::opmath_type<scalar_t>>(), dims);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return dam.to(attention_weights.scalar_type());
}

}  // namespace cuda
}  // namespace sdetr_kernels
