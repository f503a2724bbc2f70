"""The printed table of ``sdetr bench train`` (see :mod:`sdetr.engine.bench_train`)."""

from __future__ import annotations

from typing import Any

from sdetr.engine.step_timing import PHASES

LABELS = {
    "data": "data (wait for the loader, to device)",
    "forward": "forward",
    "matcher": "Hungarian matching",
    "loss": "loss (without matching)",
    "sync": "loss/finite sync (waits for the slowest)",
    "backward": "backward",
    "wait": "wait for the other workers' backward",
    "allreduce": "gradient all-reduce",
    "optimizer": "optimizer step (DeepSpeed)",
}


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:9.1f}"


def format_train_bench(result: dict[str, Any]) -> str:
    """One column of milliseconds per step for each rank and their mean, a share column, the
    sum of the components against the measured step, the drift within the run and the loader
    processes' CPU time."""
    ranks = [r["summary"]["per_step"] for r in result["ranks"]]
    mean = {k: sum(r[k] for r in ranks) / len(ranks) for k in ranks[0]}
    threads = sorted({r["threads"] for r in result["ranks"]})
    head = [f"sdetr bench train {result['name']}: {result['workers']} worker(s) x micro-batch "
            f"{result['micro_batch_size']}, {result['accumulation']} micro-batch(es) per step "
            f"(batch {result['batch_size']}), {result['precision']}, ZeRO "
            f"{result['zero_stage']}, kernels {result['kernel_backend']}, "
            f"{'/'.join(map(str, threads))} torch thread(s) per worker, malloc retain "
            f"{result.get('malloc_retain', 'off')}",
            f"{result['steps']} steps of epoch {result.get('epoch', 1)} (train scales "
            f"{result.get('train_scales', '?')}) timed after {result['warmup']} warm-up; "
            "milliseconds per optimizer step", ""]
    cols = "".join(f"  rank{i:<3}" for i in range(len(ranks)))
    lines = [f"{'component':<42}{cols}     mean  share"]
    for phase in PHASES:
        cells = "".join(f" {_ms(r.get(phase, 0.0))}" for r in ranks)
        share = mean.get(phase, 0.0) / mean["step"]
        lines.append(f"{LABELS[phase]:<42}{cells} {_ms(mean.get(phase, 0.0))} {share:6.1%}")
    total = {i: sum(r.get(p, 0.0) for p in PHASES) for i, r in enumerate(ranks)}
    mean_total = sum(total.values()) / len(total)
    lines.append(f"{'sum of the components':<42}"
                 + "".join(f" {_ms(total[i])}" for i in total) + f" {_ms(mean_total)}")
    lines.append(f"{'measured step':<42}" + "".join(f" {_ms(r['step'])}" for r in ranks)
                 + f" {_ms(mean['step'])}")
    lines.append(f"{'components / measured step':<42}"
                 + "".join(f" {total[i] / r['step']:9.1%}" for i, r in enumerate(ranks))
                 + f" {mean_total / mean['step']:9.1%}")
    summaries = [r["summary"] for r in result["ranks"]]
    lines.append(f"{'median step':<42}" + "".join(f" {_ms(s['median_step'])}" for s in summaries))
    lines.append(f"{'first / last quarter of the steps':<42}" + "".join(
        f" {1000 * s['first_quarter_step']:.0f}/{1000 * s['last_quarter_step']:.0f}".rjust(10)
        for s in summaries))
    lines.append(f"{'loader processes CPU (not wall time)':<42}"
                 + "".join(f" {_ms(r['data_cpu'])}" for r in ranks))
    return "\n".join(head + lines)


__all__ = ["format_train_bench"]
