"""Query selection seam: where the decoder's queries and reference points come from.

REFERENCE §6.2. Two implementations:

* :class:`LearnedQueries` — plain / box-refine Deformable DETR: a learned embedding gives the
  content query and its positional part; a Linear maps the latter to a 2-d reference point.
* :class:`TopKQueries` — two-stage Deformable DETR, Efficient DETR and Sparse DETR: a head on
  every encoder token scores it and predicts a box from its anchor; the top-Q tokens become
  queries with 4-d box references.

Both take ``num_one2many`` (T, default 0): in training they return T more queries after the Q
one-to-one queries, for the one-to-many branch of hybrid matching (H-DETR, Jia et al. 2023):
that branch is matched against each image's targets repeated K times, and the two sets do not
attend to each other. In eval only the Q one-to-one queries exist, so inference, its outputs and
its FLOPs are those of the detector without the branch.

The detector may append denoising queries after these (:mod:`sdetr.models.denoising`,
training only) with :meth:`QuerySet.with_denoising`; the layout of a training QuerySet is then
[one-to-one Q | one-to-many T | denoising G·M].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn

from sdetr.models.denoising import DenoisingPlan
from sdetr.models.heads import make_box_head, make_class_head
from sdetr.models.neck import FeatureSet
from sdetr.models.position import box_sine_embedding
from sdetr.models.proposals import ProposalProjection, proposal_anchors
from sdetr.models.query_nms import nms_topk

NMS_CANDIDATES_PER_QUERY = 4  # query_nms: Fast NMS among the 4·k best tokens


@dataclass
class QuerySet:
    """Decoder input.

    tgt: (B, Q, C) content queries. query_pos: (B, Q, C) positional queries.
    reference: (B, Q, 2) or (B, Q, 4) in [0, 1], cx,cy(,w,h) of the valid (unpadded) image.
    enc_outputs: predictions of the token head for the two-stage loss (None for learned
    queries): {"pred_logits": (B, N, K), "pred_boxes": (B, N, 4), "class_specific": bool}.
    num_one2one: the first num_one2one of the Q queries are the one-to-one set, the others the
    one-to-many set of hybrid matching (training only); None = all Q are one-to-one.
    denoising: the plan of the denoising queries, the last ``denoising.num_queries`` of the Q
    (training only); None = there are none.
    """

    tgt: Tensor
    query_pos: Tensor
    reference: Tensor
    enc_outputs: Optional[dict[str, Any]] = None
    extras: dict[str, Tensor] = field(default_factory=dict)
    num_one2one: Optional[int] = None
    denoising: Optional[DenoisingPlan] = None

    @property
    def num_denoising(self) -> int:
        """Denoising queries at the end of the set (0 when there are none)."""
        return 0 if self.denoising is None else self.denoising.num_queries

    @property
    def one2one_size(self) -> int:
        """Queries of the one-to-one set: the first ``num_one2one`` (None: all of them but the
        denoising queries); the rest form the one-to-many and the denoising sets."""
        total = self.tgt.shape[1] - self.num_denoising
        return total if self.num_one2one is None else min(self.num_one2one, total)

    def with_denoising(self, tgt: Tensor, query_pos: Tensor, reference: Tensor,
                       plan: DenoisingPlan) -> "QuerySet":
        """This set with D = ``plan.num_queries`` denoising queries appended: tgt and query_pos
        (B, D, C), reference (B, D, 4) cx,cy,w,h (cast to this set's dtypes)."""
        if self.denoising is not None:
            raise ValueError("this QuerySet already holds denoising queries")
        if self.reference.shape[-1] != 4 or reference.shape[-1] != 4:
            raise ValueError("denoising queries need 4-d (box) references")
        cat = lambda mine, extra: torch.cat((mine, extra.to(mine.dtype)), dim=1)  # noqa: E731
        return QuerySet(tgt=cat(self.tgt, tgt), query_pos=cat(self.query_pos, query_pos),
                        reference=cat(self.reference, reference), enc_outputs=self.enc_outputs,
                        extras=self.extras, num_one2one=self.one2one_size, denoising=plan)

    def ranges(self) -> tuple[slice, slice, slice]:
        """Where the sets sit among the Q_total queries: (one-to-one, one-to-many, denoising);
        an absent set is an empty slice."""
        first, dn_start = self.one2one_size, self.tgt.shape[1] - self.num_denoising
        return slice(0, first), slice(first, dn_start), slice(dn_start, self.tgt.shape[1])

    def group_ids(self) -> Tensor:
        """(Q_total,) int64: 0 one-to-one, 1 one-to-many, 2 + g denoising group g."""
        _, one2many, dn = self.ranges()
        ids = torch.zeros(self.tgt.shape[1], dtype=torch.int64, device=self.tgt.device)
        ids[one2many] = 1
        if self.denoising is not None:
            ids[dn] = 2 + torch.arange(dn.stop - dn.start, device=ids.device) // self.denoising.pad
        return ids

    def self_attn_mask(self) -> Optional[Tensor]:
        """(Q_total, Q_total) bool, True = query i may not attend to query j: each set attends
        within itself, and denoising queries also to the one-to-one queries (DN-DETR's rule);
        None when there is only the one-to-one set."""
        if self.one2one_size == self.tgt.shape[1]:
            return None
        ids = self.group_ids()
        allowed = (ids[:, None] == ids[None, :]) | ((ids[:, None] >= 2) & (ids[None, :] == 0))
        return ~allowed


class LearnedQueries(nn.Module):
    """``query_embed`` (Q + T, 2C) split into pos (first C) and content (last C) + a 2-d
    reference; rows Q.. are the one-to-many queries, used in training only."""

    def __init__(self, num_queries: int, hidden_dim: int, num_one2many: int = 0) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.num_one2many = num_one2many
        self.query_embed = nn.Embedding(num_queries + num_one2many, hidden_dim * 2)
        self.reference_points = nn.Linear(hidden_dim, 2)

    def forward(self, memory: Tensor, feats: FeatureSet,
                proposals: Optional[ProposalProjection]) -> QuerySet:
        """memory (B, N, C) is unused; the queries are the same for every image."""
        batch = memory.shape[0]
        rows = self.num_queries + (self.num_one2many if self.training else 0)
        query_pos, tgt = self.query_embed.weight[:rows].split(memory.shape[-1], dim=1)
        query_pos = query_pos.unsqueeze(0).expand(batch, -1, -1)
        tgt = tgt.unsqueeze(0).expand(batch, -1, -1)
        return QuerySet(tgt=tgt, query_pos=query_pos,
                        reference=self.reference_points(query_pos).sigmoid(),
                        num_one2one=self.num_queries)


class TopKQueries(nn.Module):
    """Top-Q encoder tokens become the decoder's queries (two-stage / Efficient / Sparse).

    Args:
        num_queries: Q, the number of tokens kept.
        class_specific: objectness = max class logit and the token head is trained with the
            real labels (Efficient/Sparse DETR's ``eff_specific_head``); otherwise logit 0 is a
            binary foreground score (Deformable DETR two-stage).
        content_from_memory: content queries are the selected memory rows and ``pos_trans``
            maps 4·C/2 → C (Efficient/Sparse ``eff_query_init``); otherwise both content and
            positional queries come from ``pos_trans`` (2C → 2C).
        num_one2many: T; in training the tokens ranked Q+1..Q+T become the one-to-many
            queries (H-DETR's two-stage rule).
        nms_iou: None = the plain top-(Q+T); else a token whose proposal box overlaps a
            better-scoring token's by IoU > nms_iou is passed over (Fast NMS among the
            4·(Q+T) best, :func:`sdetr.models.query_nms.nms_topk`), in training and eval.
    Submodules: ``class_embed``/``bbox_embed`` (the official head index ``dec_layers``),
    ``pos_trans`` and ``pos_trans_norm``.
    """

    def __init__(self, num_queries: int, hidden_dim: int, num_classes: int,
                 class_specific: bool, content_from_memory: bool, num_one2many: int = 0,
                 nms_iou: Optional[float] = None) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.num_one2many = num_one2many
        self.nms_iou = nms_iou
        self.hidden_dim = hidden_dim
        self.class_specific = class_specific
        self.content_from_memory = content_from_memory
        out_dim = hidden_dim if content_from_memory else 2 * hidden_dim
        self.class_embed = make_class_head(hidden_dim, num_classes)
        self.bbox_embed = make_box_head(hidden_dim, wh_bias=0.0)
        self.pos_trans = nn.Linear(2 * hidden_dim, out_dim)
        self.pos_trans_norm = nn.LayerNorm(out_dim)

    def forward(self, memory: Tensor, feats: FeatureSet,
                proposals: Optional[ProposalProjection]) -> QuerySet:
        """memory (B, N, C) → the Q highest-scoring tokens as queries with 4-d references,
        best first (then, in training, the next T as one-to-many queries)."""
        if proposals is None:
            raise RuntimeError("TopKQueries needs the detector's proposal projection")
        anchors, invalid = proposal_anchors(feats)
        projected = proposals(memory, invalid)
        logits = self.class_embed(projected)
        coords = self.bbox_embed(projected) + anchors
        boxes = coords.sigmoid()
        score = logits.max(-1).values if self.class_specific else logits[..., 0]
        k = min(self.num_queries + (self.num_one2many if self.training else 0), score.shape[1])
        topk = self._select(score, boxes, k)
        ref_unact = torch.gather(coords, 1, topk.unsqueeze(-1).expand(-1, -1, 4)).detach()
        reference = ref_unact.sigmoid()
        hidden = memory.shape[-1]
        embed = self.embed_reference(reference)
        if self.content_from_memory:
            query_pos = embed
            tgt = torch.gather(memory, 1, topk.unsqueeze(-1).expand(-1, -1, hidden))
        else:
            query_pos, tgt = embed.split(hidden, dim=-1)
        enc_outputs = {"pred_logits": logits, "pred_boxes": boxes,
                       "class_specific": self.class_specific}
        return QuerySet(tgt=tgt, query_pos=query_pos, reference=reference,
                        enc_outputs=enc_outputs, extras={"topk_indices": topk},
                        num_one2one=self.num_queries)

    def _select(self, score: Tensor, boxes: Tensor, k: int) -> Tensor:
        """score (B, N), boxes (B, N, 4) proposals cx,cy,w,h in [0, 1] → (B, k) token indices,
        best first (``nms_iou``: near-duplicate proposals passed over)."""
        if self.nms_iou is None:
            return torch.topk(score, k, dim=1).indices
        return nms_topk(score.detach(), boxes.detach(), k, self.nms_iou,
                        candidates=NMS_CANDIDATES_PER_QUERY * k)

    def embed_reference(self, reference: Tensor) -> Tensor:
        """reference (B, Q, 4) cx,cy,w,h → ``LN(pos_trans(sine(reference)))``: (B, Q, C) with
        ``content_from_memory``, else (B, Q, 2C) = [positional | content]."""
        sine = box_sine_embedding(reference, num_pos_feats=self.hidden_dim // 2)
        # a float32 reference (the denoising queries' noised boxes) meets bf16 weights in
        # train.precision=bf16
        return self.pos_trans_norm(self.pos_trans(sine.to(self.pos_trans.weight.dtype)))

    def position_queries(self, reference: Tensor) -> Tensor:
        """reference (B, Q, 4) → the positional queries (B, Q, C) this selector gives it."""
        embed = self.embed_reference(reference)
        return embed if self.content_from_memory else embed[..., :embed.shape[-1] // 2]
