"""Sparse DETR (ICLR 2022): learnable encoder-token sparsification on the Deformable-DETR skeleton.

* :class:`SparseEncoder` — the encode seam: token scorer → selection → layers on the selection.
* :mod:`~sdetr.models.sparse.scorers` — ``dam`` (MaskPredictor), ``objectness``, ``random``.
* :class:`SparseDETR` — adds the DAM loss and the Corr metric in ``assemble``.
"""

from sdetr.models.sparse.dam import corr_metrics, dam_loss, dam_target, decoder_attention_map
from sdetr.models.sparse.detector import SparseDETR
from sdetr.models.sparse.encoder import EncoderAuxHeads, SparseEncoder
from sdetr.models.sparse.scorers import (MaskPredictor, ObjectnessScorer, RandomScorer,
                                         TokenScores)
from sdetr.models.sparse.selection import TokenSelection, keep_counts, select_tokens

__all__ = ["EncoderAuxHeads", "MaskPredictor", "ObjectnessScorer",
           "RandomScorer", "SparseDETR", "SparseEncoder", "TokenScores", "TokenSelection",
           "corr_metrics", "dam_loss", "dam_target", "decoder_attention_map", "keep_counts",
           "select_tokens"]
