"""Benchmarks of the compiled kernels against the reference backend (``sdetr bench kernels``)."""

from sdetr.bench.kernels import KernelTiming, format_table, median_ms, run_kernel_bench
from sdetr.bench.memory import peak_allocated_bytes
from sdetr.bench.problems import MsdaProblem, dam_problem, msda_problem

__all__ = [
    "KernelTiming",
    "MsdaProblem",
    "dam_problem",
    "format_table",
    "median_ms",
    "msda_problem",
    "peak_allocated_bytes",
    "run_kernel_bench",
]
