"""End-to-end latency of several models measured in one run, next to their GFLOPs ratio.

The question it answers (the closing note's CPU benchmark): does wall time realise the saving
the FLOPs promise? For every kernel backend asked for, all models are built with that backend
and timed round-robin on the same random image (:func:`~sdetr.profiling.speed.interleaved_latency`),
in eval mode without postprocessing. The LAST config is the baseline of the ratios:
``time_ratio = median latency / baseline median latency`` and
``gflops_ratio = GFLOPs / baseline GFLOPs`` (fvcore, same image, same module set).
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
from sdetr.profiling.flops import count_flops
from sdetr.profiling.inputs import random_input
from sdetr.profiling.modes import ModuleSet, profiling_modules
from sdetr.profiling.protocol import PAPER_FLOPS_SIZE, Protocol, hardware_description
from sdetr.profiling.speed import interleaved_latency

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _all_profiling(models: Mapping[str, nn.Module], modules: ModuleSet) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for model in models.values():
            stack.enter_context(profiling_modules(model, modules))
        yield


def _gflops(models: Mapping[str, nn.Module], inp: Any) -> dict[str, float]:
    return {name: count_flops(model, inp.images, inp.masks).gflops for name, model in models.items()}


def compare_latency(configs: Mapping[str, ExperimentConfig], *,
                    backends: Sequence[Optional[str]] = (None,),
                    image_size: tuple[int, int] = PAPER_FLOPS_SIZE, iters: int = 5,
                    warmup: int = 1, device: Optional[torch.device] = None,
                    modules: ModuleSet = "full", with_flops: bool = True,
                    seed: int = 0) -> dict[str, Any]:
    """Latency (and GFLOPs) of ``configs`` (name → config, baseline LAST) per kernel backend.

    ``backends``: kernel backends to build with (None = each config's own choice). GFLOPs do not
    depend on the backend and are counted once. ``device`` None = CPU. Returns a JSON-ready dict.
    """
    device = device or torch.device("cpu")
    if len(configs) < 2:
        raise ValueError("compare_latency needs at least two configs (the last is the baseline)")
    names = list(configs)
    baseline = names[-1]
    inp = random_input(*image_size, batch_size=1, seed=seed).to(device)
    result: dict[str, Any] = {"models": names, "baseline": baseline, "runs": []}
    for backend in backends:
        built = {name: build(cfg.model, kernel_backend=backend) for name, cfg in configs.items()}
        models = {name: b.model.to(device) for name, b in built.items()}
        with _all_profiling(models, modules):
            if with_flops and "gflops" not in result:
                result["gflops"] = _gflops(models, inp)
                result["gflops_ratio"] = {n: g / result["gflops"][baseline]
                                          for n, g in result["gflops"].items()}
            stats = interleaved_latency(models, inp, iters=iters, warmup=warmup, device=device)
        used = {name: b.kernel_backend for name, b in built.items()}
        base_ms = stats[baseline].median_ms
        result["runs"].append({
            "kernel_backend": used,
            "latency": {n: s.as_dict() for n, s in stats.items()},
            "time_ratio": {n: s.median_ms / base_ms for n, s in stats.items()},
            "time_ratio_mean": {n: s.mean_ms / stats[baseline].mean_ms for n, s in stats.items()},
            "cpu_time_ratio": {n: s.cpu_median_ms / stats[baseline].cpu_median_ms
                               for n, s in stats.items()},
            "protocol": Protocol(
                measurement="latency", input=inp.label, image_size=inp.image_size, batch_size=1,
                mode="eval, torch.no_grad, model forward only; models timed round-robin in one process",
                modules=modules, device=device.type, hardware=hardware_description(device),
                precision="fp32", kernel_backend=used, convention="median of per-forward wall "
                "times (time.perf_counter on CPU, CUDA events on GPU)", iterations=iters,
                warmup=warmup).as_dict(),
        })
        logger.info("latency with %s: %s", used, {n: round(s.median_ms, 1) for n, s in stats.items()})
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


def format_comparison(result: Mapping[str, Any]) -> str:
    """Human-readable table of a :func:`compare_latency` result."""
    lines = []
    ratios = result.get("gflops_ratio") or {}
    for run in result["runs"]:
        proto = run["protocol"]
        lines.append(f"kernel backend {run['kernel_backend']}, {proto['device']} "
                     f"({proto['threads']} threads), {proto['image_size']}, median of "
                     f"{proto['iterations']} round-robin forwards, modules {proto['modules']}")
        for name, stats in run["latency"].items():
            gflops = (result.get("gflops") or {}).get(name, float("nan"))
            lines.append(f"  {name:<28} {stats['median_ms']:9.1f} ms  {gflops:7.2f} GFLOPs  "
                         f"time ratio {run['time_ratio'][name]:.3f}  "
                         f"CPU-time ratio {run['cpu_time_ratio'][name]:.3f}  "
                         f"GFLOPs ratio {ratios.get(name, float('nan')):.3f}")
    return "\n".join(lines)
