"""Deformable-DETR decoder layer and decoder with optional iterative box refinement (§3.5, §6.1, §6.4)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sdetr.models.attention import MSDeformAttn
from sdetr.models.layers import get_clones, inverse_sigmoid

__all__ = ["DecoderOutput", "DeformableDecoderLayer", "DeformableDecoder", "scale_reference_points"]


@dataclass
class DecoderOutput:
    """Per-layer decoder results.

    Attributes:
        hidden_states: (num_layers, B, Q, C) output of every layer.
        references: num_layers tensors; entry l is the reference INPUT to layer l, (B, Q, 2) (x, y) or
            (B, Q, 4) (cx, cy, w, h) in valid-image coordinates [0, 1]. A tuple, not a stacked tensor,
            because a 2-d initial reference becomes 4-d after the first refinement. Entry 0 is the
            caller's tensor itself; refined entries are detached, except with look-forward-twice,
            where they keep the previous layer's graph (the layer itself was fed the detached copy).
        sampling_locations: (B, num_layers, Q, M, L, P, 2) cross-attention locations, (x, y) normalised
            to the padded maps.
        attention_weights: (B, num_layers, Q, M, L, P) cross-attention weights.
    """

    hidden_states: torch.Tensor
    references: tuple[torch.Tensor, ...]
    sampling_locations: torch.Tensor
    attention_weights: torch.Tensor

    def take(self, queries: slice) -> "DecoderOutput":
        """The given queries (a slice of Q) of every field; ``self`` when it covers all Q."""
        if queries.indices(self.hidden_states.shape[2]) == (0, self.hidden_states.shape[2], 1):
            return self
        return DecoderOutput(
            hidden_states=self.hidden_states[:, :, queries],
            references=tuple(r[:, queries] for r in self.references),
            sampling_locations=self.sampling_locations[:, :, queries],
            attention_weights=self.attention_weights[:, :, queries],
        )


def scale_reference_points(reference_points: torch.Tensor, valid_ratios: torch.Tensor) -> torch.Tensor:
    """Map valid-image references to each level's padded map (§3.5, decoder).

    Args:
        reference_points: (B, Q, 2) (x, y) or (B, Q, 4) (cx, cy, w, h), valid-image coords.
        valid_ratios: (B, L, 2) (w, h).

    Returns:
        (B, Q, L, 2|4); for 4-d references w and h are scaled as well.
    """
    if reference_points.shape[-1] == 4:
        ratios = torch.cat([valid_ratios, valid_ratios], dim=-1)
    elif reference_points.shape[-1] == 2:
        ratios = valid_ratios
    else:
        raise ValueError(f"reference_points must end in 2 or 4, got {tuple(reference_points.shape)}")
    return reference_points[:, :, None] * ratios[:, None]


def refine_reference(head_output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Box = sigmoid(head_output + inverse_sigmoid(reference)) with the 2-d rule (§6.4), not detached.

    Args:
        head_output: (B, Q, 4) raw box-head output.
        reference: (B, Q, 2|4) reference in [0, 1]; for 2-d only cx, cy get the offset.

    Returns:
        (B, Q, 4) cx, cy, w, h in [0, 1].
    """
    if reference.shape[-1] == 4:
        return (head_output + inverse_sigmoid(reference)).sigmoid()
    xy = head_output[..., :2] + inverse_sigmoid(reference)
    return torch.cat([xy, head_output[..., 2:]], dim=-1).sigmoid()


class DeformableDecoderLayer(nn.Module):
    """Post-norm decoder layer: self-attention -> MSDA cross-attention -> FFN (§6.1).

    Names follow the official checkpoints: norm1 = cross-attention norm, norm2 = self-attention norm.

    Args:
        d_model: channels C. d_ffn: FFN hidden channels. dropout: dropout probability (also in MHA).
        n_levels, n_heads, n_points: MSDA sizes (L, M, P); n_heads is also the MHA head count.
        backend: MSDA op backend (see ``MSDeformAttn``).
        attn: a prebuilt cross-attention module with ``MSDeformAttn``'s forward signature and
            returns (e.g. Lite-DETR's ``KeyAwareDeformAttn``); None builds an ``MSDeformAttn``
            from the sizes above. Registered as ``cross_attn`` either way.
    """

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        backend: str | None = None,
        attn: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.cross_attn = attn if attn is not None else MSDeformAttn(
            d_model, n_levels, n_heads, n_points, backend=backend)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = nn.ReLU()
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward_ffn(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., C) -> norm3(x + dropout4(linear2(dropout3(relu(linear1(x))))))."""
        y = self.linear2(self.dropout3(self.activation(self.linear1(x))))
        return self.norm3(x + self.dropout4(y))

    def forward(
        self,
        tgt: torch.Tensor,
        query_pos: torch.Tensor,
        reference_points: torch.Tensor,
        memory: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        memory_padding_mask: torch.Tensor | None,
        self_attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decoder layer.

        Args:
            tgt: (B, Q, C) content queries. query_pos: (B, Q, C) query positions.
            reference_points: (B, Q, L, 2|4) normalised to the padded maps (already scaled by valid ratios).
            memory: (B, N, C) encoder output. spatial_shapes: (L, 2) int64; level_start_index: (L,) int64.
            memory_padding_mask: (B, N) bool, True = padding, or None.
            self_attn_mask: (Q, Q) bool, True = query i may not attend to query j, or None.

        Returns:
            tgt (B, Q, C); sampling_locations (B, Q, M, L, P, 2); attention_weights (B, Q, M, L, P).
        """
        q = k = tgt + query_pos
        sa = self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(sa))
        ca, locations, weights = self.cross_attn(
            tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index, memory_padding_mask
        )
        tgt = self.norm1(tgt + self.dropout1(ca))
        return self.forward_ffn(tgt), locations, weights


class DeformableDecoder(nn.Module):
    """Stack of ``num_layers`` deep copies of ``layer``; returns every layer's output.

    Args:
        layer: template layer (deep-copied; the template itself is not registered).
        num_layers: number of layers.
        look_forward_twice: with box refinement, ``references[l]`` (l >= 1) keeps the graph of
            layer l-1's refinement (DINO), so a loss on layer l's box also trains layer l-1's
            box head and output; layer l itself is fed the detached reference either way.
    """

    def __init__(self, layer: DeformableDecoderLayer, num_layers: int,
                 look_forward_twice: bool = False) -> None:
        super().__init__()
        self.layers = get_clones(layer, num_layers)
        self.num_layers = num_layers
        self.look_forward_twice = look_forward_twice

    def forward(
        self,
        tgt: torch.Tensor,
        query_pos: torch.Tensor,
        reference_points: torch.Tensor,
        memory: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        valid_ratios: torch.Tensor,
        memory_padding_mask: torch.Tensor | None,
        bbox_heads: Sequence[nn.Module] | None = None,
        self_attn_mask: torch.Tensor | None = None,
    ) -> DecoderOutput:
        """Decode; refine the references per layer iff ``bbox_heads`` is given (§6.4).

        Args:
            tgt: (B, Q, C). query_pos: (B, Q, C).
            reference_points: (B, Q, 2) (x, y) or (B, Q, 4) (cx, cy, w, h) in valid-image coords [0, 1].
            memory: (B, N, C). spatial_shapes: (L, 2) int64. level_start_index: (L,) int64.
            valid_ratios: (B, L, 2) (w, h). memory_padding_mask: (B, N) bool, True = padding, or None.
            bbox_heads: one box head per layer mapping (B, Q, C) -> (B, Q, 4) raw offsets, or None.
                With heads, ``ref_{l+1} = detach(sigmoid(bbox_heads[l](h_l) + inverse_sigmoid(ref_l)))``.
            self_attn_mask: (Q, Q) bool, True = blocked, for every layer's self-attention, or None.

        Returns:
            DecoderOutput (see its docstring).
        """
        if bbox_heads is not None and len(bbox_heads) != self.num_layers:
            raise ValueError(f"bbox_heads must hold one head per layer ({self.num_layers}), got {len(bbox_heads)}")
        output, reference = tgt, reference_points
        predicted_from = reference  # what layer lid's box prediction refines (see references)
        hidden, references, locations, weights = [], [], [], []
        for lid, layer in enumerate(self.layers):
            ref_input = scale_reference_points(reference, valid_ratios)
            output, loc, attn = layer(
                output, query_pos, ref_input, memory, spatial_shapes, level_start_index, memory_padding_mask,
                self_attn_mask,
            )
            hidden.append(output)
            references.append(predicted_from)
            locations.append(loc)
            weights.append(attn)
            if bbox_heads is not None:
                refined = refine_reference(bbox_heads[lid](output), reference)
                reference = refined.detach()
                predicted_from = refined if self.look_forward_twice else reference
        return DecoderOutput(
            hidden_states=torch.stack(hidden),
            references=tuple(references),
            sampling_locations=torch.stack(locations, dim=1),
            attention_weights=torch.stack(weights, dim=1),
        )
