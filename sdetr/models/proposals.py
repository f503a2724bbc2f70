"""Encoder-token proposals shared by two-stage query selection and Sparse DETR's scorer.

REFERENCE §6.3 (anchors) and §6.2 step 3 / §5.1 step 3 (the "output memory" projection
``LN(Linear(x))`` whose weights both users share).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from sdetr.models.neck import FeatureSet

ANCHOR_BASE_SIZE = 0.05
VALID_LOW, VALID_HIGH = 0.01, 0.99


def token_grid(feats: FeatureSet) -> tuple[Tensor, Tensor, Tensor]:
    """Geometry of every flat token.

    Returns:
        points: (B, N, 2) x, y of the token's cell centre, normalised to the VALID image;
        cells: (B, N, 2) the cell's width and height in the same units (1 / valid W_l, 1 / valid H_l);
        levels: (N,) int64 level index of each token.
    """
    batch = feats.mask.shape[0]
    points, cells, levels = [], [], []
    dtype, device = feats.src.dtype, feats.mask.device
    starts = feats.level_start_index.tolist()
    for lvl, ((h, w), start) in enumerate(zip(feats.level_sizes(), starts)):
        mask = feats.mask[:, start:start + h * w].view(batch, h, w)
        valid_h = (~mask[:, :, 0]).sum(1).clamp(min=1).to(dtype).view(-1, 1)
        valid_w = (~mask[:, 0, :]).sum(1).clamp(min=1).to(dtype).view(-1, 1)
        ys, xs = torch.meshgrid(torch.arange(h, dtype=dtype, device=device),
                                torch.arange(w, dtype=dtype, device=device), indexing="ij")
        px = (xs.reshape(1, -1) + 0.5) / valid_w
        py = (ys.reshape(1, -1) + 0.5) / valid_h
        points.append(torch.stack((px, py), -1))
        cells.append(torch.stack(((1.0 / valid_w).expand_as(px), (1.0 / valid_h).expand_as(py)), -1))
        levels.append(torch.full((h * w,), lvl, dtype=torch.int64, device=device))
    return torch.cat(points, 1), torch.cat(cells, 1), torch.cat(levels)


def proposal_anchors(feats: FeatureSet) -> tuple[Tensor, Tensor]:
    """One fixed anchor box per token.

    Returns:
        anchors: (B, N, 4) inverse-sigmoid of (cx, cy, w, h) normalised to the VALID image,
            w = h = 0.05·2^l on level l; +inf at pad and invalid tokens.
        invalid: (B, N) bool, True at pad tokens and at tokens whose anchor is not strictly
            inside (0.01, 0.99) on all four numbers (border cells of large levels).
    """
    points, _, levels = token_grid(feats)
    sizes = torch.tensor([ANCHOR_BASE_SIZE * 2.0 ** lvl for lvl in range(len(feats.level_sizes()))],
                         dtype=points.dtype, device=points.device)
    wh = sizes[levels].view(1, -1, 1).expand(points.shape[0], -1, 2)
    boxes = torch.cat((points, wh), -1)
    inside = ((boxes > VALID_LOW) & (boxes < VALID_HIGH)).all(-1)
    invalid = feats.mask | ~inside
    unact = torch.log(boxes / (1 - boxes)).masked_fill(invalid.unsqueeze(-1), math.inf)
    return unact, invalid


class ProposalProjection(nn.Module):
    """``LN(Linear(x))`` applied to tokens zeroed at pad/invalid positions.

    Submodules ``enc_output`` (Linear C → C) and ``enc_output_norm`` (LayerNorm), the official
    ``transformer.enc_output*``. Used on the encoder memory by two-stage / top-k query selection,
    and on ``src + pos`` by Sparse DETR's scoring network (the weights are shared).
    """

    def __init__(self, hidden_dim: int) -> None:
        super().__init__()
        self.enc_output = nn.Linear(hidden_dim, hidden_dim)
        self.enc_output_norm = nn.LayerNorm(hidden_dim)

    def forward(self, tokens: Tensor, invalid: Tensor) -> Tensor:
        """tokens (B, N, C), invalid (B, N) bool → (B, N, C)."""
        tokens = tokens.masked_fill(invalid.unsqueeze(-1), 0.0)
        return self.enc_output_norm(self.enc_output(tokens))
