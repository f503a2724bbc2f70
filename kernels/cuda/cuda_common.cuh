// Helpers shared by the CUDA kernels (included by the .cu files only).
//
// Thread layout of the MSDA and KDA kernels: a "row" is one (b, q, m) = one query of one head, with
// row index (b*Q + q)*M + m. A group of G consecutive lanes of one warp handles a row,
// G = min(32, next power of two >= D); lane k of the group owns the channels d = k + i*G,
// i < kPerLane (a compile-time 1, 2, 4 or 8, so D <= 256). With D = 32 (every model of the suite)
// a warp is one row and lane = channel, so loads of a D-vector are coalesced. Reductions over the
// D channels (backward, KDA logits) are butterfly shuffles inside the group: every lane ends with
// the same bitwise sum. All lanes of a warp run the same loop over (l, p), also lanes whose row is
// past the end ("inactive"), so the shuffles always have the full warp.
//
// Level table: spatial_shapes / level_start_index are read on the device (no host copy). Their
// consistency with N is not checked on the CUDA path (that would need a device->host copy, and the
// public ops already check it); a level that does not fit inside [0, N) is treated as empty, so a
// bad table can give wrong numbers but never reads or writes out of bounds.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>

#include "../common/bilinear.h"
#include "../common/checks.h"

namespace sdetr_kernels {
namespace cuda {

constexpr int kThreads = 256;      // threads per block of every kernel
constexpr int kWarp = 32;
constexpr int64_t kMaxChannels = kWarp * 8;  // D limit of the MSDA / KDA CUDA kernels

// ----------------------------------------------------------------------------------------- host

struct NamedTensor {
  const char* name;
  const at::Tensor& tensor;
};

// All tensors on one CUDA device (the first one's); the error names the culprit.
inline void check_cuda_device(std::initializer_list<NamedTensor> tensors) {
  const NamedTensor& first = *tensors.begin();
  TORCH_CHECK_VALUE(first.tensor.is_cuda(), "sdetr_C CUDA kernel: ", first.name, " is on ", first.tensor.device(),
                    ", expected a CUDA device");
  for (const NamedTensor& t : tensors) {
    TORCH_CHECK_VALUE(t.tensor.device() == first.tensor.device(), "sdetr_C CUDA kernel: ", t.name, " is on ",
                      t.tensor.device(), " but ", first.name, " is on ", first.tensor.device());
  }
}

// Sizes passed to the MSDA / KDA kernels by value.
struct RowDims {
  int64_t tokens;    // N
  int64_t heads;     // M
  int64_t channels;  // D
  int64_t queries;   // Q
  int64_t levels;    // L
  int64_t points;    // P
  int64_t rows;      // B * Q * M
  int group;         // G, lanes per row
};

inline int lanes_per_row(int64_t channels) {
  int group = 1;
  while (group < channels && group < kWarp) group *= 2;
  return group;
}

// Channels per lane (the kernels' kPerLane): 1, 2, 4 or 8.
inline int channels_per_lane(int64_t channels, int group) {
  TORCH_CHECK_VALUE(channels <= kMaxChannels, "sdetr_C CUDA kernels support at most ", kMaxChannels,
                    " channels per head, got D = ", channels);
  int per_lane = 1;
  while (static_cast<int64_t>(per_lane) * group < channels) per_lane *= 2;
  return per_lane;
}

inline RowDims row_dims(const at::Tensor& value, const at::Tensor& sampling_locations) {
  RowDims dims{};
  dims.tokens = value.size(1);
  dims.heads = value.size(2);
  dims.channels = value.size(3);
  dims.queries = sampling_locations.size(1);
  dims.levels = sampling_locations.size(3);
  dims.points = sampling_locations.size(4);
  dims.rows = value.size(0) * dims.queries * dims.heads;
  dims.group = lanes_per_row(dims.channels);
  return dims;
}

// Blocks of kThreads for `threads` threads (> 0).
inline unsigned int num_blocks(int64_t threads) {
  const int64_t blocks = (threads + kThreads - 1) / kThreads;
  TORCH_CHECK_VALUE(blocks <= std::numeric_limits<int32_t>::max(), "sdetr_C CUDA kernel: problem too large (",
                    threads, " threads)");
  return static_cast<unsigned int>(blocks);
}

// Calls launch(std::integral_constant<int, kPerLane>{}) for the runtime per_lane.
template <typename Launch>
void dispatch_per_lane(int per_lane, const Launch& launch) {
  switch (per_lane) {
    case 1: launch(std::integral_constant<int, 1>{}); break;
    case 2: launch(std::integral_constant<int, 2>{}); break;
    case 4: launch(std::integral_constant<int, 4>{}); break;
    case 8: launch(std::integral_constant<int, 8>{}); break;
    default: TORCH_CHECK(false, "sdetr_C CUDA kernel: unsupported channels per lane ", per_lane);
  }
}

// --------------------------------------------------------------------------------------- device

__device__ __forceinline__ float device_floor(float x) { return floorf(x); }
__device__ __forceinline__ double device_floor(double x) { return floor(x); }
__device__ __forceinline__ float device_exp(float x) { return expf(x); }
__device__ __forceinline__ double device_exp(double x) { return exp(x); }

// One level of the table read on the device; height = width = 0 when it is empty or does not fit in [0, N).
struct DeviceLevel {
  int64_t height, width, start;
};

__device__ __forceinline__ DeviceLevel load_level(const int64_t* __restrict__ spatial_shapes,
                                                  const int64_t* __restrict__ level_start_index, int64_t level,
                                                  int64_t tokens) {
  DeviceLevel lv{spatial_shapes[2 * level], spatial_shapes[2 * level + 1], level_start_index[level]};
  const bool fits = lv.height > 0 && lv.width > 0 && lv.height <= tokens && lv.width <= tokens && lv.start >= 0 &&
                    lv.start <= tokens && lv.height * lv.width <= tokens - lv.start;
  if (!fits) lv.height = lv.width = 0;
  return lv;
}

// Sum of v over the `group` lanes of a row (group divides 32); every lane gets the same sum.
// Must be reached by all 32 lanes of the warp.
template <typename T>
__device__ __forceinline__ T group_sum(T v, int group) {
  for (int offset = group >> 1; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Position of this thread in the row layout.
struct RowThread {
  int64_t row;  // (b*Q + q)*M + m
  int lane;     // 0 .. group-1
  bool active;  // row < rows
};

__device__ __forceinline__ RowThread row_thread(const RowDims& dims) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t row = tid / dims.group;
  return RowThread{row, static_cast<int>(tid % dims.group), row < dims.rows};
}

// Offset of value[b, 0, m, 0] for a row (value / key layout (B, N, M, D)).
__device__ __forceinline__ int64_t head_offset(const RowDims& dims, int64_t row) {
  const int64_t b = row / (dims.queries * dims.heads);
  const int64_t m = row % dims.heads;
  return (b * dims.tokens * dims.heads + m) * dims.channels;
}

}  // namespace cuda
}  // namespace sdetr_kernels
