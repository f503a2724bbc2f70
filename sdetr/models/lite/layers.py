"""The three kinds of interleaved-encoder layer and the layer schedules (REFERENCE §9.2–§9.3).

Each layer is a post-norm :class:`DeformableEncoderLayer` (same attention/FFN/norm layout and
state_dict names) with an ``update(out, split) -> out`` method that picks its own queries; the
keys/values are always ALL N tokens of the current encoder state ``out`` (B, N, C):

* :class:`HighLevelLayer` (``role = "high"``): queries = the high-level tokens.
* :class:`LowLevelLayer` (``"low"``, paper design): queries = the low-level query set.
* :class:`FullLiteLayer` (``"full"``, released code): queries = low-level query set + high-level
  tokens in one attention call; then the low-level rows go through a small C → C → C FFN
  (``linear12``, ``linear22``, ``norm22``) and the high-level rows through the normal FFN.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import Tensor, nn

from sdetr.models.encoder import DeformableEncoderLayer
from sdetr.models.lite.tokens import TokenSplit

__all__ = ["FullLiteLayer", "HighLevelLayer", "LiteVariant", "LowLevelLayer", "interleaved_layers"]

LiteVariant = Literal["paper", "code"]


class HighLevelLayer(DeformableEncoderLayer):
    """High-level fusion: the high-level tokens query all tokens (§9.2 (a))."""

    role = "high"

    def update(self, out: Tensor, split: TokenSplit) -> Tensor:
        """out (B, N, C) -> (B, N, C) with rows ``[num_low, N)`` updated."""
        high = self(out[:, split.num_low:], split.high_pos, split.high_ref, out,
                    split.spatial_shapes, split.level_start_index, split.mask)
        return torch.cat([out[:, :split.num_low], high], dim=1)


class LowLevelLayer(DeformableEncoderLayer):
    """Low-level fusion: the low-level query set queries all tokens (§9.2 (b))."""

    role = "low"

    def update(self, out: Tensor, split: TokenSplit) -> Tensor:
        """out (B, N, C) -> (B, N, C) with the low-level query rows updated (others bit-identical)."""
        low = self(split.low.gather(out), split.low_pos, split.low_ref, out,
                   split.spatial_shapes, split.level_start_index, split.mask)
        return split.low.scatter(out, low)


class FullLiteLayer(DeformableEncoderLayer):
    """The released code's "last" layer of a block (§9.3): one attention call for the low-level
    query set and the high-level tokens, then a small FFN for the low-level rows.

    Args: as :class:`DeformableEncoderLayer`; the small FFN is C → C → C with ReLU, dropout
    ``dropout`` and its own LayerNorm (Lite-DETR's ``small_expand``).
    """

    role = "full"

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1,
                 n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 backend: str | None = None, attn: nn.Module | None = None) -> None:
        super().__init__(d_model, d_ffn, dropout, n_levels, n_heads, n_points,
                         backend=backend, attn=attn)
        self.linear12 = nn.Linear(d_model, d_model)
        self.dropout12 = nn.Dropout(dropout)
        self.linear22 = nn.Linear(d_model, d_model)
        self.dropout22 = nn.Dropout(dropout)
        self.norm22 = nn.LayerNorm(d_model)

    def forward_small_ffn(self, x: Tensor) -> Tensor:
        """x (..., C) -> norm22(x + dropout22(linear22(dropout12(relu(linear12(x))))))."""
        y = self.linear22(self.dropout12(self.activation(self.linear12(x))))
        return self.norm22(x + self.dropout22(y))

    def update(self, out: Tensor, split: TokenSplit) -> Tensor:
        """out (B, N, C) -> (B, N, C) with the low-level query rows and the high-level rows updated."""
        k = split.low_pos.shape[1]
        query = torch.cat([split.low.gather(out), out[:, split.num_low:]], dim=1)
        pos = torch.cat([split.low_pos, split.high_pos], dim=1)
        ref = torch.cat([split.low_ref, split.high_ref], dim=1)
        attn, _, _ = self.self_attn(query + pos, ref, out, split.spatial_shapes,
                                    split.level_start_index, split.mask)
        x = self.norm1(query + self.dropout1(attn))
        high = self.forward_ffn(x[:, k:])
        low = self.forward_small_ffn(x[:, :k])
        return split.low.scatter(torch.cat([out[:, :split.num_low], high], dim=1), low)


def interleaved_layers(variant: LiteVariant, high_updates: int, blocks: int, *, d_model: int,
                       d_ffn: int, dropout: float, attn: nn.Module) -> list[nn.Module]:
    """The layer list of an H?L?-(A+1)×B encoder, in execution order, each layer its own copy.

    * ``paper``: per block A :class:`HighLevelLayer` then one :class:`LowLevelLayer`:
      (A + 1)·B layers.
    * ``code``: per block A − 1 :class:`HighLevelLayer` then one :class:`FullLiteLayer` (which
      also updates the high-level tokens, so A high-level updates per block): A·B layers;
      the release uses A·B = 6.

    No parameters are shared between layers (each update is its own layer, as the paper stacks
    them). At C = 256, FFN 1024, KDA: 789,760 parameters per layer (MSDA: 756,864) and 132,096
    per small FFN; so with KDA the R50 Top-k & BBR detector has 42.01M (6x1), 42.80M (3x2),
    43.59M (2x3) parameters in the paper layout and 41.35M / 41.49M / 41.62M in the code layout.

    Args:
        high_updates: A >= 1. blocks: B >= 1. d_model, d_ffn, dropout: layer sizes.
        attn: template self-attention module (MSDA or KDA), deep-copied into every layer.
    """
    if high_updates < 1 or blocks < 1:
        raise ValueError(f"high_updates and blocks must be >= 1, got {high_updates}, {blocks}")

    def make(cls: type) -> nn.Module:
        return cls(d_model, d_ffn, dropout, attn=copy.deepcopy(attn))

    if variant == "paper":
        block = [make(HighLevelLayer)] * high_updates + [make(LowLevelLayer)]
    elif variant == "code":
        block = [make(HighLevelLayer)] * (high_updates - 1) + [make(FullLiteLayer)]
    else:
        raise ValueError(f"variant must be 'paper' or 'code', got {variant!r}")
    return [copy.deepcopy(layer) for _ in range(blocks) for layer in block]
