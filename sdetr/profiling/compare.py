"""End-to-end latency of several models measured in one run, next to their GFLOPs ratio.

The question it answers (the closing note's CPU benchmark): does wall time realise the saving
the FLOPs promise? For every kernel backend asked for, all models are built with that backend
and timed round-robin on the same random image (:func:`~sdetr.profiling.speed.interleaved_latency`),
in eval mode without postprocessing. The LAST config is the baseline of the ratios:
``time_ratio = median latency / baseline median latency`` and
``gflops_ratio = GFLOPs / baseline GFLOPs`` (fvcore, same image, same module set);
``saving_realised = (1 - time_ratio) / (1 - gflops_ratio)`` is the share of the FLOPs saving
that wall time realises (non-baseline models with a different GFLOPs count only).

GFLOPs are counted on the models as built (BatchNorm unfolded: the published convention). With
``fold_bn`` (default) the models are then folded in place (they are built only to be timed,
:func:`sdetr.models.fuse.fold_batch_norm`) before timing. In the same run the fp32 GEMM rate
is measured (:func:`~sdetr.profiling.gemm.measure_gemm_rate`, same thread count), and each
model's ``floor_ms = GFLOPs / matmul rate`` and ``latency_over_floor = median latency / floor``
are reported.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any, Optional, Sequence

import torch
from torch import nn

from sdetr.config import ExperimentConfig
from sdetr.models import build
from sdetr.models.fuse import fold_batch_norm
from sdetr.profiling.flops import count_flops
from sdetr.profiling.gemm import GemmRate, measure_gemm_rate
from sdetr.profiling.inputs import random_input
from sdetr.profiling.modes import ModuleSet, profiling_modules
from sdetr.profiling.protocol import PAPER_FLOPS_SIZE, Protocol, hardware_description
from sdetr.profiling.speed import TimingStats, interleaved_latency

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _all_profiling(models: Mapping[str, nn.Module], modules: ModuleSet) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for model in models.values():
            stack.enter_context(profiling_modules(model, modules))
        yield


def _gflops(models: Mapping[str, nn.Module], inp: Any) -> dict[str, float]:
    return {name: count_flops(model, inp.images, inp.masks).gflops for name, model in models.items()}


def _fold_all(models: Mapping[str, nn.Module], fold_bn: bool) -> dict[str, Any]:
    """Fold every model in place (they are timing copies); name → FoldReport.as_dict()."""
    if not fold_bn:
        return {}
    return {name: fold_batch_norm(model, inplace=True)[1].as_dict() for name, model in models.items()}


def _floors(gflops: Mapping[str, float], stats: Mapping[str, TimingStats],
            rate: GemmRate) -> dict[str, dict[str, float]]:
    floor = {n: rate.floor_ms(g) for n, g in gflops.items()}
    return {"floor_ms": floor,
            "latency_over_floor": {n: stats[n].median_ms / floor[n] for n in floor}}


def _saving_realised(time_ratio: Mapping[str, float], gflops_ratio: Mapping[str, float],
                     baseline: str) -> dict[str, float]:
    return {n: (1.0 - time_ratio[n]) / (1.0 - r) for n, r in gflops_ratio.items()
            if n != baseline and r != 1.0}


def _latency_protocol(inp: Any, modules: ModuleSet, device: torch.device, used: dict[str, str],
                      iters: int, warmup: int, fold_bn: bool,
                      folding: Mapping[str, Any]) -> dict[str, Any]:
    notes = (("fold_bn: Conv2d+BatchNorm pairs folded in place after the GFLOPs count: "
              + ", ".join(f"{n} {f['folded']}" for n, f in folding.items())),) if fold_bn else ()
    return Protocol(
        measurement="latency", input=inp.label, image_size=inp.image_size, batch_size=1,
        mode="eval, torch.no_grad, model forward only; models timed round-robin in one process",
        modules=modules, device=device.type, hardware=hardware_description(device),
        precision="fp32", kernel_backend=used, convention="median of per-forward wall "
        "times (time.perf_counter on CPU, CUDA events on GPU)", iterations=iters,
        warmup=warmup, fold_bn=fold_bn, notes=notes).as_dict()


def compare_latency(configs: Mapping[str, ExperimentConfig], *,
                    backends: Sequence[Optional[str]] = (None,),
                    image_size: tuple[int, int] = PAPER_FLOPS_SIZE, iters: int = 5,
                    warmup: int = 1, device: Optional[torch.device] = None,
                    modules: ModuleSet = "full", with_flops: bool = True,
                    fold_bn: bool = True, gemm_repeats: int = 5,
                    seed: int = 0) -> dict[str, Any]:
    """Latency (and GFLOPs, floors) of ``configs`` (name → config, baseline LAST) per backend.

    ``backends``: kernel backends to build with (None = each config's own choice). GFLOPs do not
    depend on the backend and are counted once, before folding. ``fold_bn``: fold BatchNorm
    into the convolutions before timing (module docstring). ``gemm_repeats``: timed runs of
    each GEMM-rate problem. ``device`` None = CPU. Returns a JSON-ready dict.
    """
    device = device or torch.device("cpu")
    if len(configs) < 2:
        raise ValueError("compare_latency needs at least two configs (the last is the baseline)")
    names = list(configs)
    baseline = names[-1]
    inp = random_input(*image_size, batch_size=1, seed=seed).to(device)
    result: dict[str, Any] = {"models": names, "baseline": baseline, "fold_bn": fold_bn,
                              "threads": torch.get_num_threads(), "runs": []}
    for backend in backends:
        built = {name: build(cfg.model, kernel_backend=backend) for name, cfg in configs.items()}
        models = {name: b.model.to(device) for name, b in built.items()}
        with _all_profiling(models, modules):
            if with_flops and "gflops" not in result:
                result["gflops"] = _gflops(models, inp)
                result["gflops_ratio"] = {n: g / result["gflops"][baseline]
                                          for n, g in result["gflops"].items()}
            folding = _fold_all(models, fold_bn)
            rate = measure_gemm_rate(device=device, repeats=gemm_repeats, seed=seed)
            stats = interleaved_latency(models, inp, iters=iters, warmup=warmup, device=device)
        used = {name: b.kernel_backend for name, b in built.items()}
        base_ms = stats[baseline].median_ms
        run: dict[str, Any] = {
            "kernel_backend": used,
            "fold_bn": fold_bn,
            "bn_folding": folding,
            "gemm_rate": rate.as_dict(),
            "latency": {n: s.as_dict() for n, s in stats.items()},
            "time_ratio": {n: s.median_ms / base_ms for n, s in stats.items()},
            "time_ratio_mean": {n: s.mean_ms / stats[baseline].mean_ms for n, s in stats.items()},
            "cpu_time_ratio": {n: s.cpu_median_ms / stats[baseline].cpu_median_ms
                               for n, s in stats.items()},
            "protocol": _latency_protocol(inp, modules, device, used, iters, warmup, fold_bn,
                                          folding),
        }
        if "gflops" in result:
            run.update(_floors(result["gflops"], stats, rate))
            run["saving_realised"] = _saving_realised(run["time_ratio"], result["gflops_ratio"],
                                                      baseline)
        result["runs"].append(run)
        logger.info("latency with %s (fold_bn=%s): %s", used, fold_bn,
                    {n: round(s.median_ms, 1) for n, s in stats.items()})
        del built, models
    return result


def compare_presets(names: Sequence[str], **kwargs: Any) -> dict[str, Any]:
    """:func:`compare_latency` of zoo presets or YAML files (``names``, baseline last)."""
    from sdetr.config import load_config
    configs: dict[str, ExperimentConfig] = {}
    for name in names:
        cfg = load_config(name)
        if cfg.name in configs:
            raise ValueError(f"model {name!r} is given twice")
        configs[cfg.name] = cfg
    return compare_latency(configs, **kwargs)


def _format_rate(rate: Mapping[str, Any]) -> str:
    sizes = ", ".join(f"{n}: {r:.1f}" for n, r in rate["matmul_by_size"].items())
    return (f"fp32 GEMM rate ({rate['threads']} threads, median of {rate['repeats']}): matmul "
            f"{rate['matmul_gmac_per_s']:.1f} GMAC/s (n×n, {sizes}), conv 3x3 256->256 "
            f"{rate['conv_gmac_per_s']:.1f} GMAC/s; 1 MAC = 1 flop as GFLOPs; "
            f"floor = GFLOPs / matmul rate")


def _format_model(name: str, run: Mapping[str, Any], result: Mapping[str, Any]) -> str:
    nan = float("nan")
    stats = run["latency"][name]
    gflops = (result.get("gflops") or {}).get(name, nan)
    floor = (run.get("floor_ms") or {}).get(name, nan)
    over = (run.get("latency_over_floor") or {}).get(name, nan)
    return (f"  {name:<28} {stats['median_ms']:9.1f} ms  {gflops:7.2f} GFLOPs  "
            f"floor {floor:8.1f} ms  latency/floor {over:6.2f}  "
            f"time ratio {run['time_ratio'][name]:.3f}  "
            f"CPU-time ratio {run['cpu_time_ratio'][name]:.3f}  "
            f"GFLOPs ratio {(result.get('gflops_ratio') or {}).get(name, nan):.3f}")


def format_comparison(result: Mapping[str, Any]) -> str:
    """Human-readable table of a :func:`compare_latency` result."""
    lines = []
    ratios = result.get("gflops_ratio") or {}
    baseline = result["baseline"]
    for run in result["runs"]:
        proto = run["protocol"]
        folded = ", ".join(f"{n} {f['folded']}" for n, f in run["bn_folding"].items())
        lines.append(f"kernel backend {run['kernel_backend']}, {proto['device']} "
                     f"({proto['threads']} threads), {proto['image_size']}, median of "
                     f"{proto['iterations']} round-robin forwards, modules {proto['modules']}, "
                     f"fold_bn {run['fold_bn']}" + (f" (BN folded: {folded})" if folded else ""))
        lines.append("  " + _format_rate(run["gemm_rate"]))
        lines += [_format_model(name, run, result) for name in run["latency"]]
        for name in run["latency"]:
            if name == baseline:
                continue
            realised = (run.get("saving_realised") or {}).get(name)
            lines.append(f"  {name} / {baseline}: latency ratio {run['time_ratio'][name]:.3f} "
                         f"beside GFLOPs ratio {ratios.get(name, float('nan')):.3f}"
                         + (f" ({100 * realised:.0f}% of the FLOPs saving realised)"
                            if realised is not None else ""))
    return "\n".join(lines)
