"""Denoising queries (DN-DETR, Li et al. 2022; the DN part of DINO and Lite-DINO), training only.

In training, ``groups`` (G) noised copies of every image's ground-truth set join the decoder's
queries. A copy of target j has

* reference: its box cx,cy,w,h (normalised to the unpadded image) with the centre moved by up to
  ``box_noise``·w/2 (·h/2) and w, h scaled by a factor in [1 - box_noise, 1 + box_noise],
  clamped to [0, 1];
* content query: a learned embedding of its label, replaced by a uniformly drawn class with
  probability ``label_noise``;
* positional query: the top-k selector's own embedding of that reference.

The decoder reconstructs the original box and label from each copy, so these queries are
assigned to their targets by construction, without Hungarian matching (see
:meth:`DenoisingPlan.indices`). With B images holding at most M targets, the G·M denoising
queries come after the selector's queries, group g at [g·M, (g+1)·M); slots j ≥ n_b of an
image with n_b targets are padding (a copy of a dummy box, never a positive).

With ``negatives`` (DINO's contrastive denoising), every group has 2·M slots: the first M as
above, then M negative copies whose box noise is between one and two times ``box_noise``
(centre moved by λ·w/2 .. 2λ·w/2 in a random direction per axis, w and h scaled by a factor
1 ± [λ, 2λ)) with the true label. They are not assigned to any target, so their only loss is
the "no object" class target of every unassigned query: the decoder learns to score a query
whose box is a near miss of an object below the one that sits on it. Denoising groups
do not attend to each other and the matching queries do not attend to them (the mask is
:meth:`sdetr.models.queries.QuerySet.self_attn_mask`); at eval nothing of this exists.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sdetr.models.matcher import MatchIndices, Target

PAD_BOX = (0.5, 0.5, 0.1, 0.1)  # reference of a padding slot (cx, cy, w, h)


@dataclass(frozen=True)
class DenoisingPlan:
    """Layout of the denoising queries: ``groups`` (G) groups of ``pad`` slots; image b's
    first ``counts[b]`` slots of every group are copies of its targets 0..counts[b]-1 (with
    contrastive negatives, ``pad`` = 2·M and slots M.. hold the negative copies, which are
    assigned to no target)."""

    groups: int
    pad: int
    counts: tuple[int, ...]

    @property
    def num_queries(self) -> int:
        """G·M, the denoising queries per image."""
        return self.groups * self.pad

    def indices(self) -> MatchIndices:
        """Per image (query indices (G·n_b,), target indices (G·n_b,)) into the G·M
        denoising queries and the image's targets: query g·M + j ↔ target j."""
        out = []
        for count in self.counts:
            target = torch.arange(count, dtype=torch.int64)
            query = (torch.arange(self.groups, dtype=torch.int64)[:, None] * self.pad
                     + target[None, :]).reshape(-1)
            out.append((query, target.repeat(self.groups)))
        return out


def noise_boxes(boxes: Tensor, scale: float) -> Tensor:
    """boxes (n, 4) cx,cy,w,h in [0, 1] → noised copies (n, 4), see the module docstring."""
    if scale <= 0:
        return boxes.clone()
    wh = boxes[:, 2:]
    shift = (torch.rand_like(boxes[:, :2]) * 2 - 1) * scale * wh / 2
    factor = 1 + (torch.rand_like(wh) * 2 - 1) * scale
    return torch.cat((boxes[:, :2] + shift, wh * factor), -1).clamp(1e-4, 1.0)


def negative_boxes(boxes: Tensor, scale: float) -> Tensor:
    """boxes (n, 4) cx,cy,w,h in [0, 1] → near misses (n, 4): the centre moved by
    [scale, 2·scale)·w/2 (·h/2) in a random direction per axis, w and h each scaled by
    1 ± [scale, 2·scale) (sign drawn per side), clamped to [1e-4, 1]."""
    wh = boxes[:, 2:]

    def signed(like: Tensor) -> Tensor:
        sign = torch.where(torch.rand_like(like) < 0.5, -1.0, 1.0)
        return sign * (1 + torch.rand_like(like)) * scale

    shift = signed(boxes[:, :2]) * wh / 2
    factor = (1 + signed(wh)).clamp(min=0.05)
    return torch.cat((boxes[:, :2] + shift, wh * factor), -1).clamp(1e-4, 1.0)


def noise_labels(labels: Tensor, num_classes: int, ratio: float) -> Tensor:
    """labels (n,) in [0, K) → copies with each replaced by a uniform class w.p. ``ratio``."""
    if ratio <= 0:
        return labels.clone()
    flip = torch.rand(labels.shape, device=labels.device) < ratio
    random = torch.randint_like(labels, num_classes)
    return torch.where(flip, random, labels)


class DenoisingQueries(nn.Module):
    """Builds the denoising queries of one training batch.

    Args:
        num_classes: K, rows of the label embedding.
        hidden_dim: C.
        groups: G ≥ 1.
        label_noise: probability of a label flip, in [0, 1].
        box_noise: λ ≥ 0 of the box noise.
        negatives: add a negative copy per positive in every group (contrastive denoising).
    Submodule ``label_embed`` (K, C): the content query of a noised label. Marked
    ``training_only``: inference parameter counts leave it out.
    """

    training_only = True

    def __init__(self, num_classes: int, hidden_dim: int, groups: int, label_noise: float,
                 box_noise: float, negatives: bool = False) -> None:
        super().__init__()
        if groups < 1:
            raise ValueError(f"groups must be >= 1, got {groups}")
        self.num_classes = num_classes
        self.groups = groups
        self.label_noise = label_noise
        self.box_noise = box_noise
        self.negatives = negatives
        self.label_embed = nn.Embedding(num_classes, hidden_dim)

    def forward(self, targets: Sequence[Target], embed_reference: Callable[[Tensor], Tensor]
                ) -> tuple[Tensor, Tensor, Tensor, DenoisingPlan]:
        """targets: one dict per image ({"labels": (n_b,), "boxes": (n_b, 4)});
        embed_reference: (B, D, 4) references → (B, D, C) positional queries.

        Returns tgt (B, D, C), query_pos (B, D, C), reference (B, D, 4) float32 and the plan,
        D = G·M.
        """
        counts = tuple(int(t["labels"].numel()) for t in targets)
        positives = max(max(counts, default=0), 1)
        plan = DenoisingPlan(self.groups, positives * (2 if self.negatives else 1), counts)
        device = self.label_embed.weight.device
        labels = torch.zeros(len(targets), plan.num_queries, dtype=torch.int64, device=device)
        boxes = torch.tensor(PAD_BOX, device=device).repeat(len(targets), plan.num_queries, 1)
        for b, (target, (slots, _)) in enumerate(zip(targets, plan.indices())):
            if not counts[b]:
                continue
            slots = slots.to(device)
            true_labels = target["labels"].to(device).repeat(self.groups)
            true_boxes = target["boxes"].to(device, torch.float32).repeat(self.groups, 1)
            labels[b, slots] = noise_labels(true_labels, self.num_classes, self.label_noise)
            boxes[b, slots] = noise_boxes(true_boxes, self.box_noise)
            if self.negatives:
                negative = slots + positives
                labels[b, negative] = noise_labels(true_labels, self.num_classes,
                                                   self.label_noise)
                boxes[b, negative] = negative_boxes(true_boxes, self.box_noise)
        return self.label_embed(labels), embed_reference(boxes), boxes, plan
