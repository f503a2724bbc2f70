"""Hungarian matcher between predictions and ground truth (REFERENCE §7.1).

Targets are a list (one entry per image) of dicts:
``"labels"`` LongTensor (n,), class ids in [0, K);
``"boxes"`` FloatTensor (n, 4), cx,cy,w,h normalised to the unpadded image. n may be 0.
"""

from __future__ import annotations

import logging

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from sdetr.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

logger = logging.getLogger(__name__)

Target = dict[str, Tensor]
MatchIndices = list[tuple[Tensor, Tensor]]


def upcast_to_fp32(x: Tensor) -> Tensor:
    """Return ``x`` as float32 if it is a lower-precision float; float32/float64 pass through."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def check_targets(targets: list[Target], batch_size: int, num_classes: int) -> None:
    """Raise ValueError naming the culprit if ``targets`` does not follow the convention above."""
    if len(targets) != batch_size:
        raise ValueError(f"targets has {len(targets)} entries but the batch has {batch_size} images")
    for b, t in enumerate(targets):
        if "labels" not in t or "boxes" not in t:
            raise ValueError(f"targets[{b}] lacks 'labels' or 'boxes' (keys: {sorted(t)})")
        labels, boxes = t["labels"], t["boxes"]
        if labels.dim() != 1 or boxes.shape != (labels.shape[0], 4):
            raise ValueError(
                f"targets[{b}]: labels {tuple(labels.shape)} and boxes {tuple(boxes.shape)} are not (n,) and (n, 4)"
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"targets[{b}]['labels'] has ids outside [0, {num_classes})")


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising
    ``C = cost_bbox * L1 + cost_class * focal_cls + cost_giou * (-GIoU)``.

    Costs are built per image (never for the whole batch at once), so Q can be large
    (e.g. all encoder tokens); each (Q, n) matrix is solved on the CPU with scipy.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: cost_class, cost_bbox and cost_giou are all 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def class_cost(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Focal class cost: logits (Q, K), labels (n,) -> (Q, n).

        ``alpha (1-p)^g (-log(p + 1e-8)) - (1-alpha) p^g (-log(1 - p + 1e-8))`` with p = sigmoid
        of the logit of the target's class.
        """
        prob = logits[:, labels].sigmoid()
        alpha, gamma = self.focal_alpha, self.focal_gamma
        pos = alpha * (1 - prob) ** gamma * (-(prob + 1e-8).log())
        neg = (1 - alpha) * prob**gamma * (-(1 - prob + 1e-8).log())
        return pos - neg

    def cost_matrix(self, logits: Tensor, boxes: Tensor, labels: Tensor, tgt_boxes: Tensor) -> Tensor:
        """Total matching cost of one image.

        logits (Q, K); boxes (Q, 4) and tgt_boxes (n, 4) cx,cy,w,h normalised; labels (n,).
        Returns (Q, n).
        """
        logits, boxes, tgt_boxes = upcast_to_fp32(logits), upcast_to_fp32(boxes), upcast_to_fp32(tgt_boxes)
        tgt_boxes = tgt_boxes.to(boxes.dtype)
        cost_l1 = torch.cdist(boxes, tgt_boxes, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
        cost_cls = self.class_cost(logits, labels)
        return self.cost_bbox * cost_l1 + self.cost_class * cost_cls + self.cost_giou * cost_giou

    @torch.no_grad()
    def forward(self, pred_logits: Tensor, pred_boxes: Tensor, targets: list[Target]) -> MatchIndices:
        """Match each image's queries to its targets.

        pred_logits (B, Q, K) raw logits; pred_boxes (B, Q, 4) cx,cy,w,h normalised, in [0, 1].
        Returns one ``(query_idx, target_idx)`` pair of int64 CPU tensors per image, each of length
        min(Q, n), with query_idx sorted ascending; empty when the image has no targets.
        """
        if pred_logits.dim() != 3 or pred_boxes.shape != (*pred_logits.shape[:2], 4):
            raise ValueError(
                f"pred_logits {tuple(pred_logits.shape)} / pred_boxes {tuple(pred_boxes.shape)}"
                " are not (B, Q, K) / (B, Q, 4)"
            )
        batch_size, _, num_classes = pred_logits.shape
        check_targets(targets, batch_size, num_classes)
        device = pred_logits.device
        costs = [
            self.cost_matrix(pred_logits[b], pred_boxes[b], t["labels"].to(device), t["boxes"].to(device))
            for b, t in enumerate(targets)
        ]
        sizes = [c.numel() for c in costs]
        flat = torch.cat([c.reshape(-1) for c in costs]).cpu() if costs else torch.empty(0)
        indices: MatchIndices = []
        for b, (cost, chunk) in enumerate(zip(costs, flat.split(sizes))):
            cost_cpu = chunk.view(cost.shape)
            if not bool(torch.isfinite(cost_cpu).all()):
                raise ValueError(f"HungarianMatcher: non-finite cost for image {b} (NaN/inf in predictions?)")
            rows, cols = linear_sum_assignment(cost_cpu.numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
