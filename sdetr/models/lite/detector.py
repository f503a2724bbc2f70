"""Sparse + Lite: Sparse DETR's DAM loss and Corr metric, restricted to the low-level tokens.

The encoder (:class:`~sdetr.models.lite.encoder.SparseInterleavedEncoder`) selects among the
low-level tokens only, so the scorer's DAM target is the decoder cross-attention map of the
low-level levels: the splat of the decoder samples on those levels (the DAM of a level depends
only on that level's samples, so this equals the full DAM's low-level prefix), binarised to the
top ``n_i`` low-level tokens; the BCE runs over the B·num_low low-level entries. Corr is the share
of the low-level DAM mass on the selected low-level tokens (keys ``..._all`` and ``..._{l}`` for
the low levels l). Everything else is :class:`~sdetr.models.sparse.SparseDETR`'s.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sdetr.models.decoder import DecoderOutput
from sdetr.models.detector import EncoderOutput
from sdetr.models.lite.tokens import level_prefix
from sdetr.models.neck import FeatureSet
from sdetr.models.queries import QuerySet
from sdetr.models.sparse import SparseDETR

__all__ = ["SparseLiteDETR"]


class SparseLiteDETR(SparseDETR):
    """Sparse DETR whose encoder is the sparse interleaved encoder (constructor as SparseDETR's).

    ``self.encoder`` must provide ``low_levels(feats)`` and the extras ``selection`` and
    ``scores`` in low-level token space.
    """

    def assemble(self, decoded: DecoderOutput, queries: QuerySet, encoded: EncoderOutput,
                 feats: FeatureSet) -> dict[str, Any]:
        """SparseDETR.assemble on the low-level levels of the decoder samples and of ``feats``
        (the predictions come from the hidden states and references, which are unchanged)."""
        levels = self.encoder.low_levels(feats)
        low_decoded = dataclasses.replace(
            decoded,
            sampling_locations=decoded.sampling_locations[..., :levels, :, :],
            attention_weights=decoded.attention_weights[..., :levels, :])
        return super().assemble(low_decoded, queries, encoded, level_prefix(feats, levels))
