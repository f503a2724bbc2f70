// KDA (key-aware deformable attention, Lite-DETR; REFERENCE.md §9.4) CPU kernel templates, included
// once per instruction set by isa_default.cpp / isa_avx2.cpp with SDETR_CPU_ISA set (see
// msda_cpu_kernels.h for the rules). Needs the helpers of msda_cpu_kernels.h (included first).
//
// Per (b, q, m) with samples j = (l, p): k_j, v_j = bilinear samples of key / value (MSDA
// convention, zero padding); a sample skipped by the MSDA rule or on a zero-size level has
// k_j = v_j = 0 and so still takes softmax mass exp(0 - max) (as released).
// logit_j = <q, k_j> / sqrt(D); w = softmax_j(logit); out = sum_j w_j v_j.
// Backward (g = dL/dout, gw = dL/dw): a_j = gw_j + <g, v_j>; ds_j = w_j (a_j - sum_i w_i a_i);
// dq = sum_j ds_j k_j / sqrt(D); dV_c += w_j cw_c g; dK_c += ds_j cw_c q / sqrt(D);
// dloc from both sampled maps. Forward parallel over (b, query block, m); backward over (b, m),
// each thread owning grad_key[b, :, m, :] and grad_value[b, :, m, :].
#ifndef SDETR_CPU_ISA
#error "define SDETR_CPU_ISA before including kda_cpu_kernels.h"
#endif

#include "cpu_kernels.h"

namespace sdetr_kernels {
namespace SDETR_CPU_ISA {
namespace {

// One sample j of one (b, q, m): corners as token rows (-1 = outside / skipped) and per-corner dots.
template <typename acc_t>
struct KdaSample {
  BilinearSample<acc_t> s;
  int64_t token[4];  // absolute token index of each corner in N, -1 when it contributes nothing
  acc_t tk[4];       // <q, key_c>
  acc_t tv[4];       // <g, value_c> (backward only)
  acc_t width, height;
  bool inside;       // false: skipped (outside (-1, H) x (-1, W) or a zero-size level)
};

// Fill samples[0..L*P) for the locations of one (b, q, m); skipped samples get token = -1.
template <typename scalar_t, typename acc_t>
SDETR_INLINE void kda_corners(const std::vector<Level>& levels, int64_t points, const scalar_t* loc,
                              KdaSample<acc_t>* samples) {
  for (size_t l = 0; l < levels.size(); ++l) {
    const Level& lv = levels[l];
    for (int64_t p = 0; p < points; ++p) {
      const int64_t j = static_cast<int64_t>(l) * points + p;
      KdaSample<acc_t>& sample = samples[j];
      sample.width = static_cast<acc_t>(lv.width);
      sample.height = static_cast<acc_t>(lv.height);
      const bool inside = lv.height > 0 && lv.width > 0 &&
                          msda_corners<acc_t>(loc[2 * j], loc[2 * j + 1], lv.height, lv.width, sample.s);
      sample.inside = inside;
      for (int c = 0; c < 4; ++c) {
        sample.token[c] = inside && sample.s.pixel[c] >= 0 ? lv.start + sample.s.pixel[c] : -1;
        sample.tk[c] = 0;
        sample.tv[c] = 0;
      }
    }
  }
}

// In place: logits[0..J) -> softmax weights.
template <typename acc_t>
SDETR_INLINE void softmax_inplace(acc_t* x, int64_t n) {
  if (n == 0) return;
  acc_t top = x[0];
  for (int64_t j = 1; j < n; ++j) top = std::max(top, x[j]);
  acc_t total = 0;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = std::exp(x[j] - top);
    total += x[j];
  }
  for (int64_t j = 0; j < n; ++j) x[j] /= total;
}

template <typename scalar_t>
struct KdaArgs {
  const scalar_t* query;  // (B, Q, M, D)
  const scalar_t* key;    // (B, N, M, D)
  const scalar_t* value;  // (B, N, M, D)
  const scalar_t* loc;    // (B, Q, M, L, P, 2)
};

// Per-thread scratch of one (b, q, m): samples and weights of its J = L*P samples.
template <typename acc_t>
struct KdaScratch {
  std::vector<KdaSample<acc_t>> samples;
  std::vector<acc_t> weights;      // softmax weights w_j
  std::vector<acc_t> grad_logits;  // backward: a_j = gw_j + <g, v_j>
  explicit KdaScratch(int64_t J)
      : samples(static_cast<size_t>(J)), weights(static_cast<size_t>(J)), grad_logits(static_cast<size_t>(J)) {}
};

// Corners, <q, key_c> dots and softmax weights of one (b, q, m); `base` = (b*N)*M*D + m*D.
template <typename scalar_t, typename acc_t>
SDETR_INLINE void kda_weights(const KdaArgs<scalar_t>& args, const std::vector<Level>& levels, int64_t points,
                              int64_t bqm, int64_t base, int64_t row, const acc_t* q, acc_t scale, int64_t D,
                              KdaScratch<acc_t>& scratch) {
  const int64_t J = static_cast<int64_t>(levels.size()) * points;
  kda_corners(levels, points, args.loc + bqm * J * 2, scratch.samples.data());
  for (int64_t j = 0; j < J; ++j) {
    KdaSample<acc_t>& sample = scratch.samples[j];
    acc_t logit = 0;
    for (int c = 0; c < 4; ++c) {
      if (sample.token[c] < 0) continue;
      sample.tk[c] = dot(q, args.key + base + sample.token[c] * row, D);
      logit += sample.s.weight[c] * sample.tk[c];
    }
    scratch.weights[j] = logit * scale;
  }
  softmax_inplace(scratch.weights.data(), J);
}

template <typename scalar_t, int kD>
void kda_forward_kernel(const MsdaSizes& sz, const std::vector<Level>& levels, const KdaArgs<scalar_t>& args,
                        scalar_t* out, scalar_t* attn_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = sz.heads, D = kD > 0 ? kD : sz.channels, J = sz.levels * sz.points, row = M * D;
  const acc_t scale = acc_t(1) / std::sqrt(static_cast<acc_t>(D));
  const int64_t blocks = (sz.queries + kQueryBlock - 1) / kQueryBlock;
  const int64_t grain = grain_for(std::min(sz.queries, kQueryBlock) * J);
  at::parallel_for(0, sz.batch * M * blocks, grain, [&](int64_t begin, int64_t end) {
    KdaScratch<acc_t> scratch(J);
    std::vector<acc_t> heap(kD > 0 ? 0 : 2 * D);
    acc_t stack[kD > 0 ? 2 * kD : 1];
    acc_t* q = kD > 0 ? stack : heap.data();
    acc_t* acc = q + D;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (M * blocks), block = (task / M) % blocks, m = task % M;
      const int64_t base = b * sz.tokens * row + m * D;
      const int64_t q_end = std::min(sz.queries, (block + 1) * kQueryBlock);
      for (int64_t qi = block * kQueryBlock; qi < q_end; ++qi) {
        const int64_t bqm = (b * sz.queries + qi) * M + m;
        for (int64_t d = 0; d < D; ++d) q[d] = static_cast<acc_t>(args.query[bqm * D + d]);
        kda_weights(args, levels, sz.points, bqm, base, row, q, scale, D, scratch);
        for (int64_t d = 0; d < D; ++d) acc[d] = 0;
        for (int64_t j = 0; j < J; ++j) {
          const KdaSample<acc_t>& sample = scratch.samples[j];
          for (int c = 0; c < 4; ++c) {
            if (sample.token[c] < 0) continue;
            axpy(acc, scratch.weights[j] * sample.s.weight[c], args.value + base + sample.token[c] * row, D);
          }
          attn_out[bqm * J + j] = static_cast<scalar_t>(scratch.weights[j]);
        }
        for (int64_t d = 0; d < D; ++d) out[bqm * D + d] = static_cast<scalar_t>(acc[d]);
      }
    }
  });
}

template <typename scalar_t>
struct KdaGrads {
  const scalar_t* grad_out;                // (B, Q, M*D)
  const scalar_t* grad_weights;            // (B, Q, M, L, P)
  scalar_t* grad_query;                    // (B, Q, M, D)
  at::opmath_type<scalar_t>* grad_key;     // (B, N, M, D), zero-initialised
  at::opmath_type<scalar_t>* grad_value;   // (B, N, M, D), zero-initialised
  scalar_t* grad_loc;                      // (B, Q, M, L, P, 2), zero-initialised
};

// Backward of one (b, q, m) after kda_weights: scatter into the key / value gradients (owned by
// this thread), write grad_query and grad_loc. g = grad_output row, dq = scratch for grad_query.
template <typename scalar_t, typename acc_t>
SDETR_INLINE void kda_scatter(const KdaArgs<scalar_t>& args, const KdaGrads<scalar_t>& grads, int64_t bqm,
                              int64_t base, int64_t row, const acc_t* q, const acc_t* g, acc_t* dq, acc_t scale,
                              int64_t D, int64_t J, KdaScratch<acc_t>& scratch) {
  const acc_t* w = scratch.weights.data();
  acc_t* ds = scratch.grad_logits.data();
  acc_t mean_a = 0;
  for (int64_t j = 0; j < J; ++j) {  // a_j = gw_j + <g, v_j>, kept in ds until the mean is known
    KdaSample<acc_t>& sample = scratch.samples[j];
    acc_t a = static_cast<acc_t>(grads.grad_weights[bqm * J + j]);
    for (int c = 0; c < 4; ++c) {
      if (sample.token[c] < 0) continue;
      sample.tv[c] = dot(g, args.value + base + sample.token[c] * row, D);
      a += sample.s.weight[c] * sample.tv[c];
    }
    ds[j] = a;
    mean_a += w[j] * a;
  }
  for (int64_t d = 0; d < D; ++d) dq[d] = 0;
  for (int64_t j = 0; j < J; ++j) {
    const KdaSample<acc_t>& sample = scratch.samples[j];
    if (!sample.inside) continue;
    const acc_t dsk = w[j] * (ds[j] - mean_a) * scale;  // d loss / d <q, k_j> = ds_j / sqrt(D)
    for (int c = 0; c < 4; ++c) {
      if (sample.token[c] < 0) continue;
      const int64_t at = base + sample.token[c] * row;
      axpy(dq, dsk * sample.s.weight[c], args.key + at, D);
      axpy(grads.grad_value + at, w[j] * sample.s.weight[c], g, D);
      axpy(grads.grad_key + at, dsk * sample.s.weight[c], q, D);
    }
    const BilinearSample<acc_t>& s = sample.s;
    const acc_t* tk = sample.tk;
    const acc_t* tv = sample.tv;
    const acc_t gx = w[j] * (s.hy * (tv[1] - tv[0]) + s.ly * (tv[3] - tv[2])) +
                     dsk * (s.hy * (tk[1] - tk[0]) + s.ly * (tk[3] - tk[2]));
    const acc_t gy = w[j] * (s.hx * (tv[2] - tv[0]) + s.lx * (tv[3] - tv[1])) +
                     dsk * (s.hx * (tk[2] - tk[0]) + s.lx * (tk[3] - tk[1]));
    grads.grad_loc[(bqm * J + j) * 2] = static_cast<scalar_t>(sample.width * gx);
    grads.grad_loc[(bqm * J + j) * 2 + 1] = static_cast<scalar_t>(sample.height * gy);
  }
  for (int64_t d = 0; d < D; ++d) grads.grad_query[bqm * D + d] = static_cast<scalar_t>(dq[d]);
}

template <typename scalar_t, int kD>
void kda_backward_kernel(const MsdaSizes& sz, const std::vector<Level>& levels, const KdaArgs<scalar_t>& args,
                         const KdaGrads<scalar_t>& grads) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = sz.heads, D = kD > 0 ? kD : sz.channels, J = sz.levels * sz.points, row = M * D;
  const acc_t scale = acc_t(1) / std::sqrt(static_cast<acc_t>(D));
  at::parallel_for(0, sz.batch * M, grain_for(sz.queries * J), [&](int64_t begin, int64_t end) {
    KdaScratch<acc_t> scratch(J);
    std::vector<acc_t> heap(kD > 0 ? 0 : 3 * D);
    acc_t stack[kD > 0 ? 3 * kD : 1];
    acc_t* q = kD > 0 ? stack : heap.data();
    acc_t* g = q + D;
    acc_t* dq = g + D;
    for (int64_t bm = begin; bm < end; ++bm) {
      const int64_t b = bm / M, m = bm % M;
      const int64_t base = b * sz.tokens * row + m * D;
      for (int64_t qi = 0; qi < sz.queries; ++qi) {
        const int64_t bqm = (b * sz.queries + qi) * M + m;
        for (int64_t d = 0; d < D; ++d) {
          q[d] = static_cast<acc_t>(args.query[bqm * D + d]);
          g[d] = static_cast<acc_t>(grads.grad_out[bqm * D + d]);
        }
        kda_weights(args, levels, sz.points, bqm, base, row, q, scale, D, scratch);
        kda_scatter(args, grads, bqm, base, row, q, g, dq, scale, D, J, scratch);
      }
    }
  });
}

}  // namespace

void kda_forward(const MsdaSizes& sz, const std::vector<Level>& levels, const at::Tensor& query,
                 const at::Tensor& key, const at::Tensor& value, const at::Tensor& loc, at::Tensor& out,
                 at::Tensor& attn) {
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, value.scalar_type(), "kda_forward_cpu", [&] {
    const KdaArgs<scalar_t> args{query.const_data_ptr<scalar_t>(), key.const_data_ptr<scalar_t>(),
                                 value.const_data_ptr<scalar_t>(), loc.const_data_ptr<scalar_t>()};
    auto* o = out.mutable_data_ptr<scalar_t>();
    auto* a = attn.mutable_data_ptr<scalar_t>();
    if (sz.channels == 32) {
      kda_forward_kernel<scalar_t, 32>(sz, levels, args, o, a);
    } else {
      kda_forward_kernel<scalar_t, 0>(sz, levels, args, o, a);
    }
  });
}

void kda_backward(const MsdaSizes& sz, const std::vector<Level>& levels, const at::Tensor& grad_output,
                  const at::Tensor& grad_weights, const at::Tensor& query, const at::Tensor& key,
                  const at::Tensor& value, const at::Tensor& loc, at::Tensor& grad_query, at::Tensor& grad_key,
                  at::Tensor& grad_value, at::Tensor& grad_loc) {
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, value.scalar_type(), "kda_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const KdaArgs<scalar_t> args{query.const_data_ptr<scalar_t>(), key.const_data_ptr<scalar_t>(),
                                 value.const_data_ptr<scalar_t>(), loc.const_data_ptr<scalar_t>()};
    const KdaGrads<scalar_t> grads{grad_output.const_data_ptr<scalar_t>(), grad_weights.const_data_ptr<scalar_t>(),
                                   grad_query.mutable_data_ptr<scalar_t>(), grad_key.mutable_data_ptr<acc_t>(),
                                   grad_value.mutable_data_ptr<acc_t>(), grad_loc.mutable_data_ptr<scalar_t>()};
    if (sz.channels == 32) {
      kda_backward_kernel<scalar_t, 32>(sz, levels, args, grads);
    } else {
      kda_backward_kernel<scalar_t, 0>(sz, levels, args, grads);
    }
  });
}

}  // namespace SDETR_CPU_ISA
}  // namespace sdetr_kernels
