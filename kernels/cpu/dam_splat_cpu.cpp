// CPU kernel of the Sparse DETR DAM splat (REFERENCE.md §5.2), registered as the CPU implementation
// of sdetr_C::dam_splat.
//
// Convention (NOT the attention's): f = (x*W, y*H) with no -0.5 shift; (c0, r0) = floor(f) and
// (dx, dy) = f - (c0, r0); the 4 integer corners get a(1-dx)(1-dy), a dx(1-dy), a(1-dx)dy, a dx dy at
// flat index level_start_index[l] + r*W + c; corners outside the level are dropped; everything is
// summed over S, M, L, P. Parallel over samples with one accumulator (B, N) per thread, summed at
// the end, so the scatter is race-free and deterministic for a fixed thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/result_type.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common/checks.h"

namespace sdetr_kernels {
namespace {

struct SplatSizes {
  int64_t batch, samples, heads, levels, points, tokens;
};

template <typename acc_t>
inline void splat_one(acc_t x, acc_t y, acc_t a, const Level& lv, acc_t* dam) {
  const acc_t fx = x * static_cast<acc_t>(lv.width);
  const acc_t fy = y * static_cast<acc_t>(lv.height);
  // Every corner is outside unless -1 < f < size; this also drops NaN / inf and avoids int overflow.
  if (!(fx > acc_t(-1) && fx < static_cast<acc_t>(lv.width) && fy > acc_t(-1) && fy < static_cast<acc_t>(lv.height))) {
    return;
  }
  const acc_t cf = std::floor(fx), rf = std::floor(fy);
  const acc_t dx = fx - cf, dy = fy - rf;
  const int64_t c0 = static_cast<int64_t>(cf), r0 = static_cast<int64_t>(rf);
  const bool left = c0 >= 0, right = c0 + 1 < lv.width, top = r0 >= 0, bottom = r0 + 1 < lv.height;
  acc_t* level = dam + lv.start;
  if (top && left) level[r0 * lv.width + c0] += a * (1 - dx) * (1 - dy);
  if (top && right) level[r0 * lv.width + c0 + 1] += a * dx * (1 - dy);
  if (bottom && left) level[(r0 + 1) * lv.width + c0] += a * (1 - dx) * dy;
  if (bottom && right) level[(r0 + 1) * lv.width + c0 + 1] += a * dx * dy;
}

// Splat rows [begin, end) (one row = (b, s, m): L*P samples) into dam_images (B, N).
template <typename scalar_t>
void splat_rows(const SplatSizes& sz, const std::vector<Level>& levels, const scalar_t* loc, const scalar_t* attn,
                int64_t begin, int64_t end, at::opmath_type<scalar_t>* dam_images) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows_per_image = sz.samples * sz.heads;
  const int64_t LP = sz.levels * sz.points;
  for (int64_t r = begin; r < end; ++r) {
    acc_t* dam = dam_images + (r / rows_per_image) * sz.tokens;
    for (int64_t l = 0; l < sz.levels; ++l) {
      const Level& lv = levels[l];
      if (lv.height == 0 || lv.width == 0) continue;
      for (int64_t p = 0; p < sz.points; ++p) {
        const int64_t i = r * LP + l * sz.points + p;
        splat_one<acc_t>(loc[2 * i], loc[2 * i + 1], attn[i], lv, dam);
      }
    }
  }
}

// buffers: (T, B, N) zero-initialised accumulators, one (B, N) slab per thread. Called from inside
// another parallel region, it runs serially into slab 0.
template <typename scalar_t>
void splat_kernel(const SplatSizes& sz, const std::vector<Level>& levels, const scalar_t* loc,
                  const scalar_t* attn, at::opmath_type<scalar_t>* buffers, int64_t num_buffers) {
  const int64_t rows = sz.batch * sz.samples * sz.heads;
  if (at::in_parallel_region() || num_buffers == 1) {
    splat_rows<scalar_t>(sz, levels, loc, attn, 0, rows, buffers);
    return;
  }
  // At least ~4096 samples per chunk: small problems run on the calling thread.
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, sz.levels * sz.points));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    const int64_t tid = at::get_thread_num();
    TORCH_CHECK(tid < num_buffers, "dam_splat: thread id ", tid, " >= number of buffers ", num_buffers);
    splat_rows<scalar_t>(sz, levels, loc, attn, begin, end, buffers + tid * sz.batch * sz.tokens);
  });
}

at::Tensor dam_splat_cpu(const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                         const at::Tensor& spatial_shapes, const at::Tensor& level_start_index, int64_t num_tokens) {
  TORCH_CHECK_VALUE(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
                    "sampling_locations must be (B, S, M, L, P, 2), got ", sampling_locations.sizes());
  TORCH_CHECK_VALUE(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
                    "attention_weights shape ", attention_weights.sizes(),
                    " must equal sampling_locations.shape[:-1] = ", sampling_locations.sizes().slice(0, 5));
  TORCH_CHECK_VALUE(sampling_locations.device().is_cpu() && attention_weights.device().is_cpu(),
                    "sdetr_C CPU kernel called with tensors on ", sampling_locations.device(), " and ",
                    attention_weights.device());
  const int64_t levels_count = sampling_locations.size(3);
  TORCH_CHECK_VALUE(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == levels_count &&
                        spatial_shapes.size(1) == 2 && spatial_shapes.scalar_type() == at::kLong,
                    "spatial_shapes must be int64 of shape (", levels_count, ", 2), got ",
                    spatial_shapes.scalar_type(), " ", spatial_shapes.sizes());
  TORCH_CHECK_VALUE(level_start_index.dim() == 1 && level_start_index.size(0) == levels_count &&
                        level_start_index.scalar_type() == at::kLong,
                    "level_start_index must be int64 of shape (", levels_count, ",), got ",
                    level_start_index.scalar_type(), " ", level_start_index.sizes());
  const std::vector<Level> levels = read_levels(spatial_shapes, level_start_index, num_tokens);
  const SplatSizes sz{sampling_locations.size(0), sampling_locations.size(1), sampling_locations.size(2),
                      levels_count, sampling_locations.size(4), num_tokens};
  const at::ScalarType compute = at::result_type(sampling_locations, attention_weights);
  const at::Tensor loc_c = sampling_locations.to(compute).contiguous();
  const at::Tensor attn_c = attention_weights.to(compute).contiguous();
  const int64_t num_buffers = at::in_parallel_region() ? 1 : at::get_num_threads();
  at::Tensor buffers =
      at::zeros({num_buffers, sz.batch, sz.tokens}, attn_c.options().dtype(at::toOpMathType(compute)));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, compute, "dam_splat_cpu", [&] {
    splat_kernel<scalar_t>(sz, levels, loc_c.const_data_ptr<scalar_t>(), attn_c.const_data_ptr<scalar_t>(),
                           buffers.mutable_data_ptr<at::opmath_type<scalar_t>>(), num_buffers);
  });
  return buffers.sum(0).to(attention_weights.scalar_type());
}

}  // namespace
}  // namespace sdetr_kernels

TORCH_LIBRARY_IMPL(sdetr_C, CPU, m) { m.impl("dam_splat", &sdetr_kernels::dam_splat_cpu); }
