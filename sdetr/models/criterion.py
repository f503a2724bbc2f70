"""Set criterion: Hungarian-matched focal / L1 / GIoU losses per output set (REFERENCE §7.2, §7.3).

Targets follow the matcher's convention (see ``sdetr.models.matcher``): one dict per image with
``"labels"`` (n,) class ids in [0, K) and ``"boxes"`` (n, 4) cx,cy,w,h normalised to the unpadded image.

Output sets and their loss-key suffixes:

* final decoder layer: no suffix (``loss_ce``, ``loss_bbox``, ``loss_giou``);
* ``aux_outputs[i]`` (decoder layers 0..L-2): ``_{i}``;
* ``enc_outputs`` (two-stage / top-k head over encoder tokens): ``_enc``; binary labels unless
  its ``class_specific`` flag is True;
* ``enc_aux_outputs[i]`` (Sparse DETR encoder auxiliary heads): ``_enc_{i}``, real labels;
* ``one2many_outputs`` (hybrid matching's one-to-many queries, training only): ``_o2m`` for its
  final layer and ``_o2m_{i}`` for its ``aux_outputs[i]``, matched against every image's
  targets repeated ``one2many_repeats`` times and normalised by that many times num_boxes;
* ``dense_outputs`` (the dense token head, training only; :mod:`sdetr.models.dense_aux`):
  ``_dense``, NOT matched: every token near an object's centre on a level that fits its size
  is a positive of it; normalised by the number of positives (over the ranks);
* ``dn_outputs`` (denoising queries, training only): ``_dn`` and ``_dn_{i}``, NOT matched: each
  query is assigned to the target it is a noised copy of (``dn_outputs["plan"].indices()``), the
  padding queries are negatives, normalised by G times num_boxes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from sdetr.models.box_ops import box_cxcywh_to_xyxy, elementwise_iou_and_giou
from sdetr.models.dense_aux import dense_assignment
from sdetr.models.matcher import HungarianMatcher, MatchIndices, Target, upcast_to_fp32

logger = logging.getLogger(__name__)

SET_LOSS_NAMES = ("loss_ce", "loss_bbox", "loss_giou")
CLS_LOSSES = ("focal", "varifocal")


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise sigmoid focal loss ``alpha_t (1 - p_t)^gamma BCE(logits, targets)``; no reduction.

    logits and targets have the same shape (e.g. (B, Q, K)); targets are 0/1. alpha_t = alpha for
    positives and 1 - alpha for negatives; alpha < 0 disables the alpha weighting.
    """
    prob = logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = bce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def varifocal_loss(logits: Tensor, quality: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise varifocal loss (VarifocalNet; RT-DETR's ``loss_vfl``); no reduction.

    logits (..., K); quality (..., K) in [0, 1]: the IoU of the matched query's box with its
    target at the target's class, 0 everywhere else. Positives (quality > 0) are trained
    towards their quality with BCE weighted by it; negatives are focal,
    ``(1 - alpha) p^gamma BCE(logits, 0)`` (the focal loss's negative term), so the score of
    a well-placed box is pushed up and that of a badly placed one is not.
    """
    prob = logits.sigmoid()
    positive = (quality > 0).to(logits.dtype)
    weight = (1 - alpha) * prob.detach().pow(gamma) * (1 - positive) + quality
    return F.binary_cross_entropy_with_logits(logits, quality, weight=weight, reduction="none")


def normalised_num_boxes(targets: list[Target], device: torch.device) -> Tensor:
    """Loss normaliser: total target boxes in the batch, averaged over distributed ranks, at least 1.

    Returns a float32 scalar tensor on ``device`` (no host sync).
    """
    return normalised_count(sum(len(t["labels"]) for t in targets), device)


def normalised_count(count: int, device: torch.device) -> Tensor:
    """``count`` averaged over distributed ranks, at least 1: a float32 scalar on ``device``."""
    num_boxes = torch.as_tensor(float(count), dtype=torch.float32, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num_boxes)
        num_boxes = num_boxes / dist.get_world_size()
    return num_boxes.clamp(min=1)


def build_weight_dict(
    cls_coef: float = 2.0,
    bbox_coef: float = 5.0,
    giou_coef: float = 2.0,
    *,
    num_dec_aux: int,
    has_enc: bool,
    num_enc_aux: int,
    extra: Mapping[str, float] | None = None,
    one2many_coef: float = 0.0,
    dn_coef: float = 0.0,
    dense_coef: float = 0.0,
) -> dict[str, float]:
    """Weight of every loss key: final set, ``_{i}`` for i < num_dec_aux, ``_enc`` if has_enc,
    ``_enc_{i}`` for i < num_enc_aux, plus ``extra`` (e.g. ``{"loss_dam": 1.0}``) as given.
    With ``one2many_coef`` > 0 the decoder sets' keys also come with ``_o2m`` after their
    ``loss_*`` name (``loss_ce_o2m``, ``loss_ce_o2m_0``, ...), weighted ``one2many_coef`` times;
    likewise ``_dn`` (denoising queries) with ``dn_coef`` > 0. With ``dense_coef`` > 0 the
    dense token head's ``loss_*_dense`` keys, weighted ``dense_coef`` times.
    """
    if num_dec_aux < 0 or num_enc_aux < 0:
        raise ValueError(f"num_dec_aux ({num_dec_aux}) and num_enc_aux ({num_enc_aux}) must be >= 0")
    if min(one2many_coef, dn_coef, dense_coef) < 0:
        raise ValueError(f"one2many_coef ({one2many_coef}), dn_coef ({dn_coef}) and dense_coef "
                         f"({dense_coef}) must be >= 0")
    base = {"loss_ce": cls_coef, "loss_bbox": bbox_coef, "loss_giou": giou_coef}
    decoder_sets = [""] + [f"_{i}" for i in range(num_dec_aux)]
    suffixes = list(decoder_sets)
    suffixes += ["_enc"] if has_enc else []
    suffixes += [f"_enc_{i}" for i in range(num_enc_aux)]
    weights = {k + s: v for s in suffixes for k, v in base.items()}
    for tag, coef in (("_o2m", one2many_coef), ("_dn", dn_coef)):
        if coef > 0:
            weights.update({k + tag + s: v * coef for s in decoder_sets for k, v in base.items()})
    if dense_coef > 0:
        weights.update({k + "_dense": v * dense_coef for k, v in base.items()})
    for key, value in (extra or {}).items():
        if key in weights:
            raise ValueError(f"extra weight key {key!r} clashes with a set-loss key")
        weights[key] = value
    return weights


def repeat_targets(targets: list[Target], repeats: int) -> list[Target]:
    """Every image's labels (n,) and boxes (n, 4) repeated ``repeats`` times: (n·repeats,)."""
    return [{"labels": t["labels"].repeat(repeats), "boxes": t["boxes"].repeat(repeats, 1)}
            for t in targets]


def _flat_match(indices: MatchIndices, device: torch.device) -> tuple[Tensor, Tensor]:
    """(batch_idx, query_idx), each (M,), of all matched pairs over the batch, on ``device``."""
    batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)]).to(device)
    query_idx = torch.cat([q for q, _ in indices]).to(device)
    return batch_idx, query_idx


def _matched_targets(targets: list[Target], indices: MatchIndices, key: str, device: torch.device) -> Tensor:
    """targets[b][key][target_idx] concatenated over the batch, in the order of ``_flat_match``."""
    return torch.cat([t[key][j.to(t[key].device)] for t, (_, j) in zip(targets, indices)]).to(device)


class SetCriterion(nn.Module):
    """Hungarian set loss for every output set of a DETR-style detector.

    Per set: ``loss_ce`` = sigmoid focal loss with one-hot targets summed over all queries and
    classes / num_boxes (unmatched queries have all-zero targets); ``loss_bbox`` = sum of L1 over
    matched pairs / num_boxes; ``loss_giou`` = sum of (1 - GIoU) / num_boxes. Logged only (final
    set): ``class_error`` and ``cardinality_error``. ``one2many_repeats`` (K) is how often the
    one-to-many set sees every target; 0 = the model has no such set. ``cls_loss="varifocal"``
    replaces ``loss_ce``'s focal loss by :func:`varifocal_loss` (the matched queries' target is
    the IoU of their box, detached, instead of 1); the matcher's cost is unchanged.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: Mapping[str, float],
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        one2many_repeats: int = 0,
        cls_loss: str = "focal",
    ) -> None:
        super().__init__()
        if cls_loss not in CLS_LOSSES:
            raise ValueError(f"cls_loss must be one of {CLS_LOSSES}, got {cls_loss!r}")
        self.cls_loss = cls_loss
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if one2many_repeats < 0:
            raise ValueError(f"one2many_repeats must be >= 0, got {one2many_repeats}")
        self.one2many_repeats = one2many_repeats
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def loss_labels(self, pred_logits: Tensor, targets: list[Target], indices: MatchIndices,
                    num_boxes: Tensor, iou: Tensor) -> Tensor:
        """Classification loss. pred_logits (B, Q, K), ``iou`` (M,) of the matched pairs in
        ``_flat_match`` order, detached (used by the varifocal loss) -> scalar (sum over B, Q, K /
        num_boxes)."""
        logits = upcast_to_fp32(pred_logits)
        batch_idx, query_idx = _flat_match(indices, logits.device)
        labels = _matched_targets(targets, indices, "labels", logits.device)
        target = torch.zeros_like(logits)
        if self.cls_loss == "varifocal":
            target[batch_idx, query_idx, labels] = iou.clamp(min=1e-6).to(target.dtype)
            return varifocal_loss(logits, target, self.focal_alpha, self.focal_gamma).sum() / num_boxes
        target[batch_idx, query_idx, labels] = 1.0
        return sigmoid_focal_loss(logits, target, self.focal_alpha, self.focal_gamma).sum() / num_boxes

    def loss_boxes(
        self, pred_boxes: Tensor, targets: list[Target], indices: MatchIndices, num_boxes: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(L1, 1 - GIoU) losses over matched pairs and the pairs' IoU (M,), detached.
        pred_boxes (B, Q, 4) cx,cy,w,h normalised -> 2 scalars and (M,)."""
        boxes = upcast_to_fp32(pred_boxes)
        batch_idx, query_idx = _flat_match(indices, boxes.device)
        src = boxes[batch_idx, query_idx]
        tgt = _matched_targets(targets, indices, "boxes", boxes.device).to(src.dtype)
        loss_bbox = (src - tgt).abs().sum() / num_boxes
        iou, giou = elementwise_iou_and_giou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt))
        loss_giou = (1 - giou).sum() / num_boxes
        return loss_bbox, loss_giou, iou.detach()

    @torch.no_grad()
    def logged_metrics(self, pred_logits: Tensor, targets: list[Target], indices: MatchIndices) -> dict[str, Tensor]:
        """``class_error``: 100 - top-1 accuracy (%) of the matched queries (0 when nothing is matched).
        ``cardinality_error``: mean over images of |#queries whose max sigmoid score > 0.5 - #targets|.
        """
        batch_idx, query_idx = _flat_match(indices, pred_logits.device)
        labels = _matched_targets(targets, indices, "labels", pred_logits.device)
        if labels.numel():
            correct = (pred_logits[batch_idx, query_idx].argmax(-1) == labels).float().mean()
            class_error = 100.0 - 100.0 * correct
        else:
            class_error = pred_logits.new_zeros((), dtype=torch.float32)
        num_pred = (pred_logits.amax(-1) > 0).sum(1).float()
        num_tgt = torch.as_tensor([float(len(t["labels"])) for t in targets], device=pred_logits.device)
        return {"class_error": class_error, "cardinality_error": (num_pred - num_tgt).abs().mean()}

    def set_losses(
        self, output: Mapping[str, Tensor], targets: list[Target], num_boxes: Tensor, suffix: str
    ) -> dict[str, Tensor]:
        """Match one output set ({"pred_logits": (B, Q, K), "pred_boxes": (B, Q, 4)}) and compute its
        three losses, keyed ``loss_ce{suffix}`` etc. Also the logged metrics when suffix is ''."""
        for key in ("pred_logits", "pred_boxes"):
            if key not in output:
                raise ValueError(f"output set '{suffix or 'final'}' lacks {key!r}")
        logits, boxes = output["pred_logits"], output["pred_boxes"]
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"pred_logits{suffix} has {logits.shape[-1]} classes, expected {self.num_classes}")
        return self.assigned_losses(output, targets, self.matcher(logits, boxes, targets),
                                    num_boxes, suffix)

    def assigned_losses(self, output: Mapping[str, Tensor], targets: list[Target],
                        indices: MatchIndices, num_boxes: Tensor, suffix: str
                        ) -> dict[str, Tensor]:
        """The three losses of one output set for given query ↔ target ``indices`` (plus the
        logged metrics when suffix is '')."""
        logits, boxes = output["pred_logits"], output["pred_boxes"]
        loss_bbox, loss_giou, iou = self.loss_boxes(boxes, targets, indices, num_boxes)
        losses = {
            f"loss_ce{suffix}": self.loss_labels(logits, targets, indices, num_boxes, iou),
            f"loss_bbox{suffix}": loss_bbox,
            f"loss_giou{suffix}": loss_giou,
        }
        if suffix == "":
            losses.update(self.logged_metrics(logits, targets, indices))
        return losses

    def forward(self, outputs: Mapping, targets: list[Target]) -> dict[str, Tensor]:
        """All individual losses (unweighted) and logged metrics; see the module docstring for the
        output sets. ``outputs["extra_losses"]`` (dict of scalars, e.g. ``loss_dam``) passes through."""
        num_boxes = normalised_num_boxes(targets, outputs["pred_logits"].device)
        losses = self.decoder_losses(outputs, targets, num_boxes, "")
        if "one2many_outputs" in outputs:
            losses.update(self.one2many_losses(outputs["one2many_outputs"], targets, num_boxes))
        if "dn_outputs" in outputs:
            losses.update(self.denoising_losses(outputs["dn_outputs"], targets, num_boxes))
        if "dense_outputs" in outputs:
            losses.update(self.dense_losses(outputs["dense_outputs"], targets))
        if "enc_outputs" in outputs:
            enc = outputs["enc_outputs"]
            if "class_specific" not in enc:
                raise ValueError("enc_outputs lacks the bool key 'class_specific'")
            enc_targets = targets
            if not enc["class_specific"]:
                enc_targets = [{"labels": torch.zeros_like(t["labels"]), "boxes": t["boxes"]} for t in targets]
            losses.update(self.set_losses(enc, enc_targets, num_boxes, "_enc"))
        for i, enc_aux in enumerate(outputs.get("enc_aux_outputs", [])):
            losses.update(self.set_losses(enc_aux, targets, num_boxes, f"_enc_{i}"))
        if "backbone_outputs" in outputs:  # Sparse DETR's objectness scorer (REFERENCE §5.5)
            losses.update(self.set_losses(outputs["backbone_outputs"], targets, num_boxes,
                                          "_backbone"))
        for key, value in outputs.get("extra_losses", {}).items():
            if key in losses:
                raise ValueError(f"extra_losses key {key!r} clashes with a set-loss key")
            losses[key] = value
        return losses

    def decoder_losses(self, outputs: Mapping, targets: list[Target], num_boxes: Tensor,
                       tag: str) -> dict[str, Tensor]:
        """The final set's losses (``loss_ce{tag}``...) and each ``aux_outputs[i]``'s
        (``loss_ce{tag}_{i}``...)."""
        losses = self.set_losses(outputs, targets, num_boxes, tag)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update(self.set_losses(aux, targets, num_boxes, f"{tag}_{i}"))
        return losses

    def one2many_losses(self, outputs: Mapping, targets: list[Target],
                        num_boxes: Tensor) -> dict[str, Tensor]:
        """Hybrid matching's one-to-many set: every target repeated K times, Hungarian-matched,
        normalised by K·num_boxes; keys ``loss_*_o2m`` and ``loss_*_o2m_{i}``."""
        repeats = self.one2many_repeats
        if repeats < 1:
            raise ValueError("outputs hold 'one2many_outputs' but the criterion was built with "
                             "one2many_repeats=0")
        return self.decoder_losses(outputs, repeat_targets(targets, repeats), num_boxes * repeats,
                                   "_o2m")

    def denoising_losses(self, outputs: Mapping, targets: list[Target],
                         num_boxes: Tensor) -> dict[str, Tensor]:
        """The denoising queries' sets (final ``_dn``, ``aux_outputs[i]`` → ``_dn_{i}``), each
        query assigned to its own target by ``outputs["plan"]``, normalised by G·num_boxes."""
        plan = outputs["plan"]
        if len(plan.counts) != len(targets) or any(
                n != len(t["labels"]) for n, t in zip(plan.counts, targets)):
            raise ValueError(f"dn_outputs were built for {plan.counts} targets per image, "
                             f"the loss got {[len(t['labels']) for t in targets]}")
        indices, scaled = plan.indices(), num_boxes * plan.groups
        losses = self.assigned_losses(outputs, targets, indices, scaled, "_dn")
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update(self.assigned_losses(aux, targets, indices, scaled, f"_dn_{i}"))
        return losses

    def dense_losses(self, outputs: Mapping[str, Tensor], targets: list[Target]
                     ) -> dict[str, Tensor]:
        """The dense token head's losses (``loss_*_dense``): focal over every valid token and
        class, L1 and GIoU over the positives of :func:`dense_assignment`, each summed and
        divided by the number of positives (averaged over the ranks)."""
        invalid = outputs["invalid"]
        device = outputs["pred_logits"].device
        with torch.no_grad():
            pairs = [dense_assignment(outputs["points"][b], outputs["cells"][b],
                                      outputs["levels"], invalid[b], t["boxes"].to(device))
                     for b, t in enumerate(targets)]
        num_pos = normalised_count(sum(len(tokens) for tokens, _ in pairs), device)
        loss_bbox, loss_giou, iou = self.loss_boxes(outputs["pred_boxes"], targets, pairs,
                                                    num_pos)
        # padding tokens: a logit whose focal loss and gradient are 0
        logits = outputs["pred_logits"].masked_fill(invalid.unsqueeze(-1), -1e4)
        return {"loss_ce_dense": self.loss_labels(logits, targets, pairs, num_pos, iou),
                "loss_bbox_dense": loss_bbox, "loss_giou_dense": loss_giou}

    def total_loss(self, losses: Mapping[str, Tensor]) -> Tensor:
        """Weighted sum ``sum_k weight_dict[k] * losses[k]`` over keys present in both."""
        keys = [k for k in losses if k in self.weight_dict]
        if not keys:
            raise ValueError(f"no loss key is in weight_dict (losses: {sorted(losses)})")
        return sum(self.weight_dict[k] * losses[k] for k in keys)
