// MSDA and KDA CPU kernels compiled for AVX2 + FMA (x86-64 only; see msda_cpu_kernels.h). Run only when the
// CPU reports both features (ms_deform_attn_cpu.cpp). The headers are included before the target
// switch, so nothing with external linkage outside namespace cpu_avx2 is compiled for AVX2.
#include "cpu_kernels.h"

#if defined(SDETR_HAVE_AVX2_KERNELS)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

#define SDETR_CPU_ISA cpu_avx2
#include "msda_cpu_kernels.h"
#include "kda_cpu_kernels.h"

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif
#endif  // SDETR_HAVE_AVX2_KERNELS
