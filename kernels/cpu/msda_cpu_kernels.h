// MSDA CPU kernel templates, included once per instruction set by isa_default.cpp and
// isa_avx2.cpp with SDETR_CPU_ISA set to the namespace to compile them into. Every header this
// file needs is included by cpu_kernels.h *before* the including file switches the target ISA, so that
// only the code below (internal linkage or the ISA namespace) is compiled for that ISA.
//
// Layout: value (B, N, M, D) with D contiguous, so one bilinear corner of one head is a contiguous
// D-vector; the loops over D are written for the compiler to vectorise (omp simd), and D = 32
// (hidden 256, 8 heads: the papers) and D = 16 (hidden 128: the CPU presets) are specialised so
// the accumulators live in registers. Accumulation runs in at::opmath_type (float for bfloat16
// inputs, else the input type). Forward: parallel over (b, query block, m).
// Backward: parallel over (b, m) heads, so each thread owns grad_value[b, :, m, :] and the scatter
// needs neither atomics nor per-thread copies.
#ifndef SDETR_CPU_ISA
#error "define SDETR_CPU_ISA before including msda_cpu_kernels.h"
#endif

#include "cpu_kernels.h"

namespace sdetr_kernels {
namespace SDETR_CPU_ISA {
namespace {

#if defined(__GNUC__)
#define SDETR_INLINE inline __attribute__((always_inline))
#else
#define SDETR_INLINE inline
#endif

// y[0..n) += alpha * x[0..n). n is a compile-time constant when the caller specialises D.
template <typename acc_t, typename scalar_t>
SDETR_INLINE void axpy(acc_t* __restrict y, acc_t alpha, const scalar_t* __restrict x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * static_cast<acc_t>(x[i]);
}

template <typename acc_t, typename scalar_t>
SDETR_INLINE acc_t dot(const acc_t* __restrict x, const scalar_t* __restrict y, int64_t n) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += x[i] * static_cast<acc_t>(y[i]);
  return sum;
}

constexpr int64_t kQueryBlock = 64;      // queries per forward task
constexpr int64_t kMinTaskSamples = 2048;  // fewer bilinear samples than this per chunk run inline

// at::parallel_for grain (in tasks) so that a chunk holds at least kMinTaskSamples samples: small
// problems then run on the calling thread instead of paying a thread wake-up per call.
inline int64_t grain_for(int64_t samples_per_task) {
  return std::max<int64_t>(1, (kMinTaskSamples + samples_per_task - 1) / std::max<int64_t>(1, samples_per_task));
}

// Inputs of one (b, m) head: value slice and the row stride between pixels (M*D).
template <typename scalar_t>
struct HeadInputs {
  const scalar_t* value;  // &value[b, 0, m, 0]
  int64_t row;            // M * D
};

// acc[0..D) = sum_{l, p} A[i] * bilinear(value level l, loc[i]) for the samples i of one (b, q, m).
template <typename scalar_t, typename acc_t>
SDETR_INLINE void gather_head(const HeadInputs<scalar_t>& head, const std::vector<Level>& levels, int64_t points,
                              const scalar_t* loc, const scalar_t* attn, acc_t* __restrict acc, int64_t D) {
  for (int64_t d = 0; d < D; ++d) acc[d] = 0;
  for (size_t l = 0; l < levels.size(); ++l) {
    const Level& lv = levels[l];
    if (lv.height == 0 || lv.width == 0) continue;
    const scalar_t* base = head.value + lv.start * head.row;
    for (int64_t p = 0; p < points; ++p) {
      const int64_t i = static_cast<int64_t>(l) * points + p;
      BilinearSample<acc_t> s;
      if (!msda_corners<acc_t>(loc[2 * i], loc[2 * i + 1], lv.height, lv.width, s)) continue;
      const acc_t a = static_cast<acc_t>(attn[i]);
      for (int c = 0; c < 4; ++c) {
        if (s.pixel[c] >= 0) axpy(acc, a * s.weight[c], base + s.pixel[c] * head.row, D);
      }
    }
  }
}

// out[b, q, m, :] = sum_{l, p} A[b, q, m, l, p] * bilinear(value level l, head m, loc[b, q, m, l, p]).
// Tasks are (b, block of queries, m), consecutive tasks sharing the queries (and so the neighbourhoods
// they sample; measured faster than head-major order). kD > 0 fixes D at compile time (accumulator
// in registers); kD == 0 handles any D.
template <typename scalar_t, int kD>
void forward_kernel(const MsdaSizes& sz, const std::vector<Level>& levels, const scalar_t* value,
                    const scalar_t* loc, const scalar_t* attn, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = sz.heads, D = kD > 0 ? kD : sz.channels, LP = sz.levels * sz.points, row = M * D;
  const int64_t blocks = (sz.queries + kQueryBlock - 1) / kQueryBlock;
  const int64_t grain = grain_for(std::min(sz.queries, kQueryBlock) * LP);
  at::parallel_for(0, sz.batch * M * blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> heap(kD > 0 ? 0 : D);
    acc_t stack[kD > 0 ? kD : 1];
    acc_t* acc = kD > 0 ? stack : heap.data();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (M * blocks), block = (task / M) % blocks, m = task % M;
      const HeadInputs<scalar_t> head{value + b * sz.tokens * row + m * D, row};
      const int64_t q_end = std::min(sz.queries, (block + 1) * kQueryBlock);
      for (int64_t q = block * kQueryBlock; q < q_end; ++q) {
        const int64_t bqm = (b * sz.queries + q) * M + m;
        gather_head(head, levels, sz.points, loc + bqm * LP * 2, attn + bqm * LP, acc, D);
        scalar_t* o = out + bqm * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc[d]);
      }
    }
  });
}

template <typename scalar_t>
struct BackwardArgs {
  const scalar_t* grad_out;
  const scalar_t* value;
  const scalar_t* loc;
  const scalar_t* attn;
  at::opmath_type<scalar_t>* grad_value;  // (B, N, M, D), zero-initialised
  scalar_t* grad_loc;                     // zero-initialised
  scalar_t* grad_attn;                    // zero-initialised
};

// Vector-Jacobian product of one (b, q, m) given g = grad_out[b, q, m, :] (offset: &value[b, 0, m, 0]).
// Per sample with corner values v_c and t_c = <g, v_c>: dA = sum_c w_c t_c;
// dx = W A (hy (t1 - t0) + ly (t3 - t2)); dy = H A (hx (t2 - t0) + lx (t3 - t1)); dV_c += A w_c g.
template <typename scalar_t, typename acc_t>
SDETR_INLINE void scatter_head(const BackwardArgs<scalar_t>& args, const std::vector<Level>& levels, int64_t points,
                               int64_t offset, int64_t row, int64_t sample0, const acc_t* __restrict g, int64_t D) {
  for (size_t l = 0; l < levels.size(); ++l) {
    const Level& lv = levels[l];
    if (lv.height == 0 || lv.width == 0) continue;
    const int64_t level_offset = offset + lv.start * row;
    for (int64_t p = 0; p < points; ++p) {
      const int64_t i = sample0 + static_cast<int64_t>(l) * points + p;
      BilinearSample<acc_t> s;
      if (!msda_corners<acc_t>(args.loc[2 * i], args.loc[2 * i + 1], lv.height, lv.width, s)) continue;
      const acc_t a = static_cast<acc_t>(args.attn[i]);
      acc_t t[4];
      for (int c = 0; c < 4; ++c) {
        t[c] = 0;
        if (s.pixel[c] < 0) continue;
        const int64_t at_pixel = level_offset + s.pixel[c] * row;
        t[c] = dot(g, args.value + at_pixel, D);
        axpy(args.grad_value + at_pixel, a * s.weight[c], g, D);
      }
      args.grad_attn[i] =
          static_cast<scalar_t>(s.weight[0] * t[0] + s.weight[1] * t[1] + s.weight[2] * t[2] + s.weight[3] * t[3]);
      args.grad_loc[2 * i] = static_cast<scalar_t>(lv.width * a * (s.hy * (t[1] - t[0]) + s.ly * (t[3] - t[2])));
      args.grad_loc[2 * i + 1] = static_cast<scalar_t>(lv.height * a * (s.hx * (t[2] - t[0]) + s.lx * (t[3] - t[1])));
    }
  }
}

// Parallel over (b, m): each thread owns grad_value[b, :, m, :], so there are no write races.
template <typename scalar_t, int kD>
void backward_kernel(const MsdaSizes& sz, const std::vector<Level>& levels, const BackwardArgs<scalar_t>& args) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = sz.heads, D = kD > 0 ? kD : sz.channels, LP = sz.levels * sz.points, row = M * D;
  at::parallel_for(0, sz.batch * M, grain_for(sz.queries * LP), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> heap(kD > 0 ? 0 : D);
    acc_t stack[kD > 0 ? kD : 1];
    acc_t* g = kD > 0 ? stack : heap.data();
    for (int64_t bm = begin; bm < end; ++bm) {
      const int64_t b = bm / M, m = bm % M;
      for (int64_t q = 0; q < sz.queries; ++q) {
        const int64_t bqm = (b * sz.queries + q) * M + m;
        for (int64_t d = 0; d < D; ++d) g[d] = static_cast<acc_t>(args.grad_out[bqm * D + d]);
        scatter_head(args, levels, sz.points, b * sz.tokens * row + m * D, row, bqm * LP, g, D);
      }
    }
  });
}

}  // namespace

void msda_forward(const MsdaSizes& sz, const std::vector<Level>& levels, const at::Tensor& value,
                  const at::Tensor& loc, const at::Tensor& attn, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    const auto* v = value.const_data_ptr<scalar_t>();
    const auto* x = loc.const_data_ptr<scalar_t>();
    const auto* a = attn.const_data_ptr<scalar_t>();
    auto* o = out.mutable_data_ptr<scalar_t>();
    if (sz.channels == 32) {
      forward_kernel<scalar_t, 32>(sz, levels, v, x, a, o);
    } else if (sz.channels == 16) {
      forward_kernel<scalar_t, 16>(sz, levels, v, x, a, o);
    } else {
      forward_kernel<scalar_t, 0>(sz, levels, v, x, a, o);
    }
  });
}

void msda_backward(const MsdaSizes& sz, const std::vector<Level>& levels, const at::Tensor& grad_output,
                   const at::Tensor& value, const at::Tensor& loc, const at::Tensor& attn, at::Tensor& grad_value,
                   at::Tensor& grad_loc, at::Tensor& grad_attn) {
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    const BackwardArgs<scalar_t> args{grad_output.const_data_ptr<scalar_t>(), value.const_data_ptr<scalar_t>(),
                                      loc.const_data_ptr<scalar_t>(), attn.const_data_ptr<scalar_t>(),
                                      grad_value.mutable_data_ptr<at::opmath_type<scalar_t>>(),
                                      grad_loc.mutable_data_ptr<scalar_t>(), grad_attn.mutable_data_ptr<scalar_t>()};
    if (sz.channels == 32) {
      backward_kernel<scalar_t, 32>(sz, levels, args);
    } else if (sz.channels == 16) {
      backward_kernel<scalar_t, 16>(sz, levels, args);
    } else {
      backward_kernel<scalar_t, 0>(sz, levels, args);
    }
  });
}

}  // namespace SDETR_CPU_ISA
}  // namespace sdetr_kernels
