"""Box conversions and (generalised) IoU.

Conventions: ``cxcywh`` boxes are (cx, cy, w, h); ``xyxy`` boxes are (x0, y0, x1, y1) with
x1 >= x0 and y1 >= y0. Both may be normalised or absolute; the functions here do not care
as long as the two arguments of a comparison use the same frame.
"""

from __future__ import annotations

import torch
from torch import Tensor


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """Convert boxes (..., 4) from (cx, cy, w, h) to (x0, y0, x1, y1); same shape."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """Convert boxes (..., 4) from (x0, y0, x1, y1) to (cx, cy, w, h); same shape."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Area of xyxy boxes (..., 4) -> (...)."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _check_xyxy(boxes: Tensor, name: str) -> None:
    """Raise if ``boxes`` (..., 4) is not a valid xyxy tensor (x1 < x0, y1 < y0 or NaN)."""
    if boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have a last dimension of 4, got shape {tuple(boxes.shape)}")
    if not bool((boxes[..., 2:] >= boxes[..., :2]).all()):
        raise ValueError(f"{name} holds degenerate xyxy boxes (x1 < x0, y1 < y0 or NaN)")


def _pairwise_iou_union(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU and union area of xyxy boxes1 (N, 4) and boxes2 (M, 4) -> two (N, M)."""
    area1, area2 = box_area(boxes1), box_area(boxes2)
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter / union, union


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU of xyxy boxes1 (N, 4) and boxes2 (M, 4) -> (N, M)."""
    _check_xyxy(boxes1, "boxes1")
    _check_xyxy(boxes2, "boxes2")
    return _pairwise_iou_union(boxes1, boxes2)[0]


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalised IoU of xyxy boxes1 (N, 4) and boxes2 (M, 4) -> (N, M), in [-1, 1].

    GIoU = IoU - (|hull| - |union|) / |hull|, with hull the smallest enclosing box.
    """
    _check_xyxy(boxes1, "boxes1")
    _check_xyxy(boxes2, "boxes2")
    iou, union = _pairwise_iou_union(boxes1, boxes2)
    top_left = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / hull


def elementwise_iou_and_giou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """IoU and generalised IoU of matched xyxy pairs boxes1 (N, 4) and boxes2 (N, 4) -> two
    (N,), from one intersection / union.

    GIoU = IoU - (|hull| - |union|) / |hull|, with hull the smallest enclosing box.
    """
    _check_xyxy(boxes1, "boxes1")
    _check_xyxy(boxes2, "boxes2")
    if boxes1.shape != boxes2.shape:
        raise ValueError(f"boxes1 {tuple(boxes1.shape)} and boxes2 {tuple(boxes2.shape)} differ in shape")
    inter_wh = (torch.min(boxes1[:, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    inter = inter_wh[:, 0] * inter_wh[:, 1]
    union = box_area(boxes1) + box_area(boxes2) - inter
    hull_wh = (torch.max(boxes1[:, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    hull = hull_wh[:, 0] * hull_wh[:, 1]
    iou = inter / union
    return iou, iou - (hull - union) / hull


def elementwise_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of matched xyxy pairs boxes1 (N, 4) and boxes2 (N, 4) -> (N,) in [0, 1].

    Equals ``box_iou(boxes1, boxes2).diag()`` without building the (N, N) matrix.
    """
    return elementwise_iou_and_giou(boxes1, boxes2)[0]


def elementwise_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Generalised IoU of matched xyxy pairs boxes1 (N, 4) and boxes2 (N, 4) -> (N,).

    Equals ``generalized_box_iou(boxes1, boxes2).diag()`` without building the (N, N) matrix.
    """
    return elementwise_iou_and_giou(boxes1, boxes2)[1]
