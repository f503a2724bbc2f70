// Interface of the MSDA (REFERENCE.md §3.3-§3.4) and KDA (§9.4) CPU kernels, compiled once per
// instruction set: isa_default.cpp (baseline, any CPU) and isa_avx2.cpp (AVX2 + FMA, x86-64 only).
// ms_deform_attn_cpu.cpp / kda_cpu.cpp check the inputs, allocate the outputs and pick the
// instruction set at run time (cpu_capability()).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "../common/bilinear.h"
#include "../common/checks.h"

namespace sdetr_kernels {

// B batch, N tokens, M heads, D channels per head, Q queries, L levels, P points.
struct MsdaSizes {
  int64_t batch, tokens, heads, channels, queries, levels, points;
};

inline MsdaSizes msda_sizes(const at::Tensor& value, const at::Tensor& sampling_locations) {
  return MsdaSizes{value.size(0), value.size(1), value.size(2), value.size(3),
                   sampling_locations.size(1), sampling_locations.size(3), sampling_locations.size(4)};
}

// All tensors contiguous, on the CPU, one dtype (float, double or bfloat16), shapes checked:
// value (B, N, M, D), loc (B, Q, M, L, P, 2), attn (B, Q, M, L, P), out / grad_output (B, Q, M*D).
// grad_value is (B, N, M, D) in at::opmath_type (float for bfloat16); all gradients zero-initialised.
// KDA: query (B, Q, M, D), key (B, N, M, D), out (B, Q, M*D), attn / grad_weights (B, Q, M, L, P);
// grad_key / grad_value in at::opmath_type, grad_loc zero-initialised.
#define SDETR_DECLARE_MSDA_CPU(isa)                                                                           \
  namespace isa {                                                                                             \
  void msda_forward(const MsdaSizes& sz, const std::vector<Level>& levels, const at::Tensor& value,           \
                    const at::Tensor& loc, const at::Tensor& attn, at::Tensor& out);                          \
  void msda_backward(const MsdaSizes& sz, const std::vector<Level>& levels, const at::Tensor& grad_output,    \
                     const at::Tensor& value, const at::Tensor& loc, const at::Tensor& attn,                  \
                     at::Tensor& grad_value, at::Tensor& grad_loc, at::Tensor& grad_attn);                    \
  void kda_forward(const MsdaSizes& sz, const std::vector<Level>& levels, const at::Tensor& query,            \
                   const at::Tensor& key, const at::Tensor& value, const at::Tensor& loc, at::Tensor& out,    \
                   at::Tensor& attn);                                                                         \
  void kda_backward(const MsdaSizes& sz, const std::vector<Level>& levels, const at::Tensor& grad_output,     \
                    const at::Tensor& grad_weights, const at::Tensor& query, const at::Tensor& key,           \
                    const at::Tensor& value, const at::Tensor& loc, at::Tensor& grad_query,                   \
                    at::Tensor& grad_key, at::Tensor& grad_value, at::Tensor& grad_loc);                      \
  }

SDETR_DECLARE_MSDA_CPU(cpu_default)
#if defined(__x86_64__) || defined(_M_X64)
#define SDETR_HAVE_AVX2_KERNELS 1
SDETR_DECLARE_MSDA_CPU(cpu_avx2)
#endif

// Instruction set the CPU kernels run with: "avx2" when the CPU has AVX2 and FMA (and the build has
// those kernels), else "default". SDETR_CPU_CAPABILITY=default in the environment forces the
// baseline kernels (read once, at the first call).
std::string cpu_capability();

}  // namespace sdetr_kernels
