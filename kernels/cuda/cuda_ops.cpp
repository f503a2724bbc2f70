// Registers the CUDA kernels of kernels/cuda/*.cu as the CUDA implementations of the sdetr_C ops
// (schemas in kernels/bindings.cpp). Compiled by the host compiler, so nvcc never sees torch/library.h.
#include <torch/library.h>

#include "cuda_ops.h"

TORCH_LIBRARY_IMPL(sdetr_C, CUDA, m) {
  m.impl("ms_deform_attn_forward", &sdetr_kernels::cuda::ms_deform_attn_forward);
  m.impl("ms_deform_attn_backward", &sdetr_kernels::cuda::ms_deform_attn_backward);
  m.impl("dam_splat", &sdetr_kernels::cuda::dam_splat);
  m.impl("kda_forward", &sdetr_kernels::cuda::kda_forward);
  m.impl("kda_backward", &sdetr_kernels::cuda::kda_backward);
}
