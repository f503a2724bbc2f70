"""The one place that turns a :class:`ModelConfig` into modules.

Everything below takes typed arguments; only the ``build_*`` functions here read config
objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from sdetr.config.schema import LossConfig, ModelConfig
from sdetr.models.attention import MSDeformAttn
from sdetr.models.backbone import build_backbone
from sdetr.models.criterion import SetCriterion, build_weight_dict
from sdetr.models.decoder import DeformableDecoder, DeformableDecoderLayer
from sdetr.models.denoising import DenoisingQueries
from sdetr.models.dense_aux import DenseTokenHead
from sdetr.models.detector import DeformableDETR
from sdetr.models.encoder import DeformableEncoderLayer
from sdetr.models.encoders import DenseEncoder
from sdetr.models.heads import HeadStack
from sdetr.models.lite import (InterleavedEncoder, KeyAwareDeformAttn, SparseInterleavedEncoder,
                               SparseLiteDETR, interleaved_layers)
from sdetr.models.matcher import HungarianMatcher
from sdetr.models.neck import InputProjection
from sdetr.models.postprocess import PostProcess
from sdetr.models.proposals import ProposalProjection
from sdetr.models.queries import LearnedQueries, TopKQueries
from sdetr.models.sparse import (EncoderAuxHeads, MaskPredictor,
                                 ObjectnessScorer, RandomScorer, SparseDETR, SparseEncoder)
from sdetr.ops import resolve_backend


@dataclass
class BuiltModel:
    """A model with the loss and postprocessing that belong to it."""

    model: DeformableDETR
    criterion: SetCriterion
    postprocess: PostProcess
    kernel_backend: str


def kernel_backend_name(cfg: ModelConfig, override: Optional[str] = None) -> Optional[str]:
    """Backend requested for the ops: explicit argument > config; None = automatic."""
    choice = override or cfg.kernel_backend
    return None if choice == "auto" else choice


def build_model(cfg: ModelConfig, *, kernel_backend: Optional[str] = None) -> DeformableDETR:
    """Build the detector described by ``cfg`` (validated by the loader).

    ``kernel_backend`` overrides ``cfg.kernel_backend`` ("reference", "compiled" or "auto").
    """
    backend = kernel_backend_name(cfg, kernel_backend)
    resolve_backend(attention_op(cfg), backend)  # fail now, naming the backend, if unavailable
    bb = cfg.backbone
    backbone = build_backbone(bb.name, frozen_bn=bb.frozen_bn, weights=bb.weights,
                              drop_path_rate=bb.drop_path_rate, train_all=bb.train_all,
                              zero_init_residual=bb.zero_init_residual,
                              kernel_backend=backend, channels_last=bb.channels_last,
                              width=bb.width)
    dec_layer = DeformableDecoderLayer(cfg.hidden_dim, cfg.dim_feedforward, cfg.dropout,
                                       attn=build_attention(cfg, cfg.dec_n_points, backend))
    # §6.5: heads are independent copies with box refinement or encoder auxiliary heads.
    shared_heads = not (cfg.box_refine or cfg.enc_aux_loss)
    heads = HeadStack(cfg.hidden_dim, cfg.num_classes, cfg.dec_layers, shared=shared_heads,
                      first_wh_bias=0.0 if cfg.two_stage else -2.0)
    parts = dict(
        backbone=backbone,
        input_proj=InputProjection(list(backbone.out_channels), cfg.hidden_dim,
                                   cfg.num_feature_levels),
        encoder=build_encoder(cfg, backend),
        query_selector=build_query_selector(cfg),
        decoder=DeformableDecoder(dec_layer, cfg.dec_layers,
                                  look_forward_twice=cfg.look_forward_twice),
        heads=heads,
        num_levels=cfg.num_feature_levels,
        hidden_dim=cfg.hidden_dim,
        proposals=ProposalProjection(cfg.hidden_dim) if cfg.two_stage else None,
        box_refine=cfg.box_refine,
        aux_loss=cfg.loss.aux_loss,
        denoiser=build_denoiser(cfg),
        dense_head=DenseTokenHead(cfg.hidden_dim, cfg.num_classes) if cfg.dense_aux else None,
    )
    if cfg.selects_tokens:
        resolve_backend("dam_splat", backend)
        detector = SparseLiteDETR if cfg.encoder == "sparse_interleaved" else SparseDETR
        return detector(**parts, dam_loss=cfg.token_selection == "dam", dam_backend=backend)
    return DeformableDETR(**parts)


def build_denoiser(cfg: ModelConfig) -> Optional[DenoisingQueries]:
    """Denoising queries (training only) when ``cfg.dn_groups`` > 0, else None."""
    if cfg.dn_groups == 0:
        return None
    return DenoisingQueries(cfg.num_classes, cfg.hidden_dim, cfg.dn_groups,
                            label_noise=cfg.dn_label_noise, box_noise=cfg.dn_box_noise,
                            negatives=cfg.dn_negatives)


def attention_op(cfg: ModelConfig) -> str:
    """Name of the op (in :mod:`sdetr.ops`) that ``cfg.attention`` runs."""
    return "kda" if cfg.attention == "key_aware" else "ms_deform_attn"


def build_attention(cfg: ModelConfig, n_points: int, backend: Optional[str]) -> nn.Module:
    """One deformable attention module for ``cfg.attention`` (encoder and decoder alike)."""
    sizes = (cfg.hidden_dim, cfg.num_feature_levels, cfg.nheads, n_points)
    if cfg.attention == "key_aware":
        return KeyAwareDeformAttn(*sizes, proj_key=cfg.kda_proj_key, backend=backend)
    return MSDeformAttn(*sizes, backend=backend)


def build_encoder(cfg: ModelConfig, backend: Optional[str]) -> nn.Module:
    """The encode seam for ``cfg.encoder``."""
    attn = build_attention(cfg, cfg.enc_n_points, backend)
    if cfg.interleaved:
        layers = interleaved_layers(cfg.lite_variant, cfg.lite_high_updates, cfg.lite_blocks,
                                    d_model=cfg.hidden_dim, d_ffn=cfg.dim_feedforward,
                                    dropout=cfg.dropout, attn=attn)
        if cfg.encoder == "sparse_interleaved":
            return SparseInterleavedEncoder(layers, cfg.lite_high_levels,
                                            scorer=build_token_scorer(cfg), rho=cfg.rho)
        return InterleavedEncoder(layers, cfg.lite_high_levels)
    layer = DeformableEncoderLayer(cfg.hidden_dim, cfg.dim_feedforward, cfg.dropout, attn=attn)
    if cfg.encoder == "dense":
        return DenseEncoder(layer, cfg.enc_layers)
    if cfg.encoder == "sparse":
        aux = (EncoderAuxHeads(cfg.hidden_dim, cfg.num_classes, cfg.enc_layers - 1)
               if cfg.enc_aux_loss else None)
        return SparseEncoder(layer, cfg.enc_layers, scorer=build_token_scorer(cfg), rho=cfg.rho,
                             aux_heads=aux)
    raise ValueError(f"model.encoder={cfg.encoder!r} has no encoder builder")


def build_token_scorer(cfg: ModelConfig) -> nn.Module:
    """The sparse encoder's token scorer for ``cfg.token_selection``."""
    if cfg.token_selection == "dam":
        return MaskPredictor(cfg.hidden_dim, cfg.hidden_dim)
    if cfg.token_selection == "objectness":
        return ObjectnessScorer(cfg.hidden_dim, cfg.num_classes)
    if cfg.token_selection == "random":
        return RandomScorer()
    raise ValueError(f"model.token_selection={cfg.token_selection!r} is unknown")


def build_query_selector(cfg: ModelConfig) -> nn.Module:
    """The select-queries seam for ``cfg.queries``."""
    if cfg.queries == "learned":
        return LearnedQueries(cfg.num_queries, cfg.hidden_dim,
                              num_one2many=cfg.one2many_queries)
    topk = cfg.queries == "topk"
    return TopKQueries(cfg.num_queries, cfg.hidden_dim, cfg.num_classes,
                       class_specific=topk, content_from_memory=topk,
                       num_one2many=cfg.one2many_queries, nms_iou=cfg.query_nms)


def build_criterion(cfg: ModelConfig) -> SetCriterion:
    """Hungarian matcher + set criterion with the weight dict matching the model's outputs."""
    loss: LossConfig = cfg.loss
    matcher = HungarianMatcher(cost_class=loss.cost_class, cost_bbox=loss.cost_bbox,
                               cost_giou=loss.cost_giou, focal_alpha=loss.focal_alpha)
    weights = build_weight_dict(
        cls_coef=loss.cls_coef, bbox_coef=loss.bbox_coef, giou_coef=loss.giou_coef,
        num_dec_aux=cfg.dec_layers - 1 if loss.aux_loss else 0,
        has_enc=cfg.two_stage,
        num_enc_aux=cfg.enc_layers - 1 if cfg.enc_aux_loss else 0,
        extra=_extra_weights(cfg),
        one2many_coef=loss.one2many_coef if cfg.one2many_queries else 0.0,
        dn_coef=loss.dn_coef if cfg.dn_groups else 0.0,
        dense_coef=loss.dense_coef if cfg.dense_aux else 0.0,
    )
    return SetCriterion(cfg.num_classes, matcher, weights, focal_alpha=loss.focal_alpha,
                        one2many_repeats=cfg.one2many_repeats if cfg.one2many_queries else 0,
                        cls_loss=loss.cls_loss)


def _extra_weights(cfg: ModelConfig) -> dict[str, float]:
    """Weights of the losses a token-selecting encoder adds: the DAM loss, or the objectness
    head's set."""
    if not cfg.selects_tokens:
        return {}
    if cfg.token_selection == "dam":
        return {"loss_dam": cfg.loss.dam_coef}
    if cfg.token_selection == "objectness":
        loss = cfg.loss
        return {"loss_ce_backbone": loss.cls_coef, "loss_bbox_backbone": loss.bbox_coef,
                "loss_giou_backbone": loss.giou_coef}
    return {}


def build(cfg: ModelConfig, *, kernel_backend: Optional[str] = None,
          num_select: int = 100) -> BuiltModel:
    """Model + criterion + postprocessor, and the backend name that will actually run."""
    backend = kernel_backend_name(cfg, kernel_backend)
    return BuiltModel(model=build_model(cfg, kernel_backend=kernel_backend),
                      criterion=build_criterion(cfg),
                      postprocess=PostProcess(num_select=num_select),
                      kernel_backend=resolve_backend(attention_op(cfg), backend))
