"""Padding-aware token selection of the Sparse DETR encoder (REFERENCE §4.2, §13.1–2).

Per image i with ``valid_i`` non-pad tokens (summed over all levels) the encoder refines
``n_i = floor(rho · valid_i) + 1`` tokens; the batch works on ``k = min(max_i n_i, N)`` rows and
only the first ``n_i`` of them (capped at k) are written back.
"""

from __future__ import annotations

import logging

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TokenSelection:
    """The tokens an encoder refines.

    indices: (B, k) int64 flat token indices, sorted by descending score; rows ``>= counts[i]``
        are overflow rows (computed as queries, never written back).
    counts: (B,) int64 ``n_i`` (already capped at k).
    """

    indices: Tensor
    counts: Tensor

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    def keep(self) -> Tensor:
        """(B, k) bool: True for the rows that are written back (row < n_i)."""
        rows = torch.arange(self.k, device=self.indices.device)
        return rows.unsqueeze(0) < self.counts.unsqueeze(1)


def check_rho(rho: float) -> float:
    """Return ``rho`` as a float if it lies in (0, 1]; raise ValueError naming it otherwise."""
    rho = float(rho)
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    return rho


class KeepingRatio:
    """Mixin: a keeping ratio ``rho`` in (0, 1], checked on every assignment and changeable
    after training (dynamic sparsification: the scorer does not depend on rho)."""

    _rho: float

    @property
    def rho(self) -> float:
        return self._rho

    @rho.setter
    def rho(self, value: float) -> None:
        self._rho = check_rho(value)

    def set_rho(self, rho: float) -> None:
        """Change the keeping ratio (e.g. to evaluate one trained model at several ratios)."""
        self.rho = rho
        logging.getLogger(type(self).__module__).info("%s keeping ratio set to %.3f",
                                                      type(self).__name__, self.rho)


def keep_counts(mask: Tensor, rho: float) -> Tensor:
    """``n_i = floor(rho · valid_i) + 1`` per image, NOT capped. mask (B, N) bool, True = pad → (B,)."""
    valid = (~mask).sum(1)
    return torch.floor(valid.to(torch.float64) * check_rho(rho)).long() + 1


def select_tokens(scores: Tensor, mask: Tensor, rho: float) -> TokenSelection:
    """Top-``n_i`` tokens per image by score.

    Args:
        scores: (B, N) token scores (higher = refine first). Only their order matters.
        mask: (B, N) bool, True = padding.
        rho: keeping ratio in (0, 1].

    Pads are ranked below every valid token (−inf), so they are only chosen once all valid tokens
    are (``n_i > valid_i`` happens at rho = 1, and in overflow rows). The official code fills pads
    with ``min(scores)`` instead; the two differ only in how ties at the minimum are broken.
    """
    counts = keep_counts(mask, rho)
    k = min(int(counts.max()), scores.shape[1])
    ranking = scores.detach().masked_fill(mask, float("-inf"))
    indices = torch.topk(ranking, k, dim=1, sorted=True).indices
    return TokenSelection(indices=indices, counts=counts.clamp(max=k))


def gather_tokens(tokens: Tensor, indices: Tensor) -> Tensor:
    """tokens (B, N, *rest), indices (B, k) → (B, k, *rest)."""
    rest = tokens.shape[2:]
    index = indices.view(*indices.shape, *([1] * len(rest))).expand(*indices.shape, *rest)
    return torch.gather(tokens, 1, index)


def scatter_selected(out: Tensor, updated: Tensor, selection: TokenSelection) -> Tensor:
    """Write ``updated`` (B, k, C) back into ``out`` (B, N, C) at the selected indices.

    Only the first ``n_i`` rows of image i are written; overflow rows write back the value that is
    already there, so every non-written token keeps its exact bits. Out of place (autograd-safe).
    """
    index = selection.indices.unsqueeze(-1).expand(-1, -1, out.shape[-1])
    current = torch.gather(out, 1, index)
    rows = torch.where(selection.keep().unsqueeze(-1), updated, current)
    return out.scatter(1, index, rows)
