"""COCO box evaluation of a detector (pycocotools ``COCOeval``, iouType ``bbox``).

Detections follow REFERENCE §7.4: the postprocessor's top-k (query, class) pairs per image,
no NMS, no score threshold; ``label`` is the COCO category id itself. Boxes are x0,y0,x1,y1 in
ORIGINAL-image pixels and are written to COCO results as [x, y, w, h].

Evaluation runs in one process: in a distributed run call it on rank 0 with a one-process
loader.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor, nn
from tqdm import tqdm

from sdetr.utils.io import atomic_write_text

logger = logging.getLogger(__name__)

# Order of COCOeval.stats[0:9].
METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")


@dataclass
class EvalResult:
    """Outcome of :func:`evaluate`.

    metrics: :data:`METRIC_KEYS` -> value in [0, 1], or -1.0 where pycocotools has nothing
        to average (no ground truth in that area range).
    extra: per-image means of the model's ``out["metrics"]`` scalars (e.g. Sparse DETR's
        ``corr_mask_attn_map_dec_all``), NaN values left out.
    num_images: images evaluated; detections_path: the results JSON, if written;
    seconds: wall time of the whole evaluation (inference + COCOeval).
    """

    metrics: dict[str, float]
    extra: dict[str, float] = field(default_factory=dict)
    num_images: int = 0
    detections_path: Path | None = None
    seconds: float = 0.0


def metrics_for_logging(result: EvalResult, prefix: str = "eval") -> dict[str, float]:
    """Flat metric names for trackers: ``{prefix}/AP`` ... ``{prefix}/AR100``, the extras as
    ``{prefix}/{name}`` (e.g. ``eval/corr_mask_attn_map_dec_all``), ``{prefix}/seconds``."""
    flat = {f"{prefix}/{key}": value for key, value in result.metrics.items()}
    flat.update({f"{prefix}/{key}": value for key, value in result.extra.items()})
    flat[f"{prefix}/seconds"] = result.seconds
    return flat


def to_coco_detections(results: Sequence[dict[str, Tensor]],
                       image_ids: Sequence[int]) -> list[dict[str, Any]]:
    """Postprocessor outputs -> COCO result records.

    results[i]: "scores" (k,), "labels" (k,) int (COCO category ids), "boxes" (k, 4) x0,y0,x1,y1
    pixels of image ``image_ids[i]``. Returns one {"image_id", "category_id", "bbox" [x, y, w, h],
    "score"} per detection, in input order.
    """
    if len(results) != len(image_ids):
        raise ValueError(f"{len(results)} results for {len(image_ids)} image ids")
    out: list[dict[str, Any]] = []
    for result, image_id in zip(results, image_ids):
        boxes = result["boxes"].detach().to("cpu", torch.float64)
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        labels = result["labels"].detach().cpu().tolist()
        scores = result["scores"].detach().cpu().double().tolist()
        out += [{"image_id": int(image_id), "category_id": int(label), "bbox": box,
                 "score": score} for label, box, score in zip(labels, xywh, scores)]
    return out


def coco_metrics(coco_gt: COCO, detections: list[dict[str, Any]]) -> dict[str, float]:
    """Box AP/AR of ``detections`` (COCO result records) against ``coco_gt``.

    All ground-truth images count (an image without detections only lowers recall). Returns
    :data:`METRIC_KEYS`; pycocotools' -1 (no ground truth in an area range) is kept as -1.0.
    An empty ``detections`` list gives 0.0 everywhere (pycocotools cannot load it).
    Detections whose category id is not in ``coco_gt`` are ignored by COCOeval.
    pycocotools' prints are captured; the summary table is logged at INFO.
    """
    if not detections:
        logger.warning("no detections: every metric is 0")
        return {key: 0.0 for key in METRIC_KEYS}
    unknown = {d["image_id"] for d in detections} - set(coco_gt.getImgIds())
    if unknown:
        raise ValueError(f"detections for image ids not in the ground truth: "
                         f"{sorted(unknown)[:5]}")
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        coco_dt = coco_gt.loadRes(copy.deepcopy(detections))  # loadRes edits the records
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        summary = io.StringIO()
        with contextlib.redirect_stdout(summary):
            evaluator.summarize()
    logger.info("COCO bbox evaluation (%d detections):\n%s", len(detections),
                summary.getvalue().rstrip())
    return {key: float(value) for key, value in zip(METRIC_KEYS, evaluator.stats[:9])}


class _MeanMeter:
    """Image-weighted means of scalar metrics, skipping NaN."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weights: dict[str, int] = {}

    def update(self, metrics: dict[str, Any], weight: int) -> None:
        for key, value in metrics.items():
            number = float(value.item() if isinstance(value, Tensor) else value)
            if math.isnan(number):
                continue
            self.sums[key] = self.sums.get(key, 0.0) + number * weight
            self.weights[key] = self.weights.get(key, 0) + weight

    def means(self) -> dict[str, float]:
        return {key: self.sums[key] / self.weights[key] for key in sorted(self.sums)}


def _unpack(batch: Any) -> tuple[Tensor, Tensor, list[dict[str, Tensor]]]:
    """(images (B,3,H,W), masks (B,H,W) True = pad, targets) of a DetectionBatch/tuple."""
    images, masks, targets = batch
    return images, masks, list(targets)


def _run_inference(model: nn.Module, postprocess: nn.Module, loader: Iterable, device: str,
                   progress: bool) -> tuple[list[dict[str, Any]], dict[str, float], list[int]]:
    detections: list[dict[str, Any]] = []
    meter = _MeanMeter()
    seen: list[int] = []
    total = len(loader) if hasattr(loader, "__len__") else None
    for batch in tqdm(loader, total=total, desc="eval", unit="batch", disable=not progress,
                      dynamic_ncols=True):
        images, masks, targets = _unpack(batch)
        out = model(images.to(device), masks.to(device))
        orig_sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        results = postprocess(out["pred_logits"], out["pred_boxes"], orig_sizes)
        image_ids = [int(t["image_id"]) for t in targets]
        detections += to_coco_detections(results, image_ids)
        meter.update(out.get("metrics", {}), len(targets))
        seen += image_ids
    return detections, meter.means(), seen


def evaluate(model: nn.Module, postprocess: nn.Module, loader: Iterable, coco_gt: COCO, *,
             device: str | torch.device = "cpu", detections_path: Path | None = None,
             progress: bool = True) -> EvalResult:
    """Run ``model`` (already on ``device``) over ``loader`` and score it with COCOeval.

    loader yields :class:`~sdetr.data.DetectionBatch` (images, masks, targets) whose targets
    carry "image_id" and "orig_size" (h, w); ``postprocess`` maps (pred_logits, pred_boxes,
    orig sizes) to per-image detections (§7.4). The model runs in eval mode under no_grad
    (its previous mode is restored). Detections are written atomically as a COCO results
    JSON to ``detections_path`` when given. A tqdm bar (stderr) shows progress and ETA.
    """
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            detections, extra, seen = _run_inference(model, postprocess, loader, str(device),
                                                     progress)
    finally:
        model.train(was_training)
    _check_coverage(seen, coco_gt)
    if detections_path is not None:
        detections_path = Path(detections_path)
        atomic_write_text(detections_path, json.dumps(detections))
    metrics = coco_metrics(coco_gt, detections)
    seconds = time.perf_counter() - start
    logger.info("evaluated %d images in %.1f s: AP %.4f, AP50 %.4f%s", len(seen), seconds,
                metrics["AP"], metrics["AP50"],
                "".join(f", {k} {v:.4f}" for k, v in extra.items()))
    return EvalResult(metrics, extra, len(seen), detections_path, seconds)


def _check_coverage(seen: list[int], coco_gt: COCO) -> None:
    """Warn when the loader did not visit every ground-truth image exactly once."""
    expected = set(coco_gt.getImgIds())
    if len(seen) != len(set(seen)):
        logger.warning("the loader yielded %d images but only %d distinct ones (a distributed "
                       "sampler?): detections of repeated images are counted twice",
                       len(seen), len(set(seen)))
    missing = expected - set(seen)
    if missing:
        logger.warning("%d of %d ground-truth images were not evaluated: they count as misses",
                       len(missing), len(expected))


def sparse_encoder_of(model: nn.Module) -> nn.Module:
    """The token-selecting encoder of ``model`` (also inside a DDP/DeepSpeed ``.module``): any
    encoder with a keeping ratio ``rho`` and ``set_rho`` (Sparse DETR, Sparse + Lite).

    Raises ValueError "rho sweep needs a sparse encoder" when there is none.
    """
    inner = model.module if isinstance(getattr(model, "module", None), nn.Module) else model
    encoder = getattr(inner, "encoder", None)
    if not callable(getattr(encoder, "set_rho", None)):
        raise ValueError(f"rho sweep needs a sparse encoder; this model's encoder is "
                         f"{type(encoder).__name__}")
    return encoder


def evaluate_rho_sweep(model: nn.Module, postprocess: nn.Module, loader: Iterable,
                       coco_gt: COCO, *, rhos: Sequence[float],
                       device: str | torch.device = "cpu", detections_dir: Path | None = None,
                       progress: bool = True) -> dict[float, EvalResult]:
    """Evaluate one sparse model at each keeping ratio of ``rhos`` (each in (0, 1]).

    The encoder's ratio is set for each evaluation and restored afterwards (also on error).
    With ``detections_dir``, detections go to ``detections_dir/detections_rho{rho}.json``.
    """
    if not rhos:
        raise ValueError("rhos must not be empty")
    encoder = sparse_encoder_of(model)
    original = encoder.rho
    results: dict[float, EvalResult] = {}
    try:
        for rho in rhos:
            encoder.set_rho(float(rho))
            path = None if detections_dir is None else (
                Path(detections_dir) / f"detections_rho{float(rho):g}.json")
            results[float(rho)] = evaluate(model, postprocess, loader, coco_gt, device=device,
                                           detections_path=path, progress=progress)
    finally:
        encoder.set_rho(original)
    return results
