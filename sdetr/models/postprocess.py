"""Evaluation postprocessor: top-k (query, class) pairs, boxes in original-image pixels (REFERENCE §7.4).

No NMS and no score threshold; a query may appear several times with different labels.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from sdetr.models.box_ops import box_cxcywh_to_xyxy

logger = logging.getLogger(__name__)


class PostProcess(nn.Module):
    """Turn raw head outputs into per-image detections for COCO evaluation."""

    def __init__(self, num_select: int = 100) -> None:
        super().__init__()
        if num_select < 1:
            raise ValueError(f"num_select must be >= 1, got {num_select}")
        self.num_select = num_select

    @torch.no_grad()
    def forward(self, pred_logits: Tensor, pred_boxes: Tensor, target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """Select the top ``num_select`` sigmoid scores over all Q*K (query, class) pairs per image.

        pred_logits (B, Q, K) raw logits; pred_boxes (B, Q, 4) cx,cy,w,h normalised to the unpadded
        image; target_sizes (B, 2) as (h, w) of the ORIGINAL image in pixels.
        Returns per image {"scores": (k,), "labels": (k,) int64 class index (= COCO category id),
        "boxes": (k, 4) x0,y0,x1,y1 in original-image pixels}, sorted by descending score, with
        k = min(num_select, Q*K).
        """
        if pred_logits.dim() != 3 or pred_boxes.shape != (*pred_logits.shape[:2], 4):
            raise ValueError(
                f"pred_logits {tuple(pred_logits.shape)} / pred_boxes {tuple(pred_boxes.shape)}"
                " are not (B, Q, K) / (B, Q, 4)"
            )
        batch_size, num_queries, num_classes = pred_logits.shape
        if target_sizes.shape != (batch_size, 2):
            raise ValueError(f"target_sizes has shape {tuple(target_sizes.shape)}, expected ({batch_size}, 2)")
        prob = pred_logits.sigmoid().reshape(batch_size, num_queries * num_classes)
        k = min(self.num_select, num_queries * num_classes)
        scores, flat_idx = prob.topk(k, dim=1, sorted=True)
        query_idx = torch.div(flat_idx, num_classes, rounding_mode="floor")
        labels = flat_idx % num_classes
        boxes = box_cxcywh_to_xyxy(pred_boxes)
        boxes = torch.gather(boxes, 1, query_idx.unsqueeze(-1).expand(-1, -1, 4))
        img_h, img_w = target_sizes.to(boxes.dtype).unbind(1)
        scale = torch.stack([img_w, img_h, img_w, img_h], dim=1)
        boxes = boxes * scale[:, None, :]
        return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, boxes)]
