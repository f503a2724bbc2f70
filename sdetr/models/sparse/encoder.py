"""Sparse DETR encoder: only the selected tokens are refined (REFERENCE §4.2, §4.3).

The encode seam of Sparse DETR. Once, before the layers, a token scorer ranks the backbone
tokens and the top ``n_i = floor(rho · valid_i) + 1`` per image are selected. Every layer then
runs :class:`DeformableEncoderLayer` with the selected tokens as queries and ALL N tokens (the
current encoder state) as values, and writes the first ``n_i`` rows back. Non-selected tokens
leave the encoder unchanged (bit-identical to the projected backbone features).
"""

from __future__ import annotations

import logging
from typing import Optional

from torch import Tensor, nn

from sdetr.models.detector import EncoderOutput
from sdetr.models.encoder import DeformableEncoderLayer, encoder_reference_points
from sdetr.models.heads import HeadStack
from sdetr.models.layers import get_clones
from sdetr.models.neck import FeatureSet
from sdetr.models.proposals import ProposalProjection, proposal_anchors
from sdetr.models.sparse.selection import (KeepingRatio, TokenSelection, gather_tokens,
                                           scatter_selected, select_tokens)

logger = logging.getLogger(__name__)


class EncoderAuxHeads(HeadStack):
    """Unshared (class, box) heads applied to the selected tokens after encoder layers 0..L-2.

    Marked ``training_only`` (left out of ``params_inference``, §8). Keys ``class_embed.{i}`` and
    ``bbox_embed.{i}.layers.{0,1,2}``; all box heads start with a zero last layer (§6.5).
    """

    training_only = True

    def __init__(self, hidden_dim: int, num_classes: int, num: int) -> None:
        super().__init__(hidden_dim, num_classes, num, shared=False, first_wh_bias=0.0)

    def predict_from_anchors(self, i: int, hidden: Tensor, anchors: Tensor) -> dict[str, Tensor]:
        """hidden (B, k, C), anchors (B, k, 4) inverse-sigmoid (+inf at pad/invalid tokens) →
        {"pred_logits": (B, k, K), "pred_boxes": sigmoid(anchor + delta) (B, k, 4)}; no chaining."""
        boxes = (self.bbox_embed[i](hidden) + anchors).sigmoid()
        return {"pred_logits": self.class_embed[i](hidden), "pred_boxes": boxes}


class SparseEncoder(KeepingRatio, nn.Module):
    """Scoring network + selection once + ``num_layers`` encoder layers on the selected tokens.

    Args:
        layer: template :class:`DeformableEncoderLayer` (deep-copied ``num_layers`` times).
        num_layers: number of layers (>= 1).
        scorer: token scorer, ``scorer(feats, proposals, anchors, invalid) -> TokenScores``
            (see :mod:`sdetr.models.sparse.scorers`).
        rho: keeping ratio in (0, 1]. Changeable at any time (``encoder.rho = 0.3``): the scorer
            does not depend on it (dynamic sparsification, §12.2).
        aux_heads: encoder auxiliary heads (``num_layers - 1`` of them) or None.
        aux_in_eval: also run the auxiliary heads in eval mode, as the released code does (used
            to reproduce its FLOPs count); by default they run in training only.

    ``encode`` returns ``EncoderOutput(memory (B, N, C), aux_outputs, extras)`` with extras
    ``selection`` (:class:`TokenSelection`), ``scores`` (B, N) raw scorer output and, for the
    objectness scorer, ``backbone_outputs``.
    """

    def __init__(self, layer: DeformableEncoderLayer, num_layers: int, scorer: nn.Module,
                 rho: float, aux_heads: Optional[EncoderAuxHeads] = None,
                 aux_in_eval: bool = False) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"SparseEncoder num_layers must be >= 1, got {num_layers}")
        if aux_heads is not None and len(aux_heads) != num_layers - 1:
            raise ValueError(f"SparseEncoder aux_heads must hold num_layers - 1 = {num_layers - 1} "
                             f"heads, got {len(aux_heads)}")
        self.layers = get_clones(layer, num_layers)
        self.num_layers = num_layers
        self.scorer = scorer
        self.aux_heads = aux_heads
        self.aux_in_eval = aux_in_eval
        self.rho = rho

    @classmethod
    def from_dims(cls, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int,
                  n_points: int, num_layers: int, scorer: nn.Module, rho: float,
                  aux_heads: Optional[EncoderAuxHeads] = None, aux_in_eval: bool = False,
                  backend: Optional[str] = None) -> "SparseEncoder":
        layer = DeformableEncoderLayer(d_model, d_ffn, dropout, n_levels, n_heads, n_points,
                                       backend=backend)
        return cls(layer, num_layers, scorer, rho, aux_heads=aux_heads, aux_in_eval=aux_in_eval)


    @property
    def runs_aux_heads(self) -> bool:
        return self.aux_heads is not None and (self.training or self.aux_in_eval)

    def encode(self, feats: FeatureSet, proposals: Optional[ProposalProjection]) -> EncoderOutput:
        """Score, select, refine. feats: the flat tokens (see :class:`FeatureSet`)."""
        anchors, invalid = proposal_anchors(feats)
        scored = self.scorer(feats, proposals, anchors, invalid)
        selection = select_tokens(scored.scores, feats.mask, self.rho)
        memory, aux = self.refine(feats, selection, anchors)
        extras = {"selection": selection, "scores": scored.scores}
        if scored.outputs is not None:
            extras["backbone_outputs"] = scored.outputs
        return EncoderOutput(memory=memory, aux_outputs=aux, extras=extras)

    def refine(self, feats: FeatureSet, selection: TokenSelection, anchors: Tensor
               ) -> tuple[Tensor, list[dict[str, Tensor]]]:
        """Run the layers on the selected tokens (§4.2 per-layer update).

        Returns memory (B, N, C) and the auxiliary predictions after layers 0..L-2 (on all k
        selected rows, overflow rows included) when the auxiliary heads run, else [].
        """
        idx = selection.indices
        reference = encoder_reference_points(feats.spatial_shapes, feats.valid_ratios,
                                             feats.src.device)
        tgt = gather_tokens(feats.src, idx)
        pos = gather_tokens(feats.pos, idx)
        ref = gather_tokens(reference, idx)
        run_aux = self.runs_aux_heads
        anchors_sel = gather_tokens(anchors, idx) if run_aux else None
        out = feats.src
        aux: list[dict[str, Tensor]] = []
        for i, layer in enumerate(self.layers):
            tgt = layer(tgt, pos, ref, out, feats.spatial_shapes, feats.level_start_index,
                        feats.mask)
            out = scatter_selected(out, tgt, selection)
            if run_aux and i < self.num_layers - 1:
                aux.append(self.aux_heads.predict_from_anchors(i, tgt, anchors_sel))
        return out, aux
