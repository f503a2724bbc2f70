"""Top-k token selection that skips near-duplicate proposals (``model.query_nms``).

Plain two-stage selection takes the Q highest-scoring encoder tokens. Neighbouring tokens of one
object (same level, or the same object seen on two levels) predict nearly the same box with
nearly the same score, so an object often gets several queries with the same starting box;
one-to-one matching then has to teach the decoder to tell them apart, which a short run does not
get far with (the duplicates score about like the matched query). Suppressing them before the decoder
(as DETA does for its first-stage proposals) leaves each object one query per distinct box.

The suppression is Fast NMS (Bolya et al., YOLACT): among the ``candidates`` best tokens, a
token is dropped when any better-scoring candidate overlaps its box by more than the threshold,
whether or not that one was dropped itself. That is one (B, M, M) overlap test instead of a
sequential loop. The result always has k tokens: the kept candidates best first, then, only if
fewer than k were kept, the dropped ones in score order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sdetr.models.box_ops import box_cxcywh_to_xyxy


def overlaps_above(boxes: Tensor, iou_threshold: float) -> Tensor:
    """Which pairs of boxes within each image overlap by more than ``iou_threshold``.

    boxes (B, M, 4) xyxy → (B, M, M) bool, [b, i, j] = IoU(box i, box j) > iou_threshold, False
    where both boxes are empty. Tested as ``inter·(1 + t) > t·(area_i + area_j)`` (the same
    inequality as ``inter / union > t`` multiplied out): no division, 2.3x faster than the IoU.
    """
    x0, y0, x1, y1 = boxes.unbind(-1)  # (B, M) each
    w = torch.minimum(x1[:, :, None], x1[:, None, :]) - torch.maximum(x0[:, :, None], x0[:, None, :])
    h = torch.minimum(y1[:, :, None], y1[:, None, :]) - torch.maximum(y0[:, :, None], y0[:, None, :])
    inter = w.clamp_(min=0).mul_(h.clamp_(min=0))
    area = (x1 - x0).clamp(min=0) * (y1 - y0).clamp(min=0)
    both = area[:, :, None] + area[:, None, :]
    return inter.mul_(1.0 + iou_threshold) > both.mul_(iou_threshold)


def nms_topk(score: Tensor, boxes: Tensor, k: int, iou_threshold: float,
             candidates: int) -> Tensor:
    """Indices of k tokens per image, best first, without near-duplicate boxes where possible.

    Args:
        score: (B, N) token scores (higher is better).
        boxes: (B, N, 4) the tokens' proposal boxes, cx, cy, w, h (any common normalisation).
        k: tokens to return (k <= N).
        iou_threshold: a candidate overlapping a better one by IoU > this is dropped.
        candidates: M, how many of the best tokens take part (clamped to [k, N]).
    Returns:
        (B, k) int64 indices into N.
    """
    num = score.shape[1]
    m = max(k, min(candidates, num))
    best = torch.topk(score, m, dim=1).indices  # (B, M), best first
    cand_boxes = torch.gather(boxes, 1, best.unsqueeze(-1).expand(-1, -1, 4))
    over = overlaps_above(box_cxcywh_to_xyxy(cand_boxes.float()), iou_threshold)
    # over[b, i, j] with i < j: candidate j against the better-ranked candidate i
    dropped = over.triu_(diagonal=1).any(dim=1)  # (B, M)
    order = torch.argsort(dropped.to(torch.int8), dim=1, stable=True)  # kept first, rank kept
    return torch.gather(best, 1, order[:, :k])
