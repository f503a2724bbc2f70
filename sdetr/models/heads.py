"""Prediction heads: per-layer class logits and box deltas (REFERENCE §6.4–§6.5)."""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from sdetr.models.layers import MLP, inverse_sigmoid

PRIOR_PROB = 0.01


def make_class_head(hidden_dim: int, num_classes: int) -> nn.Linear:
    """Linear(C → K) with the focal-loss prior bias −log((1−0.01)/0.01)."""
    head = nn.Linear(hidden_dim, num_classes)
    nn.init.constant_(head.bias, -math.log((1 - PRIOR_PROB) / PRIOR_PROB))
    return head


def make_box_head(hidden_dim: int, wh_bias: float = 0.0) -> MLP:
    """3-layer MLP C → C → C → 4; last layer zero, its w/h bias set to ``wh_bias``."""
    head = MLP(hidden_dim, hidden_dim, 4, 3)
    nn.init.zeros_(head.layers[-1].weight)
    nn.init.zeros_(head.layers[-1].bias)
    nn.init.constant_(head.layers[-1].bias[2:], wh_bias)
    return head


class HeadStack(nn.Module):
    """``num`` (class, box) head pairs, shared (one module repeated) or independent copies.

    State-dict keys: ``class_embed.{i}.*`` and ``bbox_embed.{i}.layers.{0,1,2}.*``, as the
    official top-level head lists. Shared heads appear under every index with the same tensors.

    Args:
        num: number of output sets (e.g. decoder layers).
        shared: one head object for all sets (plain Deformable DETR) or deep copies.
        first_wh_bias: w/h bias of the first box head (−2.0 in Deformable DETR; 0 in two-stage
            models, whose boxes start from proposal anchors).
    """

    def __init__(self, hidden_dim: int, num_classes: int, num: int, shared: bool,
                 first_wh_bias: float = -2.0) -> None:
        super().__init__()
        cls = make_class_head(hidden_dim, num_classes)
        box = make_box_head(hidden_dim, wh_bias=first_wh_bias)
        if shared:
            self.class_embed = nn.ModuleList([cls] * num)
            self.bbox_embed = nn.ModuleList([box] * num)
        else:
            self.class_embed = nn.ModuleList(copy.deepcopy(cls) for _ in range(num))
            boxes = [copy.deepcopy(box) for _ in range(num)]
            for b in boxes[1:]:
                nn.init.zeros_(b.layers[-1].bias)
            self.bbox_embed = nn.ModuleList(boxes)

    def __len__(self) -> int:
        return len(self.class_embed)

    def predict(self, i: int, hidden: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]:
        """Logits (B, Q, K) and boxes (B, Q, 4) of set ``i``.

        hidden: (B, Q, C). reference: (B, Q, 2|4) in [0, 1], cx,cy(,w,h) of the valid image;
        the box head predicts a delta in logit space added to inverse_sigmoid(reference)
        (only to cx,cy when the reference is 2-d).
        """
        delta = self.bbox_embed[i](hidden)
        ref = inverse_sigmoid(reference)
        if ref.shape[-1] == 4:
            delta = delta + ref
        else:
            delta = torch.cat((delta[..., :2] + ref, delta[..., 2:]), -1)
        return self.class_embed[i](hidden), delta.sigmoid()
