"""Profiling as a stage of a run: :func:`profile_model` measures, :func:`log_profile` tracks.

``profile_model(cfg, ["params", "flops", "fps", "memory"])`` builds the model of ``cfg`` (or
takes a :class:`~sdetr.models.BuiltModel`) and returns one JSON-ready dict::

    {"preset", "name", "backbone", "rho",            # what was profiled
     "params_total", ...,                             # "params": sdetr.profiling.params
     "flops":  {"gflops", "groups", "detail", "by_operator", "uncounted",
                "ignored_by_convention", "gflops_inference_only", "reference",
                "reconciliation", "published_protocol", "protocol"},
     "fps":    {"b1": {"fps", "fps_mean", "median_ms", ..., "protocol"}, "b4": {...}},
     "memory": {"inference_b1": {"peak_bytes", ..., "protocol"}, "train_b1": {...}},
     "environment": {"device", "hardware", "kernel_backend", "torch_version", "threads"}}

:func:`profile_metrics` flattens it to MLflow metrics (``params_*``, ``gflops``,
``gflops_<group>``, ``gflops_inference_only``, ``gflops_published_protocol``, ``fps_b1``,
``fps_b4``, ``latency_b1_ms``, ``mem_*``; logged as ``profile/<name>``) and :func:`profile_tags`
to tags.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from sdetr.config import ExperimentConfig
from sdetr.models import BuiltModel, build
from sdetr.profiling.modes import ModuleSet
from sdetr.profiling.params import count_parameters
from sdetr.profiling.protocol import hardware_description, resolve_device
from sdetr.profiling.sections import flops_section, fps_section, kernel_backends, memory_section

logger = logging.getLogger(__name__)

WHAT_AVAILABLE: tuple[str, ...] = ("params", "flops", "fps", "memory")


@dataclass(frozen=True)
class ProfileOptions:
    """How to profile (defaults = the official protocols, REFERENCE §10).

    image_size: (H, W) of the random image of every measurement; None = per measurement:
        850×1040 for FLOPs, the first val image (or a random 800×1201 one) for FPS and memory.
    coco_root / split: a COCO folder; FPS and memory then use ``split[0]`` after the eval
        resize (``eval_size`` / ``eval_max_size``), replicated to the batch size.
    num_images: > 0 → FLOPs averaged over the first ``num_images`` images of ``split`` (needs
        ``coco_root``); the last image's value (what the official script returns) is reported too.
    modules: "full" (what the released code runs at inference, e.g. encoder auxiliary heads) or
        "inference_only".
    batch_sizes: FPS and memory batch sizes ("FPS" = 1, "B4FPS" = 4).
    iters / warmup: timed and untimed forwards (None: 300 / 5 on CUDA, 10 / 2 on CPU).
    memory_warmup: untimed steps before each memory measurement.
    match_published: for a Sparse DETR preset with a published GFLOPs figure, also count the
        protocol that reproduces it (inference-only, one 800×1066 image; one more trace).
    device: "auto", "cpu", "cuda" or "cuda:N". kernel_backend: overrides cfg.model.kernel_backend.
    fold_bn: time FPS on an eval-time copy with every Conv2d → BatchNorm pair folded into one conv
        (:func:`sdetr.models.fuse.fold_batch_norm`; recorded as ``fold_bn`` in the FPS protocols).
        FLOPs and memory always measure the model as built (their protocols say fold_bn False).
    """

    image_size: Optional[tuple[int, int]] = None
    coco_root: Optional[str] = None
    split: str = "val2017"
    eval_size: int = 800
    eval_max_size: int = 1333
    num_images: int = 0
    modules: ModuleSet = "full"
    batch_sizes: tuple[int, ...] = (1, 4)
    iters: Optional[int] = None
    warmup: Optional[int] = None
    memory_warmup: int = 1
    match_published: bool = True
    device: str = "auto"
    kernel_backend: Optional[str] = None
    fold_bn: bool = True
    seed: int = 0

    def validate(self) -> None:
        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) < 1):
            raise ValueError(f"image_size must be two positive ints (H, W), got {self.image_size}")
        if self.num_images and not self.coco_root:
            raise ValueError("num_images > 0 needs coco_root (the 100-image protocol reads COCO val)")
        if self.num_images < 0:
            raise ValueError(f"num_images must be >= 0, got {self.num_images}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch_sizes must be positive ints, got {self.batch_sizes}")
        if self.modules not in ("full", "inference_only"):
            raise ValueError(f"modules must be 'full' or 'inference_only', got {self.modules!r}")


def describe_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """Header of a profile: preset, name, backbone, rho (token-selecting encoders only)."""
    out: dict[str, Any] = {"preset": cfg.preset, "name": cfg.name,
                           "backbone": cfg.model.backbone.name}
    if cfg.model.selects_tokens:
        out["rho"] = cfg.model.rho
    return out


def profile_model(cfg: ExperimentConfig, what: Sequence[str], *,
                  options: Optional[ProfileOptions] = None,
                  built: Optional[BuiltModel] = None) -> dict[str, Any]:
    """Measure ``what`` (subset of :data:`WHAT_AVAILABLE`) of the model of ``cfg``.

    ``built``: an already built model (weights do not change FLOPs; the model is moved to the
    device). Raises ValueError naming an unknown measurement or a bad option.
    """
    unknown = [w for w in what if w not in WHAT_AVAILABLE]
    if unknown:
        raise ValueError(f"profile: unknown measurement(s) {', '.join(unknown)} "
                         f"(available: {', '.join(WHAT_AVAILABLE)})")
    options = options or ProfileOptions()
    options.validate()
    device = resolve_device(options.device)
    built = built or build(cfg.model, kernel_backend=options.kernel_backend)
    model = built.model.to(device)
    backends = kernel_backends(cfg, built)
    result = describe_config(cfg)
    if "params" in what:
        result.update(count_parameters(model).as_dict())
    if "flops" in what:
        result["flops"] = flops_section(cfg, model, options, device, backends)
    if "fps" in what:
        result["fps"] = fps_section(model, options, device, backends)
    if "memory" in what:
        result["memory"] = memory_section(cfg, built, options, device, backends)
    result["environment"] = {"device": str(device), "hardware": hardware_description(device),
                             "kernel_backend": backends, "torch_version": torch.__version__,
                             "threads": torch.get_num_threads()}
    return result


def profile_metrics(result: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics of a profile (see the module docstring for the names)."""
    metrics = {k: float(v) for k, v in result.items() if k.startswith("params_")}
    flops = result.get("flops")
    if flops:
        metrics["gflops"] = flops["gflops"]
        metrics.update({f"gflops_{g}": v for g, v in flops["groups"].items()})
        for key in ("gflops_inference_only", "gflops_last_image"):
            if flops.get(key) is not None:
                metrics[key] = flops[key]
        if flops.get("published_protocol"):
            metrics["gflops_published_protocol"] = flops["published_protocol"]["gflops"]
    for key, stats in (result.get("fps") or {}).items():
        metrics[f"fps_{key}"] = stats["fps"]
        metrics[f"fps_mean_{key}"] = stats["fps_mean"]
        metrics[f"latency_{key}_ms"] = stats["median_ms"]
    for key, stats in (result.get("memory") or {}).items():
        metrics[f"mem_{key}_peak_mb"] = stats["peak_mb"]
        metrics[f"mem_{key}_increment_mb"] = stats["increment_mb"]
    return metrics


_COMMON_FIELDS = ("device", "hardware", "precision", "kernel_backend", "torch_version", "threads")
_KIND_FIELDS = ("convention",)
_SECTION_FIELDS = ("input", "image_size", "modules", "iterations", "warmup", "fold_bn")


def _tag_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "x".join(str(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def profile_tags(result: dict[str, Any]) -> dict[str, str]:
    """Protocols as tags: ``sdetr.profile.<field>`` for what all sections share (device,
    hardware, precision, kernel_backend, torch_version, threads), ``sdetr.profile.<kind>.convention``
    and ``sdetr.profile.<kind>.<section>.<field>`` (input, image_size, modules, iterations,
    warmup, fold_bn), e.g. ``sdetr.profile.fps.b4.iterations``, ``sdetr.profile.fps.b1.fold_bn``."""
    sections = [("flops", "", result.get("flops"))]
    for kind in ("fps", "memory"):
        sections += [(kind, key, value) for key, value in (result.get(kind) or {}).items()]
    tags: dict[str, str] = {}
    for kind, key, section in sections:
        if not section:
            continue
        protocol = section["protocol"]
        for field in _COMMON_FIELDS:
            tags[f"sdetr.profile.{field}"] = _tag_value(protocol[field])
        for field in _KIND_FIELDS:
            tags[f"sdetr.profile.{kind}.{field}"] = _tag_value(protocol[field])
        prefix = f"sdetr.profile.{kind}." + (f"{key}." if key else "")
        for field in _SECTION_FIELDS:
            if protocol.get(field) is not None:
                tags[prefix + field] = _tag_value(protocol[field])
    return tags


METRIC_PREFIX = "profile/"


def log_profile(result: dict[str, Any], tracker: Any, step: int = 0,
                prefix: str = METRIC_PREFIX) -> dict[str, float]:
    """Log a profile to a started tracker (:mod:`sdetr.tracking`): metrics and protocol tags.

    Metric names are :func:`profile_metrics`' with ``prefix`` (``profile/gflops``, ...: the same
    names for ``sdetr profile --tracking-uri`` and for the profiling stage of a training run).
    Params (the flattened config) and provenance tags are the caller's (the run logs them once).
    Returns the metrics logged.
    """
    metrics = {prefix + k: v for k, v in profile_metrics(result).items()}
    tracker.log_metrics(metrics, step=step)
    tracker.set_tags(profile_tags(result))
    tracker.flush()
    return metrics
