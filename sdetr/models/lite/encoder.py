"""Lite-DETR's interleaved multi-scale encoder, and its composition with Sparse DETR's token
selection (REFERENCE §9.1–§9.3, §4.2).

The encode seam. The tokens split into high-level (the ``high_levels`` smallest maps) and
low-level (the rest); the layers (see :mod:`sdetr.models.lite.layers`) run in order, each
choosing its own queries and attending to ALL tokens of the current state. The encoder output
carries no pos; every token is present.

* :class:`InterleavedEncoder`: the low-level updates refine every low-level token.
* :class:`SparseInterleavedEncoder`: a Sparse DETR token scorer ranks the LOW-level tokens once,
  before the layers, and the low-level updates refine only the top
  ``n_i = floor(rho · valid_low_i) + 1`` of image i; the other low-level tokens leave the encoder
  bit-identical to their input. The high-level updates are those of Lite-DETR.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Optional

from torch import Tensor, nn

from sdetr.models.detector import EncoderOutput
from sdetr.models.lite.tokens import (AllLowTokens, LowTokens, SelectedLowTokens, TokenSplit,
                                      level_prefix, num_low_tokens)
from sdetr.models.neck import FeatureSet
from sdetr.models.proposals import ProposalProjection, proposal_anchors
from sdetr.models.sparse.selection import KeepingRatio, select_tokens

__all__ = ["InterleavedEncoder", "SparseInterleavedEncoder"]

logger = logging.getLogger(__name__)


class InterleavedEncoder(nn.Module):
    """Interleaved multi-scale encoder (Lite-DETR).

    Args:
        layers: interleaved layers in execution order, each with ``role`` and
            ``update(out, split)`` (see :func:`~sdetr.models.lite.layers.interleaved_layers`).
        high_levels: h, the number of smallest levels whose tokens are high-level (1 <= h < L;
            checked against L at the first forward).

    ``encode(feats, proposals)`` returns ``EncoderOutput(memory (B, N, C))``.
    """

    def __init__(self, layers: Sequence[nn.Module], high_levels: int) -> None:
        super().__init__()
        if not layers:
            raise ValueError("InterleavedEncoder needs at least one layer")
        for i, layer in enumerate(layers):
            if not callable(getattr(layer, "update", None)):
                raise TypeError(f"InterleavedEncoder layer {i} ({type(layer).__name__}) has no "
                                "update(out, split) method")
        if high_levels < 1:
            raise ValueError(f"InterleavedEncoder high_levels must be >= 1, got {high_levels}")
        self.layers = nn.ModuleList(layers)
        self.high_levels = high_levels

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def schedule(self) -> list[str]:
        """Role of each layer in execution order: "high", "low" or "full"."""
        return [layer.role for layer in self.layers]

    def encode(self, feats: FeatureSet, proposals: Optional[ProposalProjection]) -> EncoderOutput:
        """feats: the flat tokens (see :class:`FeatureSet`) -> memory (B, N, C) + extras."""
        num_low = num_low_tokens(feats.spatial_shapes, self.high_levels)
        low, extras = self.select_low(feats, proposals, num_low)
        memory = self.run(feats, TokenSplit.of(feats, num_low, low))
        return EncoderOutput(memory=memory, extras=extras)

    def select_low(self, feats: FeatureSet, proposals: Optional[ProposalProjection],
                   num_low: int) -> tuple[LowTokens, dict[str, Any]]:
        """The low-level query set (here: every low-level token) and extras for later seams."""
        return AllLowTokens(num_low), {}

    def run(self, feats: FeatureSet, split: TokenSplit) -> Tensor:
        """Run every layer on the state, starting from ``feats.src`` -> memory (B, N, C)."""
        out = feats.src
        for layer in self.layers:
            out = layer.update(out, split)
        return out


class SparseInterleavedEncoder(KeepingRatio, InterleavedEncoder):
    """Interleaved encoder whose low-level updates refine only scorer-selected low-level tokens.

    Args (beyond :class:`InterleavedEncoder`'s):
        scorer: a Sparse DETR token scorer, ``scorer(feats, proposals, anchors, invalid) ->
            TokenScores`` (:mod:`sdetr.models.sparse.scorers`), run on the low-level levels only
            (its input is the low-level FeatureSet; a MaskPredictor's global mean is over them).
        rho: keeping ratio in (0, 1] over the VALID low-level tokens of each image; changeable
            at any time (``encoder.rho = 0.3`` / ``set_rho``).

    Extras of ``encode`` (as :class:`~sdetr.models.sparse.SparseEncoder`'s, in low-level token
    space, which is the flat prefix ``[0, num_low)``): ``selection`` (TokenSelection, indices
    < num_low), ``scores`` (B, num_low) raw scorer output, and for the objectness scorer
    ``backbone_outputs`` (predictions on the low-level tokens).
    """

    def __init__(self, layers: Sequence[nn.Module], high_levels: int, scorer: nn.Module,
                 rho: float) -> None:
        super().__init__(layers, high_levels)
        self.scorer = scorer
        self.rho = rho


    def low_levels(self, feats: FeatureSet) -> int:
        """Number of low-level levels, L − h."""
        return feats.spatial_shapes.shape[0] - self.high_levels

    def select_low(self, feats: FeatureSet, proposals: Optional[ProposalProjection],
                   num_low: int) -> tuple[LowTokens, dict[str, Any]]:
        """Score the low-level tokens and keep the top floor(rho · valid_low_i) + 1 per image."""
        low_feats = level_prefix(feats, self.low_levels(feats))
        anchors, invalid = proposal_anchors(low_feats)
        scored = self.scorer(low_feats, proposals, anchors, invalid)
        selection = select_tokens(scored.scores, low_feats.mask, self.rho)
        extras: dict[str, Any] = {"selection": selection, "scores": scored.scores}
        if scored.outputs is not None:
            extras["backbone_outputs"] = scored.outputs
        return SelectedLowTokens(selection), extras
