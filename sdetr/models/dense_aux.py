"""Dense one-to-many supervision of the encoder tokens (training only).

The one-to-one losses of a DETR give the encoder and the backbone little signal: each object
supervises one query, which samples a few points of the memory. A dense auxiliary head (the idea
of Co-DETR's auxiliary heads, reduced to a per-token classifier and box regressor with a
geometric, matching-free assignment) predicts a class and a box for EVERY encoder token, and
every token near the centre of an object, on the levels whose cells fit the object's size, is
trained on it. The head is dropped at eval: inference, FLOPs and the evaluation are unchanged.

Conventions: token centres and cell sizes are normalised to the VALID (unpadded) image, like
the targets' boxes (cx, cy, w, h in [0, 1]).

Assignment (:func:`dense_assignment`): token t (level l, cell size c_w × c_h) is a positive of
target g when

* its centre lies in g's central region, ``|x - cx| <= max(w/4, c_w/2)`` and likewise in y
  (the ``c/2`` term keeps the cell that holds the centre when the box is small), and
* g spans between :data:`MIN_CELLS` and :data:`MAX_CELLS` cells of level l
  (``max(w / c_w, h / c_h)``), or fewer on level 0, or more on the coarsest level;

a token inside several targets' regions takes the smallest target. Tokens at padding are never
positives.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from sdetr.models.heads import make_box_head, make_class_head
from sdetr.models.layers import inverse_sigmoid
from sdetr.models.neck import FeatureSet
from sdetr.models.proposals import token_grid

MIN_CELLS, MAX_CELLS = 2.0, 16.0
ANCHOR_CELLS = 4.0  # the box head's prior: a box of 4 × 4 cells of its token's level


class DenseTokenHead(nn.Module):
    """Class logits and a box for every encoder token.

    ``class_embed``: Linear(C → K) with the focal prior bias; ``bbox_embed``: 3-layer MLP whose
    output is a delta, in logit space, on the token's anchor box (its cell centre, ``ANCHOR_CELLS``
    cells wide and high). Training-only: left out of the inference parameter count.
    """

    training_only = True

    def __init__(self, hidden_dim: int, num_classes: int) -> None:
        super().__init__()
        self.class_embed = make_class_head(hidden_dim, num_classes)
        self.bbox_embed = make_box_head(hidden_dim)

    def forward(self, memory: Tensor, feats: FeatureSet) -> dict[str, Tensor]:
        """memory (B, N, C) → ``pred_logits`` (B, N, K), ``pred_boxes`` (B, N, 4) cx,cy,w,h of the
        valid image, plus what the assignment needs: ``points`` (B, N, 2), ``cells`` (B, N, 2),
        ``levels`` (N,), ``invalid`` (B, N) bool (padding)."""
        points, cells, levels = token_grid(feats)
        anchors = torch.cat((points, cells * ANCHOR_CELLS), -1).clamp(max=1.0)
        boxes = (self.bbox_embed(memory) + inverse_sigmoid(anchors)).sigmoid()
        return {"pred_logits": self.class_embed(memory), "pred_boxes": boxes, "points": points,
                "cells": cells, "levels": levels, "invalid": feats.mask}


def dense_assignment(points: Tensor, cells: Tensor, levels: Tensor, invalid: Tensor,
                     boxes: Tensor, num_levels: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Positives of ONE image (rule in the module docstring).

    points, cells (N, 2); levels (N,); invalid (N,) bool; boxes (n, 4) cx,cy,w,h normalised.
    Returns (token_idx, target_idx), int64 (P,) each, token_idx ascending.
    """
    empty = torch.empty(0, dtype=torch.int64, device=points.device)
    if boxes.numel() == 0:
        return empty, empty
    top = int(levels.max()) if num_levels is None else num_levels - 1
    cx, cy, w, h = (v.to(points.dtype) for v in boxes.unbind(-1))
    cell_w, cell_h = cells[:, :1], cells[:, 1:]
    in_x = (points[:, :1] - cx).abs() <= torch.maximum(w / 4, cell_w / 2)
    in_y = (points[:, 1:] - cy).abs() <= torch.maximum(h / 4, cell_h / 2)
    span = torch.maximum(w / cell_w, h / cell_h)  # (N, n): the target's size in cells
    level = levels.view(-1, 1)
    fits = ((span >= MIN_CELLS) | (level == 0)) & ((span <= MAX_CELLS) | (level == top))
    candidate = in_x & in_y & fits & ~invalid.view(-1, 1)
    area = (w * h).expand_as(span)
    cost = torch.where(candidate, area, torch.full_like(area, float("inf")))
    best_cost, best = cost.min(1)
    token_idx = torch.isfinite(best_cost).nonzero().flatten()
    return token_idx, best[token_idx]
