// CUDA implementation of sdetr_C::kda_forward / sdetr_C::kda_backward, the key-aware deformable
// attention of Lite-DETR (REFERENCE.md §9.4); same semantics as kernels/cpu/kda_cpu_kernels.h.
//
// Shapes (B batch, N tokens, M heads, D channels per head, Q queries, L levels, P points, J = L*P):
//   query (B, Q, M, D); key, value (B, N, M, D) (the same tensor twice when tied);
//   spatial_shapes (L, 2) int64; level_start_index (L,) int64; sampling_locations
//   (B, Q, M, L, P, 2) as (x, y) in [0, 1] of the padded level map; outputs (B, Q, M*D) and the
//   softmax weights (B, Q, M, L, P).
// Sampling: the MSDA rule (pixel (x*W - 0.5, y*H - 0.5), skip unless -1 < h < H and -1 < w < W,
// zero-padded corners, floor). A skipped sample (or one on a zero-size level) has k = v = 0 and so
// still takes softmax mass exp(0 - max), as released.
// Per row (b, q, m): logit_j = <q, k_j> / sqrt(D); w = softmax_j(logit); out = sum_j w_j v_j.
// Backward (g = dL/dout, gw = dL/dw): a_j = gw_j + <g, v_j>; ds_j = w_j (a_j - sum_i w_i a_i);
// dq = sum_j ds_j k_j / sqrt(D); dV_c += w_j cw_c g; dK_c += ds_j cw_c q / sqrt(D); dloc from both maps.
// dtypes: float32, float64, float16, bfloat16, arithmetic in at::opmath_type (float for 16-bit).
//
// Layout: one row per group of G lanes (cuda_common.cuh), q and g in registers (kPerLane per lane).
// Forward pass 1 gathers the keys, sums <q, k_j> over the group (shuffles) and keeps an online
// softmax (running max and sum, identical in every lane); lane 0 stores the logits in a per-row
// scratch (the weights output itself for float32/float64, a float32 buffer for 16-bit inputs).
// Pass 2 gathers the values with the final weights, then the weights are written. Backward
// recomputes the logits and a_j in pass 1 (scratch (rows, J, 2)), then per sample scatters dK, dV
// with atomicAdd into float32 (float64) buffers, accumulates dq in registers and sums the
// location gradient over the group. No atomics outside dK / dV.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <cmath>
#include <tuple>
#include <type_traits>

#include "cuda_common.cuh"
#include "cuda_ops.h"

namespace sdetr_kernels {
namespace cuda {
namespace {

// v[c] = tokens[level + pixel_c * row_stride + d] (0 for a corner outside the level).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_corners(const scalar_t* __restrict__ tokens, int64_t level, int64_t row_stride,
                                             int64_t d, const BilinearSample<acc_t>& s, acc_t v[4]) {
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    v[c] = s.pixel[c] < 0 ? acc_t(0) : static_cast<acc_t>(tokens[level + s.pixel[c] * row_stride + d]);
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t bilinear(const BilinearSample<acc_t>& s, const acc_t v[4]) {
  return s.weight[0] * v[0] + s.weight[1] * v[1] + s.weight[2] * v[2] + s.weight[3] * v[3];
}

// Online softmax statistics: after every logit, total = sum_j exp(logit_j - top).
template <typename acc_t>
struct OnlineSoftmax {
  acc_t top = -static_cast<acc_t>(INFINITY);
  acc_t total = 0;
  acc_t weighted = 0;  // sum_j exp(logit_j - top) * a_j (backward only)

  __device__ __forceinline__ void add(acc_t logit, acc_t a) {
    const acc_t next = top < logit ? logit : top;
    const acc_t rescale = device_exp(top - next);
    const acc_t e = device_exp(logit - next);
    total = total * rescale + e;
    weighted = weighted * rescale + e * a;
    top = next;
  }
};

template <typename scalar_t>
struct KdaInputs {
  const scalar_t* query;  // (B, Q, M, D)
  const scalar_t* key;    // (B, N, M, D)
  const scalar_t* value;  // (B, N, M, D)
  const scalar_t* loc;    // (B, Q, M, L, P, 2)
  const int64_t* spatial_shapes;
  const int64_t* level_start_index;
};

// Corners of sample j of this thread's row; false when skipped (also for inactive rows).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ bool row_sample(const KdaInputs<scalar_t>& in, const RowThread& t, const DeviceLevel& lv,
                                           int64_t sample, BilinearSample<acc_t>& s) {
  return t.active && lv.height > 0 &&
         msda_corners<acc_t>(static_cast<acc_t>(in.loc[2 * sample]), static_cast<acc_t>(in.loc[2 * sample + 1]),
                             lv.height, lv.width, s);
}

// `logits` (rows, J) may alias `attn_out` (float32 / float64): neither is __restrict__.
template <typename scalar_t, int kPerLane>
__global__ void __launch_bounds__(kThreads)
    kda_forward_kernel(const KdaInputs<scalar_t> in, scalar_t* __restrict__ out, scalar_t* attn_out,
                       at::opmath_type<scalar_t>* logits, const RowDims dims, const at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const RowThread t = row_thread(dims);  // inactive lanes still run the loops (shuffles, __syncwarp)
  const int64_t D = dims.channels, row_stride = dims.heads * D, J = dims.levels * dims.points;
  const int64_t head = t.active ? head_offset(dims, t.row) : 0;
  acc_t* row_logits = logits + (t.active ? t.row * J : 0);
  acc_t q[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int64_t d = t.lane + i * dims.group;
    q[i] = (t.active && d < D) ? static_cast<acc_t>(in.query[t.row * D + d]) : acc_t(0);
  }
  // Pass 1: logits and softmax statistics.
  OnlineSoftmax<acc_t> softmax;
  for (int64_t l = 0; l < dims.levels; ++l) {
    const DeviceLevel lv = load_level(in.spatial_shapes, in.level_start_index, l, dims.tokens);
    const int64_t level = head + lv.start * row_stride;
    for (int64_t p = 0; p < dims.points; ++p) {
      const int64_t j = l * dims.points + p;
      BilinearSample<acc_t> s;
      acc_t part = 0;
      if (row_sample(in, t, lv, t.row * J + j, s)) {
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
          const int64_t d = t.lane + i * dims.group;
          if (d >= D) continue;
          acc_t k[4];
          load_corners(in.key, level, row_stride, d, s, k);
          part += q[i] * bilinear(s, k);
        }
      }
      const acc_t logit = group_sum(part, dims.group) * scale;
      if (t.active && t.lane == 0) row_logits[j] = logit;
      softmax.add(logit, acc_t(0));
    }
  }
  __syncwarp();  // lane 0's logits are visible to its group
  // Pass 2: out = sum_j w_j v_j.
  acc_t acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) acc[i] = acc_t(0);
  for (int64_t l = 0; l < dims.levels; ++l) {
    const DeviceLevel lv = load_level(in.spatial_shapes, in.level_start_index, l, dims.tokens);
    const int64_t level = head + lv.start * row_stride;
    for (int64_t p = 0; p < dims.points; ++p) {
      const int64_t j = l * dims.points + p;
      BilinearSample<acc_t> s;
      if (!row_sample(in, t, lv, t.row * J + j, s)) continue;
      const acc_t w = device_exp(row_logits[j] - softmax.top) / softmax.total;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int64_t d = t.lane + i * dims.group;
        if (d >= D) continue;
        acc_t v[4];
        load_corners(in.value, level, row_stride, d, s, v);
        acc[i] += w * bilinear(s, v);
      }
    }
  }
  if (t.active) {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int64_t d = t.lane + i * dims.group;
      if (d < D) out[t.row * D + d] = static_cast<scalar_t>(acc[i]);
    }
  }
  __syncwarp();  // every lane has read the logits before they are overwritten by the weights
  if (t.active) {
    for (int64_t j = t.lane; j < J; j += dims.group) {
      attn_out[t.row * J + j] = static_cast<scalar_t>(device_exp(row_logits[j] - softmax.top) / softmax.total);
    }
  }
}

template <typename scalar_t>
struct KdaGrads {
  const scalar_t* grad_out;               // (B, Q, M*D)
  const scalar_t* grad_weights;           // (B, Q, M, L, P)
  scalar_t* grad_query;                   // (B, Q, M, D)
  at::opmath_type<scalar_t>* grad_key;    // (B, N, M, D), zero-initialised
  at::opmath_type<scalar_t>* grad_value;  // (B, N, M, D), zero-initialised
  scalar_t* grad_loc;                     // (B, Q, M, L, P, 2), every entry written
  at::opmath_type<scalar_t>* scratch;     // (rows, J, 2): logit_j, a_j
};

template <typename scalar_t, int kPerLane>
__global__ void __launch_bounds__(kThreads)
    kda_backward_kernel(const KdaInputs<scalar_t> in, const KdaGrads<scalar_t> grads, const RowDims dims,
                        const at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const RowThread t = row_thread(dims);  // inactive lanes still run the loops (shuffles, __syncwarp)
  const int64_t D = dims.channels, row_stride = dims.heads * D, J = dims.levels * dims.points;
  const int64_t head = t.active ? head_offset(dims, t.row) : 0;
  acc_t* row_scratch = grads.scratch + (t.active ? t.row * J * 2 : 0);
  acc_t q[kPerLane], g[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int64_t d = t.lane + i * dims.group;
    const bool mine = t.active && d < D;
    q[i] = mine ? static_cast<acc_t>(in.query[t.row * D + d]) : acc_t(0);
    g[i] = mine ? static_cast<acc_t>(grads.grad_out[t.row * D + d]) : acc_t(0);
  }
  // Pass 1: logit_j, a_j = gw_j + <g, v_j>, softmax statistics and sum_j w_j a_j.
  OnlineSoftmax<acc_t> softmax;
  for (int64_t l = 0; l < dims.levels; ++l) {
    const DeviceLevel lv = load_level(in.spatial_shapes, in.level_start_index, l, dims.tokens);
    const int64_t level = head + lv.start * row_stride;
    for (int64_t p = 0; p < dims.points; ++p) {
      const int64_t j = l * dims.points + p;
      BilinearSample<acc_t> s;
      acc_t part_k = 0, part_v = 0;
      if (row_sample(in, t, lv, t.row * J + j, s)) {
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
          const int64_t d = t.lane + i * dims.group;
          if (d >= D) continue;
          acc_t k[4], v[4];
          load_corners(in.key, level, row_stride, d, s, k);
          load_corners(in.value, level, row_stride, d, s, v);
          part_k += q[i] * bilinear(s, k);
          part_v += g[i] * bilinear(s, v);
        }
      }
      const acc_t logit = group_sum(part_k, dims.group) * scale;
      const acc_t a = group_sum(part_v, dims.group) +
                      (t.active ? static_cast<acc_t>(grads.grad_weights[t.row * J + j]) : acc_t(0));
      if (t.active && t.lane == 0) {
        row_scratch[2 * j] = logit;
        row_scratch[2 * j + 1] = a;
      }
      softmax.add(logit, a);
    }
  }
  const acc_t mean_a = softmax.weighted / softmax.total;
  __syncwarp();  // lane 0's scratch is visible to its group
  // Pass 2: scatter dK, dV; dq in registers; dloc summed over the group.
  acc_t dq[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) dq[i] = acc_t(0);
  for (int64_t l = 0; l < dims.levels; ++l) {
    const DeviceLevel lv = load_level(in.spatial_shapes, in.level_start_index, l, dims.tokens);
    const int64_t level = head + lv.start * row_stride;
    for (int64_t p = 0; p < dims.points; ++p) {
      const int64_t j = l * dims.points + p;
      BilinearSample<acc_t> s;
      acc_t part_x = 0, part_y = 0;
      if (row_sample(in, t, lv, t.row * J + j, s)) {
        const acc_t w = device_exp(row_scratch[2 * j] - softmax.top) / softmax.total;
        const acc_t dsk = w * (row_scratch[2 * j + 1] - mean_a) * scale;  // dL / d<q, k_j>
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
          const int64_t d = t.lane + i * dims.group;
          if (d >= D) continue;
          acc_t k[4], v[4];
          load_corners(in.key, level, row_stride, d, s, k);
          load_corners(in.value, level, row_stride, d, s, v);
          dq[i] += dsk * bilinear(s, k);
          part_x += w * g[i] * (s.hy * (v[1] - v[0]) + s.ly * (v[3] - v[2])) +
                    dsk * q[i] * (s.hy * (k[1] - k[0]) + s.ly * (k[3] - k[2]));
          part_y += w * g[i] * (s.hx * (v[2] - v[0]) + s.lx * (v[3] - v[1])) +
                    dsk * q[i] * (s.hx * (k[2] - k[0]) + s.lx * (k[3] - k[1]));
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            if (s.pixel[c] < 0) continue;
            const int64_t index = level + s.pixel[c] * row_stride + d;
            atomicAdd(grads.grad_value + index, w * s.weight[c] * g[i]);
            atomicAdd(grads.grad_key + index, dsk * s.weight[c] * q[i]);
          }
        }
      }
      part_x = group_sum(part_x, dims.group);
      part_y = group_sum(part_y, dims.group);
      if (t.active && t.lane == 0) {
        const int64_t sample = t.row * J + j;
        grads.grad_loc[2 * sample] = static_cast<scalar_t>(static_cast<acc_t>(lv.width) * part_x);
        grads.grad_loc[2 * sample + 1] = static_cast<scalar_t>(static_cast<acc_t>(lv.height) * part_y);
      }
    }
  }
  if (t.active) {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int64_t d = t.lane + i * dims.group;
      if (d < D) grads.grad_query[t.row * D + d] = static_cast<scalar_t>(dq[i]);
    }
  }
}

// query (B, Q, M, D); key, value (B, N, M, D); sampling_locations (B, Q, M, L, P, 2); one dtype and CUDA device.
RowDims check_kda(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                  const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                  const at::Tensor& sampling_locations) {
  check_cuda_device({{"value", value},
                     {"query", query},
                     {"key", key},
                     {"spatial_shapes", spatial_shapes},
                     {"level_start_index", level_start_index},
                     {"sampling_locations", sampling_locations}});
  check_sampling_inputs(value, spatial_shapes, level_start_index, sampling_locations);
  TORCH_CHECK_VALUE(key.sizes() == value.sizes(), "key shape ", key.sizes(), " must equal value shape ",
                    value.sizes());
  const RowDims dims = row_dims(value, sampling_locations);
  TORCH_CHECK_VALUE(query.sizes() == at::IntArrayRef({value.size(0), dims.queries, dims.heads, dims.channels}),
                    "query must be (B, Q, M, D) = (", value.size(0), ", ", dims.queries, ", ", dims.heads, ", ",
                    dims.channels, "), got ", query.sizes());
  TORCH_CHECK_TYPE(query.scalar_type() == value.scalar_type() && key.scalar_type() == value.scalar_type(),
                   "query, key and value must share a dtype, got ", query.scalar_type(), ", ", key.scalar_type(),
                   ", ", value.scalar_type());
  return dims;
}

template <typename scalar_t>
KdaInputs<scalar_t> kda_inputs(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                               const at::Tensor& loc, const at::Tensor& shapes, const at::Tensor& starts) {
  return KdaInputs<scalar_t>{query.const_data_ptr<scalar_t>(), key.const_data_ptr<scalar_t>(),
                             value.const_data_ptr<scalar_t>(), loc.const_data_ptr<scalar_t>(),
                             shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>()};
}

// Where the forward keeps the logits: the weights output itself when it has the accumulation type,
// else a new float32 `buffer` (16-bit inputs).
template <typename scalar_t>
at::opmath_type<scalar_t>* logits_scratch(at::Tensor& attn, at::Tensor& buffer) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return attn.mutable_data_ptr<scalar_t>();
  } else {
    buffer = at::empty(attn.sizes(), attn.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    return buffer.mutable_data_ptr<acc_t>();
  }
}

// 1 / sqrt(D) computed as the CPU kernel does, in the accumulation type.
template <typename acc_t>
acc_t inverse_sqrt(int64_t channels) {
  return acc_t(1) / std::sqrt(static_cast<acc_t>(channels));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> kda_forward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                               const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                                               const at::Tensor& sampling_locations) {
  const RowDims dims = check_kda(query, key, value, spatial_shapes, level_start_index, sampling_locations);
  const c10::cuda::CUDAGuard guard(value.device());
  const int per_lane = channels_per_lane(dims.channels, dims.group);
  at::Tensor out = at::empty({value.size(0), dims.queries, dims.heads * dims.channels}, value.options());
  at::Tensor attn = at::empty(sampling_locations.sizes().slice(0, 5), value.options());
  if (dims.rows == 0) return {out, attn};
  const at::Tensor q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
  const at::Tensor loc = sampling_locations.contiguous();
  const at::Tensor shapes = spatial_shapes.contiguous(), starts = level_start_index.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const unsigned int blocks = num_blocks(dims.rows * dims.group);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "kda_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor logits_buffer;
    acc_t* logits = logits_scratch<scalar_t>(attn, logits_buffer);
    const KdaInputs<scalar_t> in = kda_inputs<scalar_t>(q, k, v, loc, shapes, starts);
    dispatch_per_lane(per_lane, [&](auto lanes) {
      kda_forward_kernel<scalar_t, decltype(lanes)::value><<<blocks, kThreads, 0, stream>>>(
          in, out.mutable_data_ptr<scalar_t>(), attn.mutable_data_ptr<scalar_t>(), logits, dims,
          inverse_sqrt<acc_t>(dims.channels));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, attn};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kda_backward(
    const at::Tensor& grad_output, const at::Tensor& grad_weights, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations) {
  const RowDims dims = check_kda(query, key, value, spatial_shapes, level_start_index, sampling_locations);
  check_cuda_device({{"value", value}, {"grad_output", grad_output}, {"grad_attention_weights", grad_weights}});
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef({value.size(0), dims.queries, dims.heads * dims.channels}),
                    "grad_output must be (B, Q, M*D), got ", grad_output.sizes());
  TORCH_CHECK_VALUE(grad_weights.sizes() == sampling_locations.sizes().slice(0, 5),
                    "grad_attention_weights must be (B, Q, M, L, P), got ", grad_weights.sizes());
  TORCH_CHECK_TYPE(
      grad_output.scalar_type() == value.scalar_type() && grad_weights.scalar_type() == value.scalar_type(),
      "gradients must have value's dtype ", value.scalar_type(), ", got ", grad_output.scalar_type(), ", ",
      grad_weights.scalar_type());
  const c10::cuda::CUDAGuard guard(value.device());
  const int per_lane = channels_per_lane(dims.channels, dims.group);
  const at::ScalarType acc_type = at::toOpMathType(value.scalar_type());
  at::Tensor grad_query = at::empty(query.sizes(), query.options());
  at::Tensor grad_key = at::zeros(value.sizes(), value.options().dtype(acc_type));
  at::Tensor grad_value = at::zeros(value.sizes(), value.options().dtype(acc_type));
  at::Tensor grad_loc = at::empty(sampling_locations.sizes(), sampling_locations.options());
  if (dims.rows > 0) {
    const at::Tensor g = grad_output.contiguous(), gw = grad_weights.contiguous();
    const at::Tensor q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
    const at::Tensor loc = sampling_locations.contiguous();
    const at::Tensor shapes = spatial_shapes.contiguous(), starts = level_start_index.contiguous();
    at::Tensor scratch = at::empty({dims.rows, dims.levels * dims.points, 2}, value.options().dtype(acc_type));
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const unsigned int blocks = num_blocks(dims.rows * dims.group);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "kda_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const KdaInputs<scalar_t> in = kda_inputs<scalar_t>(q, k, v, loc, shapes, starts);
      const KdaGrads<scalar_t> grads{g.const_data_ptr<scalar_t>(),
                                     gw.const_data_ptr<scalar_t>(),
                                     grad_query.mutable_data_ptr<scalar_t>(),
                                     grad_key.mutable_data_ptr<acc_t>(),
                                     grad_value.mutable_data_ptr<acc_t>(),
                                     grad_loc.mutable_data_ptr<scalar_t>(),
                                     scratch.mutable_data_ptr<acc_t>()};
      dispatch_per_lane(per_lane, [&](auto lanes) {
        kda_backward_kernel<scalar_t, decltype(lanes)::value><<<blocks, kThreads, 0, stream>>>(
            in, grads, dims, inverse_sqrt<acc_t>(dims.channels));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  if (acc_type != value.scalar_type()) {
    grad_key = grad_key.to(value.scalar_type());
    grad_value = grad_value.to(value.scalar_type());
  }
  return {grad_query, grad_key, grad_value, grad_loc};
}

}  // namespace cuda
}  // namespace sdetr_kernels
