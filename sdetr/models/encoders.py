"""Encode-seam implementations: each takes a :class:`FeatureSet` and returns an
:class:`EncoderOutput`. The dense Deformable-DETR encoder lives here; Sparse DETR's and
Lite-DETR's encoders reuse :class:`DeformableEncoderLayer` on subsets of the tokens.
"""

from __future__ import annotations

from typing import Optional

from sdetr.models.detector import EncoderOutput
from sdetr.models.encoder import DeformableEncoder, DeformableEncoderLayer
from sdetr.models.neck import FeatureSet
from sdetr.models.proposals import ProposalProjection


class DenseEncoder(DeformableEncoder):
    """Every token is a query in every layer (REFERENCE §4.1)."""

    @classmethod
    def from_dims(cls, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int,
                  n_points: int, num_layers: int, backend: Optional[str] = None) -> "DenseEncoder":
        layer = DeformableEncoderLayer(d_model, d_ffn, dropout, n_levels, n_heads, n_points,
                                       backend=backend)
        return cls(layer, num_layers)

    def encode(self, feats: FeatureSet, proposals: Optional[ProposalProjection]) -> EncoderOutput:
        memory = self(feats.src, feats.pos, feats.spatial_shapes, feats.level_start_index,
                      feats.valid_ratios, feats.mask)
        return EncoderOutput(memory=memory)
