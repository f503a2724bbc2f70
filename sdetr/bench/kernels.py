"""``sdetr bench kernels``: time every registered backend of the attention ops on fixed-size problems.

For each problem of :mod:`sdetr.bench.problems` (encoder-sized, Q = N = 18,549; decoder-sized,
Q = 300) and each backend of ``ms_deform_attn``: the median wall time of the forward and of
forward + backward (``out.backward(grad)`` through the public op) over ``iters`` runs after
``warmup`` runs, the peak CPU tensor memory of one run of each (:mod:`sdetr.bench.memory`), and the
ratios to the reference backend (speed-up = reference time / backend time; memory ratio = backend
peak / reference peak). The DAM splat (forward only, 6 decoder layers x 300 queries) is timed the
same way, and so is the ResNet stem's max pool (``stem_max_pool``, forward without grad and
forward + backward) on the stem map of a ``_tiny`` training batch (bf16) and of an R50 eval image
(fp32). Threads: whatever ``torch.get_num_threads()`` is when called (the CLI sets it).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from sdetr.bench.memory import peak_allocated_bytes
from sdetr.bench.problems import MsdaProblem, dam_problem, msda_problem
from sdetr.ops import (available_backends, compiled_build_info, dam_splat, kda, ms_deform_attn,
                       stem_max_pool)

MIB = 1024.0 * 1024.0
REFERENCE = "reference"


@dataclasses.dataclass
class KernelTiming:
    """One (problem, op, backend) measurement; times in ms, memory in MiB, None when not measured."""

    problem: str
    op: str
    queries: int
    backend: str
    threads: int
    iters: int
    forward_ms: float
    forward_backward_ms: float | None
    peak_forward_mib: float
    peak_forward_backward_mib: float | None
    forward_speedup: float | None = None
    forward_backward_speedup: float | None = None
    peak_memory_ratio: float | None = None


def median_ms(fn: Callable[[], object], iters: int, warmup: int) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``iters`` runs after ``warmup`` runs."""
    if iters < 1 or warmup < 0:
        raise ValueError(f"iters must be >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench_msda(problem: MsdaProblem, backend: str, iters: int, warmup: int) -> KernelTiming:
    """Forward and forward+backward of ``ms_deform_attn`` with ``backend`` on ``problem``."""
    value, shapes, starts, locations, weights = problem.inputs()

    def forward() -> torch.Tensor:
        return ms_deform_attn(value, shapes, starts, locations, weights, backend=backend)

    leaves = [t.detach().clone().requires_grad_(True) for t in (value, locations, weights)]
    grad = torch.randn(forward().shape, generator=torch.Generator().manual_seed(1))

    def forward_backward() -> None:
        for leaf in leaves:
            leaf.grad = None
        ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], backend=backend).backward(grad)

    forward_ms = median_ms(forward, iters, warmup)
    forward_backward_ms = median_ms(forward_backward, iters, warmup)
    for leaf in leaves:
        leaf.grad = None
    return KernelTiming(
        problem=problem.name, op="ms_deform_attn", queries=problem.queries, backend=backend,
        threads=torch.get_num_threads(), iters=iters, forward_ms=forward_ms,
        forward_backward_ms=forward_backward_ms,
        peak_forward_mib=peak_allocated_bytes(forward) / MIB,
        peak_forward_backward_mib=peak_allocated_bytes(forward_backward) / MIB,
    )


def bench_kda(problem: MsdaProblem, backend: str, iters: int, warmup: int) -> KernelTiming:
    """Forward and forward+backward of ``kda`` (key tied to value, as Lite-DETR's default) on ``problem``.

    The query is N(0, 1) of shape (B, Q, M, D); the loss of the backward weights both outputs.
    """
    value, shapes, starts, locations, _ = problem.inputs()
    gen = torch.Generator().manual_seed(2)
    query = torch.randn(*locations.shape[:3], value.shape[-1], generator=gen)

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        return kda(query, value, value, shapes, starts, locations, backend=backend)

    out_shape, weights_shape = (t.shape for t in forward())
    grads = (torch.randn(out_shape, generator=gen), torch.randn(weights_shape, generator=gen))
    leaves = [t.detach().clone().requires_grad_(True) for t in (query, value, locations)]

    def forward_backward() -> None:
        for leaf in leaves:
            leaf.grad = None
        out, weights = kda(leaves[0], leaves[1], leaves[1], shapes, starts, leaves[2], backend=backend)
        torch.autograd.backward((out, weights), grads)

    forward_ms = median_ms(forward, iters, warmup)
    forward_backward_ms = median_ms(forward_backward, iters, warmup)
    for leaf in leaves:
        leaf.grad = None
    return KernelTiming(
        problem=problem.name, op="kda", queries=problem.queries, backend=backend, threads=torch.get_num_threads(),
        iters=iters, forward_ms=forward_ms, forward_backward_ms=forward_backward_ms,
        peak_forward_mib=peak_allocated_bytes(forward) / MIB,
        peak_forward_backward_mib=peak_allocated_bytes(forward_backward) / MIB,
    )


def bench_dam(problem: MsdaProblem, backend: str, iters: int, warmup: int) -> KernelTiming:
    """Forward of ``dam_splat`` with ``backend`` on the decoder samples repeated for 6 layers."""
    locations, weights = dam_problem(problem)
    shapes, starts, tokens = problem.spatial_shapes, problem.level_start_index, problem.value.shape[1]

    def forward() -> torch.Tensor:
        return dam_splat(locations, weights, shapes, starts, tokens, backend=backend)

    return KernelTiming(
        problem=f"{problem.name}_x6_layers", op="dam_splat", queries=int(locations.shape[1]), backend=backend,
        threads=torch.get_num_threads(), iters=iters, forward_ms=median_ms(forward, iters, warmup),
        forward_backward_ms=None, peak_forward_mib=peak_allocated_bytes(forward) / MIB,
        peak_forward_backward_mib=None,
    )


STEM_PROBLEMS = {  # the stem map (B, 64, H/2, W/2) of a _tiny training batch and of an R50 eval image
    "tiny_train_bf16": ((4, 64, 176, 128), torch.bfloat16),
    "r50_eval_fp32": ((1, 64, 400, 667), torch.float32),
}


def bench_stem_pool(problem: str, backend: str, iters: int, warmup: int) -> KernelTiming:
    """Forward (no grad) and forward+backward of ``stem_max_pool`` on a ReLU-ed random stem map."""
    shape, dtype = STEM_PROBLEMS[problem]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen).relu().to(dtype)
    leaf = x.clone().requires_grad_(True)
    grad = torch.randn(stem_max_pool(x, backend).shape, generator=gen).to(dtype)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return stem_max_pool(x, backend)

    def forward_backward() -> None:
        leaf.grad = None
        stem_max_pool(leaf, backend).backward(grad)

    forward_ms = median_ms(forward, iters, warmup)
    forward_backward_ms = median_ms(forward_backward, iters, warmup)
    leaf.grad = None
    return KernelTiming(
        problem=problem, op="stem_max_pool", queries=0, backend=backend, threads=torch.get_num_threads(),
        iters=iters, forward_ms=forward_ms, forward_backward_ms=forward_backward_ms,
        peak_forward_mib=peak_allocated_bytes(forward) / MIB,
        peak_forward_backward_mib=peak_allocated_bytes(forward_backward) / MIB,
    )


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def add_ratios(rows: list[KernelTiming]) -> None:
    """Fill the speed-ups and memory ratio of each row against the reference row of its (problem, op)."""
    refs = {(r.problem, r.op): r for r in rows if r.backend == REFERENCE}
    for row in rows:
        ref = refs.get((row.problem, row.op))
        if ref is None:
            continue
        row.forward_speedup = _ratio(ref.forward_ms, row.forward_ms)
        row.forward_backward_speedup = _ratio(ref.forward_backward_ms, row.forward_backward_ms)
        mine = row.peak_forward_backward_mib if row.peak_forward_backward_mib is not None else row.peak_forward_mib
        theirs = ref.peak_forward_backward_mib if ref.peak_forward_backward_mib is not None else ref.peak_forward_mib
        row.peak_memory_ratio = _ratio(mine, theirs)


def _ordered(backends: list[str]) -> list[str]:
    return sorted(backends, key=lambda name: (name != REFERENCE, name))


def run_kernel_bench(iters: int = 5, warmup: int = 1, problems: tuple[str, ...] = ("encoder", "decoder"),
                     include_dam: bool = True, include_kda: bool = True,
                     include_stem_pool: bool = True) -> dict[str, Any]:
    """Run the benchmark; returns ``{"rows": [KernelTiming as dict], "threads", "iters", "warmup", ...}``."""
    rows: list[KernelTiming] = []
    for kind in problems:
        problem = msda_problem(kind)
        for backend in _ordered(available_backends("ms_deform_attn")):
            rows.append(bench_msda(problem, backend, iters, warmup))
        if include_kda:
            for backend in _ordered(available_backends("kda")):
                rows.append(bench_kda(problem, backend, iters, warmup))
        if include_dam and kind == "decoder":
            for backend in _ordered(available_backends("dam_splat")):
                rows.append(bench_dam(problem, backend, iters, warmup))
    if include_stem_pool:
        for problem in STEM_PROBLEMS:
            for backend in _ordered(available_backends("stem_max_pool")):
                rows.append(bench_stem_pool(problem, backend, iters, warmup))
    add_ratios(rows)
    return {
        "threads": torch.get_num_threads(),
        "iters": iters,
        "warmup": warmup,
        "torch": torch.__version__,
        "compiled": compiled_build_info(),
        "timing": f"median wall time of {iters} runs after {warmup} warm-up run(s)",
        "memory": "peak CPU tensor bytes allocated above the starting level during one run (torch.profiler)",
        "rows": [dataclasses.asdict(row) for row in rows],
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(result: dict[str, Any]) -> str:
    """Plain-text table of :func:`run_kernel_bench` output."""
    header = (f"{'op':<15}{'problem':<20}{'Q':>7}  {'backend':<10}{'fwd ms':>9}{'x ref':>7}"
              f"{'fwd+bwd ms':>12}{'x ref':>7}{'peak MiB':>10}{'mem/ref':>9}")
    lines = [header, "-" * len(header)]
    for row in result["rows"]:
        peak = row["peak_forward_backward_mib"] if row["peak_forward_backward_mib"] is not None \
            else row["peak_forward_mib"]
        lines.append(
            f"{row['op']:<15}{row['problem']:<20}{row['queries']:>7}  {row['backend']:<10}"
            f"{_fmt(row['forward_ms'], '.1f'):>9}{_fmt(row['forward_speedup'], '.1f'):>7}"
            f"{_fmt(row['forward_backward_ms'], '.1f'):>12}{_fmt(row['forward_backward_speedup'], '.1f'):>7}"
            f"{_fmt(peak, '.1f'):>10}{_fmt(row['peak_memory_ratio'], '.2f'):>9}"
        )
    lines.append(f"threads: {result['threads']}; {result['timing']}; peak MiB = fwd+bwd (fwd for dam_splat), "
                 f"{result['memory']}")
    return "\n".join(lines)
