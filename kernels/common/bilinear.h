// Bilinear corner computation shared by the MSDA forward/backward and KDA kernels, CPU and CUDA
// (under nvcc the function is __host__ __device__).
//
// Convention (REFERENCE.md §3.4): a normalised location (x, y) in the padded map of a level of
// size (H, W) maps to the continuous pixel coordinate (x*W - 0.5, y*H - 0.5). A sample is skipped
// unless -1 < h < H and -1 < w < W; inside, each of the 4 corners outside [0, W-1] x [0, H-1]
// contributes 0 (zero padding). The arithmetic runs in the accumulation type acc_t.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SDETR_INLINE_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define SDETR_INLINE_HD inline __attribute__((always_inline))
#else
#define SDETR_INLINE_HD inline
#endif

namespace sdetr_kernels {

// Corner order: 0 = (r0, c0), 1 = (r0, c0+1), 2 = (r0+1, c0), 3 = (r0+1, c0+1).
template <typename acc_t>
struct BilinearSample {
  int64_t pixel[4];  // flat pixel index r*W + c inside the level, -1 when the corner is outside
  acc_t weight[4];   // bilinear weight of each corner (also set for outside corners)
  acc_t lx, ly;      // fractional parts w - floor(w), h - floor(h)
  acc_t hx, hy;      // 1 - lx, 1 - ly
};

// Fill `s` for the location (x, y) in a level of size (height, width); false if the sample is skipped.
// The top-left corner is floor(), as in the official kernel.
template <typename acc_t>
SDETR_INLINE_HD bool msda_corners(acc_t x, acc_t y, int64_t height, int64_t width, BilinearSample<acc_t>& s) {
  const acc_t w = x * static_cast<acc_t>(width) - acc_t(0.5);
  const acc_t h = y * static_cast<acc_t>(height) - acc_t(0.5);
  // Written so that NaN locations are skipped too.
  if (!(h > acc_t(-1) && h < static_cast<acc_t>(height) && w > acc_t(-1) && w < static_cast<acc_t>(width))) {
    return false;
  }
  const acc_t h_floor = std::floor(h);
  const acc_t w_floor = std::floor(w);
  const int64_t r0 = static_cast<int64_t>(h_floor);
  const int64_t c0 = static_cast<int64_t>(w_floor);
  s.ly = h - h_floor;
  s.lx = w - w_floor;
  s.hy = acc_t(1) - s.ly;
  s.hx = acc_t(1) - s.lx;
  const bool top = r0 >= 0;
  const bool bottom = r0 + 1 < height;
  const bool left = c0 >= 0;
  const bool right = c0 + 1 < width;
  s.pixel[0] = (top && left) ? r0 * width + c0 : -1;
  s.pixel[1] = (top && right) ? r0 * width + c0 + 1 : -1;
  s.pixel[2] = (bottom && left) ? (r0 + 1) * width + c0 : -1;
  s.pixel[3] = (bottom && right) ? (r0 + 1) * width + c0 + 1 : -1;
  s.weight[0] = s.hy * s.hx;
  s.weight[1] = s.hy * s.lx;
  s.weight[2] = s.ly * s.hx;
  s.weight[3] = s.ly * s.lx;
  return true;
}

}  // namespace sdetr_kernels
