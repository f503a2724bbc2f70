"""Lite-DETR (CVPR 2023) on the Deformable-DETR skeleton, and its composition with Sparse DETR.

* :class:`KeyAwareDeformAttn` — key-aware deformable attention (KDA, §9.4), op :func:`sdetr.ops.kda`.
* :class:`InterleavedEncoder` — the encode seam: high-level tokens updated A times per block,
  low-level tokens once, B blocks (§9.2); the released code's fused layout as a variant (§9.3).
* :class:`SparseInterleavedEncoder` + :class:`SparseLiteDETR` — Sparse DETR's scorer selects the
  low-level tokens the low-level updates refine; DAM loss and Corr restricted to them.
"""

from sdetr.models.lite.attention import KeyAwareDeformAttn, grid_init_
from sdetr.models.lite.detector import SparseLiteDETR
from sdetr.models.lite.encoder import InterleavedEncoder, SparseInterleavedEncoder
from sdetr.models.lite.layers import (FullLiteLayer, HighLevelLayer, LiteVariant, LowLevelLayer,
                                      interleaved_layers)
from sdetr.models.lite.tokens import (AllLowTokens, LowTokens, SelectedLowTokens, TokenSplit,
                                      level_prefix, num_low_tokens)

__all__ = ["AllLowTokens", "FullLiteLayer", "HighLevelLayer", "InterleavedEncoder",
           "KeyAwareDeformAttn", "LiteVariant", "LowLevelLayer", "LowTokens", "SelectedLowTokens",
           "SparseInterleavedEncoder", "SparseLiteDETR", "TokenSplit", "grid_init_",
           "interleaved_layers", "level_prefix", "num_low_tokens"]
