"""Sparse DETR: Deformable DETR with the sparse encode seam and the DAM loss (REFERENCE §0.1).

The seams are those of :class:`DeformableDETR`; the encoder plugged into ``encode`` is a
:class:`~sdetr.models.sparse.encoder.SparseEncoder`. This class only extends ``assemble`` with
what needs both the encoder's selection and the decoder's cross-attention of the same forward:

* ``extra_losses["loss_dam"]`` (training, DAM scorer only): BCE of the scorer logits against the
  binarised decoder cross-attention map;
* ``metrics``: the Corr metric (share of decoder attention on selected tokens), train and eval;
* ``backbone_outputs``: the objectness scorer's predictions over all tokens (OS criterion only).

With hybrid matching or denoising queries the DAM (its loss and Corr) comes from the one-to-one
queries only, the queries that exist at inference.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from sdetr.models.decoder import DecoderOutput, DeformableDecoder
from sdetr.models.denoising import DenoisingQueries
from sdetr.models.dense_aux import DenseTokenHead
from sdetr.models.detector import DeformableDETR, EncoderOutput
from sdetr.models.heads import HeadStack
from sdetr.models.neck import FeatureSet, InputProjection
from sdetr.models.proposals import ProposalProjection
from sdetr.models.queries import QuerySet
from sdetr.models.sparse.dam import corr_metrics, dam_loss, dam_target, decoder_attention_map


class SparseDETR(DeformableDETR):
    """Deformable DETR whose encoder refines only the tokens its scorer selects.

    Args (beyond :class:`DeformableDETR`'s):
        dam_loss: add ``extra_losses["loss_dam"]`` in training (the scorer is a MaskPredictor).
        track_corr: return the Corr metrics under ``out["metrics"]`` (needs the DAM, computed
            without gradient, also in eval). Turn off to time inference without it.
        dam_backend: ``dam_splat`` backend (None = default).

    ``self.encoder`` must provide ``encode(feats, proposals)`` returning extras ``selection``
    and ``scores`` (see :class:`~sdetr.models.sparse.encoder.SparseEncoder`); change the keeping
    ratio with ``model.encoder.rho = ...``.
    """

    def __init__(self, backbone: nn.Module, input_proj: InputProjection, encoder: nn.Module,
                 query_selector: nn.Module, decoder: DeformableDecoder, heads: HeadStack, *,
                 num_levels: int, hidden_dim: int, proposals: Optional[ProposalProjection] = None,
                 box_refine: bool = False, aux_loss: bool = True, dam_loss: bool = True,
                 track_corr: bool = True, dam_backend: Optional[str] = None,
                 denoiser: Optional[DenoisingQueries] = None,
                 dense_head: Optional[DenseTokenHead] = None) -> None:
        super().__init__(backbone, input_proj, encoder, query_selector, decoder, heads,
                         num_levels=num_levels, hidden_dim=hidden_dim, proposals=proposals,
                         box_refine=box_refine, aux_loss=aux_loss, denoiser=denoiser,
                         dense_head=dense_head)
        self.dam_loss = dam_loss
        self.track_corr = track_corr
        self.dam_backend = dam_backend

    def assemble(self, decoded: DecoderOutput, queries: QuerySet, encoded: EncoderOutput,
                 feats: FeatureSet) -> dict[str, Any]:
        out = super().assemble(decoded, queries, encoded, feats)
        decoded = decoded.take(queries.ranges()[0])  # the DAM of the one-to-one queries
        if "backbone_outputs" in encoded.extras:
            out["backbone_outputs"] = encoded.extras["backbone_outputs"]
        with_loss = self.training and self.dam_loss
        if not (with_loss or self.track_corr):
            return out
        dam = decoder_attention_map(decoded.sampling_locations, decoded.attention_weights,
                                    feats.spatial_shapes, feats.level_start_index,
                                    feats.num_tokens, backend=self.dam_backend)
        selection = encoded.extras["selection"]
        if self.track_corr:
            out["metrics"] = corr_metrics(dam, selection.indices, feats.spatial_shapes,
                                          feats.level_start_index)
        if with_loss:
            target = dam_target(dam, feats.mask, selection.counts)
            out["extra_losses"] = {"loss_dam": dam_loss(encoded.extras["scores"], target,
                                                        feats.mask)}
        return out
