"""How every profiling figure was measured, and the published figures they are compared with.

Every number :mod:`sdetr.profiling` produces carries a :class:`Protocol` in its JSON, so that a
table can footnote it (REFERENCE §10): what was measured, on which input, under which counting
convention, on which device and with which kernel backend.

Defaults reproduce the official benchmark scripts:

* GFLOPs: one random [3, 850, 1040] image (``--approx_benchmark_only``), eval mode, no grad,
  fvcore with 1 multiply-add = 1 flop (§10.1).
* FPS: the first val2017 image (id 139, 800×1201 after the eval resize) replicated to the batch
  size, or a random 800×1201 image without a COCO folder; warm-up then timed forwards with
  device synchronisation (§10.2).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

PAPER_FLOPS_SIZE: tuple[int, int] = (850, 1040)
"""(H, W) of the official approximate GFLOPs image (§10.1)."""
FIRST_VAL_SIZE: tuple[int, int] = (800, 1201)
"""(H, W) of val2017[0] (id 139) after the eval resize: the official FPS input (§10.2)."""

FLOPS_CONVENTION = "fvcore, 1 multiply-add = 1 flop"
FLOPS_RULES = (
    "conv/linear/matmul/bmm/einsum: multiply-adds; layer_norm/group_norm: 5 per element (affine); "
    "upsample_nearest: 1 per output element; grid_sampler: 4 per output element; "
    "sdetr::ms_deform_attn: 4·B·M·D·Q·L·P (its grid_samples; the weighted sum is not counted, as the "
    "official pure-PyTorch path under fvcore); sdetr::kda: 10·B·M·D·Q·L·P (2 grid_samples + q·k + "
    "weights×values, as the released Lite-DETR code under fvcore); sdetr::dam_splat: 0 (a scatter, "
    "not counted by fvcore); scaled_dot_product_attention: B·H·Lq·Lk·(E+Ev) (the two bmm of torch "
    "1.x nn.MultiheadAttention); elementwise ops, softmax, activations, max-pool, topk, "
    "gather/scatter, FrozenBatchNorm: 0 (fvcore convention)")
"""The counting rules, stated once for footnotes."""

PUBLISHED_SPARSE_SIZE: tuple[int, int] = (800, 1066)
"""(H, W) at which the INFERENCE-ONLY count (no encoder auxiliary heads) reproduces every
published Sparse DETR GFLOPs figure to rounding (R50 rho 0.1-0.5, Swin-T rho 0.1-0.5; measured
here). 800×1066 is a 640×480 landscape image after the eval resize: consistent with the
official 100-image protocol returning the LAST image's value (§10.1), if val2017's 100th image
is such an image (not checked: no COCO here)."""

DEFAULT_ITERS = {"cuda": 300, "cpu": 10}
"""Timed iterations per batch size: the official final report uses 300 on GPU (§10.2)."""
DEFAULT_WARMUP = {"cuda": 5, "cpu": 2}


@dataclass(frozen=True)
class Protocol:
    """The measurement protocol of one figure (serialised into the result JSON).

    Attributes:
        measurement: "flops", "fps", "memory_inference", "memory_train_step" or "latency".
        input: "random" (seeded random image) or "coco:<split>[0]" / "coco:<split>[:n]".
        image_size: (H, W) of the (unpadded) input image(s); None for several COCO images.
        batch_size: images per forward.
        mode: what runs, e.g. "eval, no_grad, model forward only (no postprocessing)".
        modules: "full" (everything the released code runs at inference, e.g. Sparse DETR's
            encoder auxiliary heads) or "inference_only" (training-only modules off).
        device: "cpu" or "cuda"; hardware: a one-line description of it.
        precision: "fp32".
        kernel_backend: op name → backend that ran (e.g. {"ms_deform_attn": "compiled"}).
        convention: the counting / timing / memory method in words.
        iterations, warmup: timed and untimed repetitions (timing only).
        fold_bn: whether the measured model had every Conv2d → BatchNorm pair folded into one
            conv (an eval-time copy, :func:`sdetr.models.fuse.fold_batch_norm`); None where it
            does not apply (a training step is never folded).
        torch_version, threads: ``torch.__version__`` and ``torch.get_num_threads()``.
        notes: anything a footnote needs beyond the fields above.
    """

    measurement: str
    input: str
    image_size: Optional[tuple[int, int]]
    batch_size: int
    mode: str
    modules: str
    device: str
    hardware: str
    precision: str
    kernel_backend: dict[str, str]
    convention: str
    iterations: Optional[int] = None
    warmup: Optional[int] = None
    fold_bn: Optional[bool] = None
    torch_version: str = field(default_factory=lambda: torch.__version__)
    threads: int = field(default_factory=torch.get_num_threads)
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["image_size"] = list(self.image_size) if self.image_size else None
        out["notes"] = list(self.notes)
        return out

    def replace(self, **changes: Any) -> "Protocol":
        return dataclasses.replace(self, **changes)


def hardware_description(device: torch.device) -> str:
    """``"NVIDIA H100 80GB HBM3 (CUDA 13.0)"`` or ``"CPU <model name> (<n> cores)"``."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    name = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        name = ""
    return f"CPU {name or 'unknown'} ({os.cpu_count()} cores)"


def resolve_device(device: str) -> torch.device:
    """"auto" → cuda when available, else cpu; otherwise ``torch.device(device)``.

    Raises ValueError naming the device when CUDA is asked for but not available.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: only cpu and cuda are supported")
    return resolved


# ------------------------------------------------------------------------------- targets
# GFLOPs at [3, 850, 1040] (fvcore, 1 MAC = 1 flop). "published": Sparse DETR Table 1 / README.
# "released_code": the official code path re-measured (REFERENCE §10.3; Sparse DETR with the
# encoder auxiliary heads, which the released code runs at inference). Keys: (config name, rho);
# rho is None for dense models.
PUBLISHED_GFLOPS: dict[tuple[str, Optional[float]], float] = {
    ("deformable_detr_r50", None): 172.9,
    ("efficient_detr_r50", None): 177.3,
    ("deformable_detr_swint", None): 180.4,
    ("efficient_detr_swint", None): 184.8,
    ("sparse_detr_r50", 0.1): 105.4,
    ("sparse_detr_r50", 0.2): 112.9,
    ("sparse_detr_r50", 0.3): 120.5,
    ("sparse_detr_r50", 0.4): 128.0,
    ("sparse_detr_r50", 0.5): 135.6,
    ("sparse_detr_swint", 0.1): 113.4,
    ("sparse_detr_swint", 0.2): 121.0,
    ("sparse_detr_swint", 0.3): 128.5,
    ("sparse_detr_swint", 0.4): 136.1,
    ("sparse_detr_swint", 0.5): 143.7,
}
RELEASED_CODE_GFLOPS: dict[tuple[str, Optional[float]], float] = {
    ("deformable_detr_r50", None): 172.93,
    ("efficient_detr_r50", None): 177.33,
    ("deformable_detr_swint", None): 180.40,
    ("sparse_detr_r50", 0.1): 111.19,
    ("sparse_detr_r50", 0.2): 120.50,
    ("sparse_detr_r50", 0.5): 148.43,
    ("sparse_detr_swint", 0.1): 118.66,
}
TOLERANCE_PCT = {"dense": 0.5, "sparse": 1.0}
"""Acceptance: dense rows within 0.5% of the published figure; sparse rows (full count) within
1% of the released code's."""
