"""The three measured sections of a profile (FLOPs, FPS, memory), each with its protocol.

Called by :func:`sdetr.profiling.run.profile_model`; ``options`` is its
:class:`~sdetr.profiling.run.ProfileOptions`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sdetr.config import ExperimentConfig
from sdetr.models import BuiltModel
from sdetr.models.fuse import fold_batch_norm
from sdetr.ops import resolve_backend
from sdetr.profiling.flops import count_flops, inference_only_gflops, mean_flop_counts
from sdetr.profiling.inputs import (ProfileInput, coco_first_image, coco_images, random_input,
                                    synthetic_targets)
from sdetr.profiling.memory import adamw_state_bytes, inference_memory, method, train_step_memory
from sdetr.profiling.modes import describe_modules, profiling_modules
from sdetr.profiling.protocol import (DEFAULT_ITERS, DEFAULT_WARMUP, FIRST_VAL_SIZE,
                                      FLOPS_CONVENTION, FLOPS_RULES, PAPER_FLOPS_SIZE,
                                      PUBLISHED_SPARSE_SIZE, Protocol, hardware_description)
from sdetr.profiling.reference import (PUBLISHED_PROTOCOL_NOTE, is_sparse_reference,
                                       reconcile_published, reference_figures, reference_key)

EVAL_MODE = "eval, torch.no_grad, model forward only (no postprocessing, no loss)"
TIMING = ("warm-up, then timed forwards with device synchronisation ({clock}); "
          "fps = batch / median time, fps_mean = batch / mean time")


def kernel_backends(cfg: ExperimentConfig, built: BuiltModel) -> dict[str, str]:
    """Op → backend for the ops this model runs (attention op; ``dam_splat`` for Sparse DETR;
    ``stem_max_pool`` for a ResNet backbone, used on the CPU)."""
    from sdetr.models.backbone import ResNetBackbone
    from sdetr.models.builder import attention_op
    out = {attention_op(cfg.model): built.kernel_backend}
    dam_backend = getattr(built.model, "dam_backend", "absent")
    if dam_backend != "absent":
        out["dam_splat"] = resolve_backend("dam_splat", dam_backend)
    if isinstance(built.model.backbone, ResNetBackbone):
        out["stem_max_pool"] = resolve_backend("stem_max_pool", built.model.backbone.body.maxpool.backend)
    return out


def _protocol(measurement: str, inp_label: str, image_size, batch: int, mode: str,
              modules: str, device: torch.device, backends: dict[str, str], convention: str,
              **extra: Any) -> dict[str, Any]:
    return Protocol(measurement=measurement, input=inp_label, image_size=image_size,
                    batch_size=batch, mode=mode, modules=modules, device=device.type,
                    hardware=hardware_description(device), precision="fp32",
                    kernel_backend=dict(backends), convention=convention, **extra).as_dict()


def _coco_flops(model: nn.Module, options: Any, device: torch.device) -> dict[str, Any]:
    counts = [count_flops(model, inp.images.to(device), inp.masks.to(device))
              for inp in coco_images(options.coco_root, options.num_images, split=options.split,
                                     eval_size=options.eval_size,
                                     eval_max_size=options.eval_max_size)]
    return mean_flop_counts(counts)


def published_protocol(model: nn.Module, device: torch.device, published: float,
                       seed: int = 0) -> dict[str, Any]:
    """Inference-only count of one random 800×1066 image: the protocol under which the published
    Sparse DETR figures are reproduced (see :data:`PUBLISHED_SPARSE_SIZE`)."""
    inp = random_input(*PUBLISHED_SPARSE_SIZE, batch_size=1, seed=seed).to(device)
    with profiling_modules(model, "inference_only"):
        gflops = count_flops(model, inp.images, inp.masks).gflops
    return {"image_size": list(PUBLISHED_SPARSE_SIZE), "modules": "inference_only",
            "gflops": gflops, "published": published,
            "delta_pct": 100.0 * (gflops - published) / published, "note": PUBLISHED_PROTOCOL_NOTE}


def flops_section(cfg: ExperimentConfig, model: nn.Module, options: Any, device: torch.device,
                  backends: dict[str, str]) -> dict[str, Any]:
    """fvcore GFLOPs: one random image (default 850×1040) or the mean over COCO images; for a
    Sparse DETR preset also the check against the published figure (``published_protocol``)."""
    modules = describe_modules(model, options.modules)
    size, notes = None, ()
    with profiling_modules(model, options.modules):
        if options.num_images:
            section = _coco_flops(model, options, device)
            label = f"coco:{options.split}[:{options.num_images}]"
            notes = (("gflops = true mean over the images; gflops_last_image = what the "
                      "official compute_gflops returns (the last image's value)"),)
        else:
            size = options.image_size or PAPER_FLOPS_SIZE
            inp = random_input(*size, batch_size=1, seed=options.seed).to(device)
            count = count_flops(model, inp.images, inp.masks)
            section, label = count.as_dict(), inp.label
            section["gflops_inference_only"] = (
                inference_only_gflops(count) if options.modules == "full" else None)
    section["reference"] = reference_figures(cfg, section["gflops"], options.modules,
                                             section.get("gflops_inference_only"))
    published = section["reference"].get("published")
    if not options.num_images:
        section["reconciliation"] = reconcile_published(count, published)
        if options.match_published and is_sparse_reference(reference_key(cfg)):
            section["published_protocol"] = published_protocol(model, device, published,
                                                               options.seed)
    section["protocol"] = _protocol(
        "flops", label, size, 1, EVAL_MODE, modules, device, backends,
        FLOPS_CONVENTION, fold_bn=False, notes=(FLOPS_RULES, *notes))
    return section


def _fps_input(options: Any, batch: int) -> ProfileInput:
    if options.coco_root:
        return coco_first_image(options.coco_root, batch, split=options.split,
                                eval_size=options.eval_size, eval_max_size=options.eval_max_size)
    return random_input(*(options.image_size or FIRST_VAL_SIZE), batch_size=batch,
                        seed=options.seed)


def _timed_model(model: nn.Module, fold_bn: bool) -> tuple[nn.Module, tuple[str, ...]]:
    """``model`` itself, or with ``fold_bn`` an eval-time copy with BatchNorm folded; notes."""
    if not fold_bn:
        return model, ()
    folded, report = fold_batch_norm(model)
    return folded, (f"fold_bn: timed an eval-time copy with {len(report.folded)} Conv2d+BatchNorm "
                    f"pairs folded into one conv each ({len(report.unfolded)} BatchNorm left)",)


def fps_section(model: nn.Module, options: Any, device: torch.device,
                backends: dict[str, str]) -> dict[str, Any]:
    """Latency / FPS per batch size (§10.2), keys ``b1``, ``b4``, ...; with ``options.fold_bn``
    on a BatchNorm-folded copy of ``model`` (``model`` itself is left untouched)."""
    from sdetr.profiling.speed import measure_fps
    iters = options.iters or DEFAULT_ITERS[device.type]
    warmup = DEFAULT_WARMUP[device.type] if options.warmup is None else options.warmup
    modules = describe_modules(model, options.modules)
    clock = "CUDA events" if device.type == "cuda" else "time.perf_counter"
    timed, notes = _timed_model(model, options.fold_bn)
    with profiling_modules(timed, options.modules):
        measured = measure_fps(timed, lambda b: _fps_input(options, b), list(options.batch_sizes),
                               iters=iters, warmup=warmup, device=device)
    out = {}
    for batch, (stats, inp) in measured.items():
        out[f"b{batch}"] = {**stats.as_dict(), "protocol": _protocol(
            "fps", inp.label, inp.image_size, batch, EVAL_MODE, modules, device, backends,
            TIMING.format(clock=clock), iterations=iters, warmup=warmup,
            fold_bn=options.fold_bn, notes=notes)}
    return out


def memory_section(cfg: ExperimentConfig, built: BuiltModel, options: Any,
                   device: torch.device, backends: dict[str, str]) -> dict[str, Any]:
    """Peak memory of an inference forward and of a training step, per batch size."""
    model = built.model
    criterion = built.criterion.to(device)
    modules = describe_modules(model, options.modules)
    out: dict[str, Any] = {}
    for batch in options.batch_sizes:
        inp = _fps_input(options, batch).to(device)
        with profiling_modules(model, options.modules):
            stats = inference_memory(model, inp, device, warmup=options.memory_warmup)
        out[f"inference_b{batch}"] = {**stats.as_dict(), "protocol": _protocol(
            "memory_inference", inp.label, inp.image_size, batch, EVAL_MODE, modules, device,
            backends, method(device), warmup=options.memory_warmup, fold_bn=False)}
        targets = synthetic_targets(batch, cfg.model.num_classes, seed=options.seed, device=device)
        with profiling_modules(model, options.modules, train=True):
            stats = train_step_memory(model, criterion, inp, targets, device,
                                      warmup=options.memory_warmup)
        out[f"train_b{batch}"] = {**stats.as_dict(), "adamw_state_bytes": adamw_state_bytes(model),
                                  "protocol": _protocol(
            "memory_train_step", inp.label, inp.image_size, batch,
            "train mode: forward + loss (with Hungarian matching) + backward; no optimizer step",
            "training (all modules)", device, backends, method(device),
            warmup=options.memory_warmup,
            notes=("synthetic targets: 4 random boxes per image",
                   "adamw_state_bytes: estimate of an AdamW state, not measured"))}
    return out
