"""Token scorers of the Sparse DETR encoder: which tokens get refined (REFERENCE §5.1, §5.5).

Every scorer maps the backbone tokens to one score per token; the encoder keeps the top
``n_i`` (see :mod:`sdetr.models.sparse.selection`). Only the order of the scores matters for the
selection. Three criteria (``model.token_selection``):

* :class:`MaskPredictor` (``dam``): the released scoring network, trained with the DAM loss.
* :class:`ObjectnessScorer` (``objectness``): the paper's OS ablation, a detection head on the
  backbone tokens trained with the Hungarian loss; score = max class logit.
* :class:`RandomScorer` (``random``): uniform random scores, no parameters (a baseline).

Call signature of all three: ``scorer(feats, proposals, anchors, invalid) -> TokenScores`` with
``anchors`` (B, N, 4) and ``invalid`` (B, N) from :func:`sdetr.models.proposals.proposal_anchors`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from sdetr.models.heads import make_box_head, make_class_head
from sdetr.models.neck import FeatureSet
from sdetr.models.proposals import ProposalProjection


@dataclass
class TokenScores:
    """scores: (B, N), one per token (higher = refine first).
    outputs: predictions over all N tokens for a loss on the scorer itself, or None:
    {"pred_logits": (B, N, K), "pred_boxes": (B, N, 4) cx,cy,w,h in [0, 1] of the valid image}.
    """

    scores: Tensor
    outputs: Optional[dict[str, Tensor]] = None


def project_backbone_tokens(feats: FeatureSet, proposals: Optional[ProposalProjection],
                            invalid: Tensor) -> Tensor:
    """``LN_enc(Linear_enc(src + pos))`` with pad/invalid tokens zeroed first (§5.1 steps 1–3).

    Uses the detector's SHARED proposal projection (the two-stage ``enc_output`` layers).
    Returns (B, N, C).
    """
    if proposals is None:
        raise RuntimeError("this token scorer needs the detector's proposal projection "
                           "(build the detector with queries=two_stage|topk)")
    return proposals(feats.src + feats.pos, invalid)


class MaskPredictor(nn.Module):
    """Released scoring network (official ``enc_mask_predictor``), DynamicViT-style.

    ``h = GELU(Linear(LN(u)))``; the second half of h is replaced by its plain mean over all N
    tokens (pads included); then ``Linear → GELU → Linear → GELU → Linear`` down to one logit.

    Args:
        in_dim: channels of the projected tokens (C).
        hidden_dim: width of the first layer (C); then hidden/2, hidden/4, 1.
    Submodules ``layer1.{0: LayerNorm, 1: Linear}``, ``layer2.{0, 2, 4}: Linear`` as the official keys.
    """

    def __init__(self, in_dim: int, hidden_dim: int) -> None:
        super().__init__()
        if hidden_dim % 4:
            raise ValueError(f"MaskPredictor hidden_dim must be divisible by 4, got {hidden_dim}")
        self.layer1 = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden_dim), nn.GELU())
        self.layer2 = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim // 2), nn.GELU(),
            nn.Linear(hidden_dim // 2, hidden_dim // 4), nn.GELU(),
            nn.Linear(hidden_dim // 4, 1))

    def predict(self, tokens: Tensor) -> Tensor:
        """tokens (B, N, C) → logits (B, N)."""
        h = self.layer1(tokens)
        local, glob = h.split(h.shape[-1] // 2, dim=-1)
        glob = glob.mean(dim=1, keepdim=True).expand_as(glob)
        return self.layer2(torch.cat((local, glob), -1)).squeeze(-1)

    def forward(self, feats: FeatureSet, proposals: Optional[ProposalProjection], anchors: Tensor,
                invalid: Tensor) -> TokenScores:
        return TokenScores(self.predict(project_backbone_tokens(feats, proposals, invalid)))


class ObjectnessScorer(nn.Module):
    """Objectness-score (OS) criterion: a class + box head on the projected backbone tokens.

    The head has the structure of the decoder's heads (Linear C → K, MLP C → C → C → 4); boxes
    are ``sigmoid(anchor + delta)`` like the two-stage head. Its predictions over all N tokens are
    returned as ``outputs`` and trained with the Hungarian loss (suffix ``_backbone``, real labels);
    the score of a token is its max class logit. Not in the official release (§5.5).
    """

    def __init__(self, hidden_dim: int, num_classes: int) -> None:
        super().__init__()
        self.class_embed = make_class_head(hidden_dim, num_classes)
        self.bbox_embed = make_box_head(hidden_dim, wh_bias=0.0)

    def forward(self, feats: FeatureSet, proposals: Optional[ProposalProjection], anchors: Tensor,
                invalid: Tensor) -> TokenScores:
        tokens = project_backbone_tokens(feats, proposals, invalid)
        logits = self.class_embed(tokens)
        boxes = (self.bbox_embed(tokens) + anchors).sigmoid()
        return TokenScores(logits.max(-1).values,
                           outputs={"pred_logits": logits, "pred_boxes": boxes})


class RandomScorer(nn.Module):
    """Uniform random scores in [0, 1) (a fresh draw every forward, train and eval); no parameters."""

    def forward(self, feats: FeatureSet, proposals: Optional[ProposalProjection], anchors: Tensor,
                invalid: Tensor) -> TokenScores:
        return TokenScores(torch.rand(feats.mask.shape, dtype=feats.src.dtype,
                                      device=feats.src.device))
