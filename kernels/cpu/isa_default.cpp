// MSDA and KDA CPU kernels for the baseline instruction set of the build (see msda_cpu_kernels.h).
#include "cpu_kernels.h"

#define SDETR_CPU_ISA cpu_default
#include "msda_cpu_kernels.h"
#include "kda_cpu_kernels.h"
