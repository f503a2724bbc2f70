"""High/low-level token split of Lite-DETR's interleaved encoder (REFERENCE §9.1).

Levels are ordered largest first (level 0 = stride 8), so with ``h`` high levels the low-level
tokens (the L − h largest maps) are the PREFIX ``[0, level_start_index[L − h])`` of the flat
sequence and the high-level tokens (the h smallest maps) the suffix.

A low-level update refines a query set described by a :class:`LowTokens`: all low-level tokens
(:class:`AllLowTokens`, Lite-DETR) or a selection of them (:class:`SelectedLowTokens`, the
sparse + lite composition). Low-level token indices are flat token indices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from sdetr.models.encoder import encoder_reference_points
from sdetr.models.neck import FeatureSet
from sdetr.models.sparse.selection import TokenSelection, gather_tokens, scatter_selected

__all__ = ["AllLowTokens", "LowTokens", "SelectedLowTokens", "TokenSplit", "level_prefix",
           "num_low_tokens"]


def num_low_tokens(spatial_shapes: Tensor, high_levels: int) -> int:
    """Number of tokens on the L − ``high_levels`` largest levels (spatial_shapes (L, 2) (H, W)).

    Raises ValueError unless 1 <= high_levels <= L − 1.
    """
    sizes = spatial_shapes.tolist()
    if not 1 <= high_levels < len(sizes):
        raise ValueError(f"high_levels must be in [1, {len(sizes) - 1}] for {len(sizes)} "
                         f"levels, got {high_levels}")
    return sum(h * w for h, w in sizes[:len(sizes) - high_levels])


def level_prefix(feats: FeatureSet, num_levels: int) -> FeatureSet:
    """The ``num_levels`` largest levels of ``feats`` as a FeatureSet of their own (views)."""
    n = sum(h * w for h, w in feats.level_sizes()[:num_levels])
    return FeatureSet(src=feats.src[:, :n], pos=feats.pos[:, :n], mask=feats.mask[:, :n],
                      spatial_shapes=feats.spatial_shapes[:num_levels],
                      level_start_index=feats.level_start_index[:num_levels],
                      valid_ratios=feats.valid_ratios[:, :num_levels])


class LowTokens(Protocol):
    """The low-level tokens a low-level update refines (k of them)."""

    def gather(self, tokens: Tensor) -> Tensor:
        """tokens (B, N, *rest) -> (B, k, *rest)."""
        ...

    def scatter(self, out: Tensor, updated: Tensor) -> Tensor:
        """Write updated (B, k, C) into out (B, N, C) (out of place); other rows keep their bits."""
        ...


@dataclass(frozen=True)
class AllLowTokens:
    """Every low-level token: the prefix ``[0, num_low)``."""

    num_low: int

    def gather(self, tokens: Tensor) -> Tensor:
        return tokens[:, :self.num_low]

    def scatter(self, out: Tensor, updated: Tensor) -> Tensor:
        return torch.cat([updated, out[:, self.num_low:]], dim=1)


@dataclass(frozen=True)
class SelectedLowTokens:
    """Selected low-level tokens (indices < num_low); overflow rows are queries, never written."""

    selection: TokenSelection

    def gather(self, tokens: Tensor) -> Tensor:
        return gather_tokens(tokens, self.selection.indices)

    def scatter(self, out: Tensor, updated: Tensor) -> Tensor:
        return scatter_selected(out, updated, self.selection)


@dataclass(frozen=True)
class TokenSplit:
    """Per-forward view of the split handed to every interleaved layer (never stored on a module).

    num_low: low-level token count; high-level tokens are ``[num_low, N)``.
    low: the low-level query set (k rows). low_pos (B, k, C), low_ref (B, k, L, 2): their pos
    and encoder reference points; high_pos (B, N − num_low, C), high_ref (B, N − num_low, L, 2)
    likewise. spatial_shapes (L, 2), level_start_index (L,), mask (B, N) as in FeatureSet.
    """

    num_low: int
    low: LowTokens
    low_pos: Tensor
    low_ref: Tensor
    high_pos: Tensor
    high_ref: Tensor
    spatial_shapes: Tensor
    level_start_index: Tensor
    mask: Tensor

    @classmethod
    def of(cls, feats: FeatureSet, num_low: int, low: LowTokens) -> "TokenSplit":
        """Reference points (§3.5, encoder) and pos restricted to each query subset."""
        reference = encoder_reference_points(feats.spatial_shapes, feats.valid_ratios,
                                             feats.src.device)
        return cls(num_low=num_low, low=low, low_pos=low.gather(feats.pos),
                   low_ref=low.gather(reference), high_pos=feats.pos[:, num_low:],
                   high_ref=reference[:, num_low:], spatial_shapes=feats.spatial_shapes,
                   level_start_index=feats.level_start_index, mask=feats.mask)
