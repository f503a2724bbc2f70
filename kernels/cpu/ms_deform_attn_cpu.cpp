// CPU kernels of multi-scale deformable attention (REFERENCE.md §3.3-§3.4), registered as the CPU
// implementations of sdetr_C::ms_deform_attn_forward / sdetr_C::ms_deform_attn_backward.
//
// Layout: value (B, N, M, D) with D contiguous, so one bilinear corner of one head is a contiguous
// D-vector; the inner loops over D are written for the compiler to vectorise (omp simd).
// Accumulation runs in at::opmath_type (float for bfloat16 inputs, else the input type).
// Forward: parallel over (b, q). Backward: parallel over (b, m) heads, so each thread owns
// grad_value[b, :, m, :] and the scatter needs neither atomics nor per-thread copies.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../common/bilinear.h"
#include "../common/checks.h"

namespace sdetr_kernels {
namespace {

struct MsdaSizes {
  int64_t batch, tokens, heads, channels, queries, levels, points;
};

MsdaSizes msda_sizes(const at::Tensor& value, const at::Tensor& sampling_locations) {
  return MsdaSizes{value.size(0), value.size(1), value.size(2), value.size(3),
                   sampling_locations.size(1), sampling_locations.size(3), sampling_locations.size(4)};
}

template <typename acc_t, typename scalar_t>
inline void axpy(acc_t* __restrict y, acc_t alpha, const scalar_t* __restrict x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * static_cast<acc_t>(x[i]);
}

template <typename acc_t, typename scalar_t>
inline acc_t dot(const acc_t* __restrict x, const scalar_t* __restrict y, int64_t n) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += x[i] * static_cast<acc_t>(y[i]);
  return sum;
}

// out[b, q, m, :] = sum_{l, p} A[b, q, m, l, p] * bilinear(value level l, head m, loc[b, q, m, l, p]).
template <typename scalar_t>
void forward_kernel(const MsdaSizes& sz, const std::vector<Level>& levels, const scalar_t* value,
                    const scalar_t* loc, const scalar_t* attn, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = sz.heads, D = sz.channels, LP = sz.levels * sz.points, row = sz.heads * sz.channels;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, M * LP));
  at::parallel_for(0, sz.batch * sz.queries, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(static_cast<size_t>(D));
    for (int64_t bq = begin; bq < end; ++bq) {
      const scalar_t* value_b = value + (bq / sz.queries) * sz.tokens * row;
      for (int64_t m = 0; m < M; ++m) {
        const int64_t bqm = bq * M + m;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t l = 0; l < sz.levels; ++l) {
          const Level& lv = levels[l];
          if (lv.height == 0 || lv.width == 0) continue;
          const scalar_t* base = value_b + lv.start * row + m * D;
          for (int64_t p = 0; p < sz.points; ++p) {
            const int64_t i = bqm * LP + l * sz.points + p;
            BilinearSample<acc_t> s;
            if (!msda_corners<acc_t>(loc[2 * i], loc[2 * i + 1], lv.height, lv.width, s)) continue;
            const acc_t a = static_cast<acc_t>(attn[i]);
            for (int c = 0; c < 4; ++c) {
              if (s.pixel[c] >= 0) axpy(acc.data(), a * s.weight[c], base + s.pixel[c] * row, D);
            }
          }
        }
        scalar_t* o = out + bqm * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc[d]);
      }
    }
  });
}

struct BackwardPtrs {
  const void* grad_out;
  const void* value;
  const void* loc;
  const void* attn;
  void* grad_value;  // acc_t, (B, N, M, D), zero-initialised
  void* grad_loc;    // scalar_t, zero-initialised
  void* grad_attn;   // scalar_t, zero-initialised
};

// Vector-Jacobian product. Per sample with corner values v_c and t_c = <g, v_c>:
// dA = sum_c w_c t_c; dx = W * A * (hy (t1 - t0) + ly (t3 - t2)); dy = H * A * (hx (t2 - t0) + lx (t3 - t1));
// dV_c += A * w_c * g.
template <typename scalar_t>
void backward_kernel(const MsdaSizes& sz, const std::vector<Level>& levels, const BackwardPtrs& ptr) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto* grad_out = static_cast<const scalar_t*>(ptr.grad_out);
  const auto* value = static_cast<const scalar_t*>(ptr.value);
  const auto* loc = static_cast<const scalar_t*>(ptr.loc);
  const auto* attn = static_cast<const scalar_t*>(ptr.attn);
  auto* grad_value = static_cast<acc_t*>(ptr.grad_value);
  auto* grad_loc = static_cast<scalar_t*>(ptr.grad_loc);
  auto* grad_attn = static_cast<scalar_t*>(ptr.grad_attn);
  const int64_t M = sz.heads, D = sz.channels, LP = sz.levels * sz.points, row = sz.heads * sz.channels;
  at::parallel_for(0, sz.batch * M, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> g(static_cast<size_t>(D));
    for (int64_t bm = begin; bm < end; ++bm) {
      const int64_t b = bm / M, m = bm % M;
      for (int64_t q = 0; q < sz.queries; ++q) {
        const int64_t bqm = (b * sz.queries + q) * M + m;
        for (int64_t d = 0; d < D; ++d) g[d] = static_cast<acc_t>(grad_out[bqm * D + d]);
        for (int64_t l = 0; l < sz.levels; ++l) {
          const Level& lv = levels[l];
          if (lv.height == 0 || lv.width == 0) continue;
          const int64_t offset = (b * sz.tokens + lv.start) * row + m * D;
          for (int64_t p = 0; p < sz.points; ++p) {
            const int64_t i = bqm * LP + l * sz.points + p;
            BilinearSample<acc_t> s;
            if (!msda_corners<acc_t>(loc[2 * i], loc[2 * i + 1], lv.height, lv.width, s)) continue;
            const acc_t a = static_cast<acc_t>(attn[i]);
            acc_t t[4];
            for (int c = 0; c < 4; ++c) {
              t[c] = 0;
              if (s.pixel[c] < 0) continue;
              const int64_t at_pixel = offset + s.pixel[c] * row;
              t[c] = dot(g.data(), value + at_pixel, D);
              axpy(grad_value + at_pixel, a * s.weight[c], g.data(), D);
            }
            grad_attn[i] = static_cast<scalar_t>(s.weight[0] * t[0] + s.weight[1] * t[1] + s.weight[2] * t[2] +
                                                 s.weight[3] * t[3]);
            grad_loc[2 * i] = static_cast<scalar_t>(lv.width * a * (s.hy * (t[1] - t[0]) + s.ly * (t[3] - t[2])));
            grad_loc[2 * i + 1] =
                static_cast<scalar_t>(lv.height * a * (s.hx * (t[2] - t[0]) + s.lx * (t[3] - t[1])));
          }
        }
      }
    }
  });
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
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    forward_kernel<scalar_t>(sz, levels, value_c.const_data_ptr<scalar_t>(), loc_c.const_data_ptr<scalar_t>(),
                             attn_c.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>());
  });
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
  const BackwardPtrs ptrs{grad_c.const_data_ptr(), value_c.const_data_ptr(), loc_c.const_data_ptr(),
                          attn_c.const_data_ptr(), grad_value.mutable_data_ptr(), grad_loc.mutable_data_ptr(),
                          grad_attn.mutable_data_ptr()};
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu",
                                 [&] { backward_kernel<scalar_t>(sz, levels, ptrs); });
  if (acc_type != value.scalar_type()) grad_value = grad_value.to(value.scalar_type());
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace
}  // namespace sdetr_kernels

TORCH_LIBRARY_IMPL(sdetr_C, CPU, m) {
  m.impl("ms_deform_attn_forward", &sdetr_kernels::ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &sdetr_kernels::ms_deform_attn_backward_cpu);
}
