// CUDA implementation of sdetr_C::ms_deform_attn_forward / sdetr_C::ms_deform_attn_backward
// (REFERENCE.md §3.3-§3.4).
//
// Shapes (B batch, N tokens, M heads, D channels per head, Q queries, L levels, P points):
//   value (B, N, M, D), levels flattened level-major then row-major; spatial_shapes (L, 2) int64
//   (H_l, W_l); level_start_index (L,) int64; sampling_locations (B, Q, M, L, P, 2) as (x, y) in
//   [0, 1] of the padded level map; attention_weights (B, Q, M, L, P); output (B, Q, M*D).
// Coordinates: pixel (x*W_l - 0.5, y*H_l - 0.5); a sample is skipped unless -1 < h < H_l and
// -1 < w < W_l; each corner outside the level contributes 0; top-left corner = floor (as the
// official kernel), so at a bilinear knot d(out)/d(loc) is the right/lower one-sided derivative.
// dtypes: float32, float64, float16, bfloat16; value, locations and weights share one dtype;
// arithmetic in at::opmath_type (float for the 16-bit types), outputs in the input dtype.
//
// Forward: one row (b, q, m) per group of G lanes (cuda_common.cuh); each lane keeps its
// kPerLane channels in registers and sums A * bilinear over the L*P samples; no atomics,
// deterministic. Backward: same layout; per sample each lane forms its channels' share of
// dA = sum_c w_c <g, v_c>, dx and dy (linear in the corner values), the group sums them with
// shuffles and lane 0 writes grad_attn / grad_loc (no atomics there, deterministic); grad_value
// gets A * w_c * g by atomicAdd into a float32 (float64 for float64) buffer, rounded once to the
// input dtype at the end (its summation order is not deterministic).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <tuple>

#include "cuda_common.cuh"
#include "cuda_ops.h"

namespace sdetr_kernels {
namespace cuda {
namespace {

template <typename scalar_t, int kPerLane>
__global__ void __launch_bounds__(kThreads)
    msda_forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ spatial_shapes,
                        const int64_t* __restrict__ level_start_index, const scalar_t* __restrict__ loc,
                        const scalar_t* __restrict__ attn, scalar_t* __restrict__ out, const RowDims dims) {
  using acc_t = at::opmath_type<scalar_t>;
  const RowThread t = row_thread(dims);
  if (!t.active) return;  // no shuffles in the forward
  const int64_t D = dims.channels, row_stride = dims.heads * D, J = dims.levels * dims.points;
  const scalar_t* head = value + head_offset(dims, t.row);
  const scalar_t* row_loc = loc + t.row * J * 2;
  const scalar_t* row_attn = attn + t.row * J;
  acc_t acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) acc[i] = acc_t(0);
  for (int64_t l = 0; l < dims.levels; ++l) {
    const DeviceLevel lv = load_level(spatial_shapes, level_start_index, l, dims.tokens);
    if (lv.height == 0) continue;
    const scalar_t* level = head + lv.start * row_stride;
    for (int64_t p = 0; p < dims.points; ++p) {
      const int64_t j = l * dims.points + p;
      BilinearSample<acc_t> s;
      if (!msda_corners<acc_t>(static_cast<acc_t>(row_loc[2 * j]), static_cast<acc_t>(row_loc[2 * j + 1]),
                               lv.height, lv.width, s)) {
        continue;
      }
      const acc_t a = static_cast<acc_t>(row_attn[j]);
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        if (s.pixel[c] < 0) continue;
        const scalar_t* v = level + s.pixel[c] * row_stride;
        const acc_t cw = a * s.weight[c];
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
          const int64_t d = t.lane + i * dims.group;
          if (d < D) acc[i] += cw * static_cast<acc_t>(v[d]);
        }
      }
    }
  }
  scalar_t* o = out + t.row * D;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int64_t d = t.lane + i * dims.group;
    if (d < D) o[d] = static_cast<scalar_t>(acc[i]);
  }
}

// Per sample with corner values v_c, g = grad_output row, A the weight:
//   dA = sum_c w_c <g, v_c>;  dx = W A <g, hy (v1 - v0) + ly (v3 - v2)>;
//   dy = H A <g, hx (v2 - v0) + lx (v3 - v1)>;  dV_c += A w_c g.
// grad_loc / grad_attn are written for every sample (0 when skipped): they need no zero fill.
template <typename scalar_t, int kPerLane>
__global__ void __launch_bounds__(kThreads)
    msda_backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ value,
                         const int64_t* __restrict__ spatial_shapes, const int64_t* __restrict__ level_start_index,
                         const scalar_t* __restrict__ loc, const scalar_t* __restrict__ attn,
                         at::opmath_type<scalar_t>* __restrict__ grad_value, scalar_t* __restrict__ grad_loc,
                         scalar_t* __restrict__ grad_attn, const RowDims dims) {
  using acc_t = at::opmath_type<scalar_t>;
  const RowThread t = row_thread(dims);  // inactive lanes still run the loops (shuffles)
  const int64_t D = dims.channels, row_stride = dims.heads * D, J = dims.levels * dims.points;
  const int64_t head = t.active ? head_offset(dims, t.row) : 0;
  acc_t g[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int64_t d = t.lane + i * dims.group;
    g[i] = (t.active && d < D) ? static_cast<acc_t>(grad_out[t.row * D + d]) : acc_t(0);
  }
  for (int64_t l = 0; l < dims.levels; ++l) {
    const DeviceLevel lv = load_level(spatial_shapes, level_start_index, l, dims.tokens);
    const int64_t level = head + lv.start * row_stride;
    for (int64_t p = 0; p < dims.points; ++p) {
      const int64_t j = l * dims.points + p;
      const int64_t sample = t.row * J + j;
      BilinearSample<acc_t> s;
      const bool valid = t.active && lv.height > 0 &&
                         msda_corners<acc_t>(static_cast<acc_t>(loc[2 * sample]),
                                             static_cast<acc_t>(loc[2 * sample + 1]), lv.height, lv.width, s);
      const acc_t a = valid ? static_cast<acc_t>(attn[sample]) : acc_t(0);
      acc_t part_attn = 0, part_x = 0, part_y = 0;  // this lane's channels
      if (valid) {
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
          const int64_t d = t.lane + i * dims.group;
          if (d >= D) continue;
          acc_t v[4];
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            v[c] = acc_t(0);
            if (s.pixel[c] < 0) continue;
            const int64_t index = level + s.pixel[c] * row_stride + d;
            v[c] = static_cast<acc_t>(value[index]);
            atomicAdd(grad_value + index, a * s.weight[c] * g[i]);
          }
          part_attn += g[i] * (s.weight[0] * v[0] + s.weight[1] * v[1] + s.weight[2] * v[2] + s.weight[3] * v[3]);
          part_x += g[i] * (s.hy * (v[1] - v[0]) + s.ly * (v[3] - v[2]));
          part_y += g[i] * (s.hx * (v[2] - v[0]) + s.lx * (v[3] - v[1]));
        }
      }
      part_attn = group_sum(part_attn, dims.group);
      part_x = group_sum(part_x, dims.group);
      part_y = group_sum(part_y, dims.group);
      if (t.active && t.lane == 0) {
        grad_attn[sample] = static_cast<scalar_t>(part_attn);
        grad_loc[2 * sample] = static_cast<scalar_t>(static_cast<acc_t>(lv.width) * a * part_x);
        grad_loc[2 * sample + 1] = static_cast<scalar_t>(static_cast<acc_t>(lv.height) * a * part_y);
      }
    }
  }
}

void check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                  const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  check_cuda_device({{"value", value},
                     {"spatial_shapes", spatial_shapes},
                     {"level_start_index", level_start_index},
                     {"sampling_locations", sampling_locations},
                     {"attention_weights", attention_weights}});
  check_msda_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
}

}  // namespace

at::Tensor ms_deform_attn_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                  const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                  const at::Tensor& attention_weights) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard guard(value.device());
  const RowDims dims = row_dims(value, sampling_locations);
  const int per_lane = channels_per_lane(dims.channels, dims.group);
  at::Tensor out = at::empty({value.size(0), dims.queries, dims.heads * dims.channels}, value.options());
  if (out.numel() == 0) return out;
  const at::Tensor value_c = value.contiguous(), loc_c = sampling_locations.contiguous();
  const at::Tensor attn_c = attention_weights.contiguous();
  const at::Tensor shapes_c = spatial_shapes.contiguous(), starts_c = level_start_index.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const unsigned int blocks = num_blocks(dims.rows * dims.group);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    dispatch_per_lane(per_lane, [&](auto lanes) {
      msda_forward_kernel<scalar_t, decltype(lanes)::value><<<blocks, kThreads, 0, stream>>>(
          value_c.const_data_ptr<scalar_t>(), shapes_c.const_data_ptr<int64_t>(),
          starts_c.const_data_ptr<int64_t>(), loc_c.const_data_ptr<scalar_t>(), attn_c.const_data_ptr<scalar_t>(),
          out.mutable_data_ptr<scalar_t>(), dims);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_cuda_device({{"value", value}, {"grad_output", grad_output}});
  const c10::cuda::CUDAGuard guard(value.device());
  const RowDims dims = row_dims(value, sampling_locations);
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef({value.size(0), dims.queries, dims.heads * dims.channels}),
                    "grad_output must be (B, Q, M*D) = (", value.size(0), ", ", dims.queries, ", ",
                    dims.heads * dims.channels, "), got ", grad_output.sizes());
  TORCH_CHECK_TYPE(grad_output.scalar_type() == value.scalar_type(), "grad_output dtype ", grad_output.scalar_type(),
                   " must equal value dtype ", value.scalar_type());
  const int per_lane = channels_per_lane(dims.channels, dims.group);
  const at::ScalarType acc_type = at::toOpMathType(value.scalar_type());
  at::Tensor grad_value = at::zeros(value.sizes(), value.options().dtype(acc_type));
  at::Tensor grad_loc = at::empty(sampling_locations.sizes(), sampling_locations.options());
  at::Tensor grad_attn = at::empty(attention_weights.sizes(), attention_weights.options());
  if (dims.rows > 0) {
    const at::Tensor grad_c = grad_output.contiguous(), value_c = value.contiguous();
    const at::Tensor loc_c = sampling_locations.contiguous(), attn_c = attention_weights.contiguous();
    const at::Tensor shapes_c = spatial_shapes.contiguous(), starts_c = level_start_index.contiguous();
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const unsigned int blocks = num_blocks(dims.rows * dims.group);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda",
                                    [&] {
      dispatch_per_lane(per_lane, [&](auto lanes) {
        msda_backward_kernel<scalar_t, decltype(lanes)::value><<<blocks, kThreads, 0, stream>>>(
            grad_c.const_data_ptr<scalar_t>(), value_c.const_data_ptr<scalar_t>(),
            shapes_c.const_data_ptr<int64_t>(), starts_c.const_data_ptr<int64_t>(),
            loc_c.const_data_ptr<scalar_t>(), attn_c.const_data_ptr<scalar_t>(),
            grad_value.mutable_data_ptr<at::opmath_type<scalar_t>>(), grad_loc.mutable_data_ptr<scalar_t>(),
            grad_attn.mutable_data_ptr<scalar_t>(), dims);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  if (acc_type != value.scalar_type()) grad_value = grad_value.to(value.scalar_type());
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace cuda
}  // namespace sdetr_kernels
