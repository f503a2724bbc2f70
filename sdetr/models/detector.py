"""The one detector skeleton every variant shares.

``forward`` runs four named seams::

    feats   = extract(images, masks)          # backbone → input projection → flat tokens
    memory  = encode(feats)                   # dense | sparse | interleaved encoder
    queries = select_queries(memory, feats)   # learned | two-stage / top-k
    decoded = decode(queries, memory, feats)  # deformable decoder (± box refinement)

and :meth:`DeformableDETR.assemble` turns the decoder states into predictions. Variants differ
by the components plugged into these seams (built in :mod:`sdetr.models.builder`), never by
flags inside ``forward``.

Output dict (training and eval):
    pred_logits (B, Q, K), pred_boxes (B, Q, 4) cx,cy,w,h in [0, 1] of the unpadded image;
    aux_outputs: list of the same for decoder layers 0..L-2 (when ``aux_loss``);
    one2many_outputs: the same three keys for the one-to-many queries of hybrid matching
        (training only, when the query selector adds them; see :mod:`sdetr.models.queries`);
    dense_outputs: the dense token head's per-token predictions and geometry (training only,
        when the detector has a ``dense_head``; see :mod:`sdetr.models.dense_aux`);
    dn_outputs: the same three keys for the denoising queries plus ``plan`` (their
        :class:`~sdetr.models.denoising.DenoisingPlan`; training with targets, when the
        detector has a ``denoiser``; see :mod:`sdetr.models.denoising`);
    enc_outputs: the token head's predictions (two-stage / top-k only);
    enc_aux_outputs: encoder auxiliary predictions (Sparse DETR only);
    extra_losses: losses computed by a seam (e.g. Sparse DETR's DAM loss; training only);
    backbone_outputs: predictions of Sparse DETR's objectness scorer (its own Hungarian set);
    metrics: scalar tensors to log, never to optimise (e.g. Sparse DETR's Corr).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

import torch
from torch import Tensor, nn

from sdetr.models.attention import MSDeformAttn
from sdetr.models.decoder import DecoderOutput, DeformableDecoder
from sdetr.models.dense_aux import DenseTokenHead
from sdetr.models.denoising import DenoisingQueries
from sdetr.models.heads import HeadStack
from sdetr.models.neck import FeatureSet, InputProjection, flatten_levels, level_masks
from sdetr.models.proposals import ProposalProjection
from sdetr.models.queries import QuerySet


@dataclass
class EncoderOutput:
    """memory (B, N, C) plus whatever a variant's encoder hands to later seams/losses."""

    memory: Tensor
    aux_outputs: list[dict[str, Tensor]] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)


class Encoder(Protocol):
    def encode(self, feats: FeatureSet, proposals: Optional[ProposalProjection]) -> EncoderOutput:
        ...


class QuerySelector(Protocol):
    def __call__(self, memory: Tensor, feats: FeatureSet,
                 proposals: Optional[ProposalProjection]) -> QuerySet:
        ...


class DeformableDETR(nn.Module):
    """Backbone + multi-scale deformable transformer + set-prediction heads.

    Args:
        backbone: returns maps (B, C_l, H_l, W_l), largest first; has ``out_channels``.
        input_proj: projects them to L maps of width C.
        encoder: the encode seam (``.encode(feats, proposals)``).
        query_selector: the select-queries seam.
        decoder: the decode seam.
        heads: one (class, box) head pair per decoder layer.
        proposals: the shared ``LN(Linear)`` token projection (two-stage / sparse only).
        box_refine: pass the box heads to the decoder for iterative refinement.
        aux_loss: also return predictions of the intermediate decoder layers.
        denoiser: adds denoising queries in training when ``forward`` gets the targets (needs a
            query selector with 4-d references and ``position_queries``).
        dense_head: in training, predicts a class and a box for every encoder token, trained
            one-to-many (the ``dense_outputs`` set); unused at eval.
    """

    def __init__(self, backbone: nn.Module, input_proj: InputProjection, encoder: nn.Module,
                 query_selector: nn.Module, decoder: DeformableDecoder, heads: HeadStack, *,
                 num_levels: int, hidden_dim: int, proposals: Optional[ProposalProjection] = None,
                 box_refine: bool = False, aux_loss: bool = True,
                 denoiser: Optional[DenoisingQueries] = None,
                 dense_head: Optional[DenseTokenHead] = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.input_proj = input_proj
        self.level_embed = nn.Parameter(torch.empty(num_levels, hidden_dim))
        self.encoder = encoder
        self.proposals = proposals
        self.query_selector = query_selector
        self.decoder = decoder
        self.heads = heads
        self.box_refine = box_refine
        self.aux_loss = aux_loss
        self.denoiser = denoiser
        self.dense_head = dense_head
        self.reset_transformer_parameters()

    # ---------------------------------------------------------------------------- seams
    def extract(self, images: Tensor, masks: Tensor) -> FeatureSet:
        """images (B, 3, H, W) normalised, masks (B, H, W) bool True = pad → flat tokens."""
        maps = self.input_proj(self.backbone(images))
        return flatten_levels(maps, level_masks(masks, maps), self.level_embed)

    def encode(self, feats: FeatureSet) -> EncoderOutput:
        return self.encoder.encode(feats, self.proposals)

    def select_queries(self, encoded: EncoderOutput, feats: FeatureSet,
                       targets: Optional[list[dict[str, Tensor]]] = None) -> QuerySet:
        """The selector's queries; in training with ``targets`` (one dict per image, "labels"
        (n,), "boxes" (n, 4) cx,cy,w,h normalised) and a denoiser, plus denoising queries."""
        queries = self.query_selector(encoded.memory, feats, self.proposals)
        if self.denoiser is None or not self.training or targets is None:
            return queries
        tgt, query_pos, reference, plan = self.denoiser(targets,
                                                        self.query_selector.position_queries)
        return queries.with_denoising(tgt, query_pos, reference, plan)

    def decode(self, queries: QuerySet, encoded: EncoderOutput, feats: FeatureSet) -> DecoderOutput:
        bbox_heads = list(self.heads.bbox_embed) if self.box_refine else None
        return self.decoder(queries.tgt, queries.query_pos, queries.reference, encoded.memory,
                            feats.spatial_shapes, feats.level_start_index, feats.valid_ratios,
                            feats.mask, bbox_heads=bbox_heads,
                            self_attn_mask=queries.self_attn_mask())

    def prediction_sets(self, decoded: DecoderOutput) -> dict[str, Any]:
        """Per-layer predictions of the decoded queries: the last layer's ``pred_logits`` /
        ``pred_boxes`` and (with ``aux_loss``) ``aux_outputs`` for the others."""
        sets = [self.heads.predict(i, decoded.hidden_states[i], decoded.references[i])
                for i in range(decoded.hidden_states.shape[0])]
        out: dict[str, Any] = {"pred_logits": sets[-1][0], "pred_boxes": sets[-1][1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": lg, "pred_boxes": bx} for lg, bx in sets[:-1]]
        return out

    def assemble(self, decoded: DecoderOutput, queries: QuerySet, encoded: EncoderOutput,
                 feats: FeatureSet) -> dict[str, Any]:
        """Per-layer predictions → the output dict described in the module docstring."""
        one2one, one2many, dn = queries.ranges()
        out = self.prediction_sets(decoded.take(one2one))
        if one2many.stop > one2many.start:
            out["one2many_outputs"] = self.prediction_sets(decoded.take(one2many))
        if queries.denoising is not None:
            out["dn_outputs"] = {**self.prediction_sets(decoded.take(dn)),
                                 "plan": queries.denoising}
        if queries.enc_outputs is not None:
            out["enc_outputs"] = queries.enc_outputs
        if encoded.aux_outputs:
            out["enc_aux_outputs"] = encoded.aux_outputs
        if self.dense_head is not None and self.training:
            out["dense_outputs"] = self.dense_head(encoded.memory, feats)
        return out

    def forward(self, images: Tensor, masks: Tensor,
                targets: Optional[list[dict[str, Tensor]]] = None) -> dict[str, Any]:
        """images (B, 3, H, W), masks (B, H, W) True = pad; ``targets`` (training only) feed
        the denoiser, if any. Returns the dict of the module docstring."""
        feats = self.extract(images, masks)
        encoded = self.encode(feats)
        queries = self.select_queries(encoded, feats, targets)
        decoded = self.decode(queries, encoded, feats)
        return self.assemble(decoded, queries, encoded, feats)

    # ---------------------------------------------------------------------------- init
    def transformer_modules(self) -> list[nn.Module]:
        """Modules that get the transformer-wide init (REFERENCE §3.2): not the backbone, the
        input projection, the prediction heads nor the learned query embedding."""
        mods: list[nn.Module] = [self.encoder, self.decoder]
        if self.proposals is not None:
            mods.append(self.proposals)
        for name in ("reference_points", "pos_trans", "pos_trans_norm"):
            if hasattr(self.query_selector, name):
                mods.append(getattr(self.query_selector, name))
        return mods

    def reset_transformer_parameters(self) -> None:
        """xavier on every ≥2-d transformer weight, then the MSDA grid init, then N(0,1) level
        embeddings — in this order, as the official code does."""
        for module in self.transformer_modules():
            for name, param in module.named_parameters():
                if param.dim() > 1 and not _is_head_param(name):
                    nn.init.xavier_uniform_(param)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module._reset_parameters()
        if hasattr(self.query_selector, "reference_points"):
            nn.init.constant_(self.query_selector.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)


def _is_head_param(name: str) -> bool:
    return "class_embed" in name or "bbox_embed" in name
