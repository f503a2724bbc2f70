"""Parameter-free sine positional encodings (REFERENCE §2.4 and §6.2 step 9)."""

from __future__ import annotations

import math

import torch

__all__ = ["sine_position_encoding", "box_sine_embedding"]


def _frequencies(num_pos_feats: int, temperature: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """t_k = temperature ** (2 * floor(k / 2) / num_pos_feats), k = 0 .. num_pos_feats - 1, shape (F,)."""
    if num_pos_feats <= 0 or num_pos_feats % 2 != 0:
        raise ValueError(f"num_pos_feats must be a positive even number, got {num_pos_feats}")
    k = torch.arange(num_pos_feats, dtype=dtype, device=device)
    return temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / num_pos_feats)


def _interleave_sin_cos(v: torch.Tensor) -> torch.Tensor:
    """v (..., F) already divided by t_k -> (..., F) with sin on even and cos on odd channels."""
    return torch.stack((v[..., 0::2].sin(), v[..., 1::2].cos()), dim=-1).flatten(-2)


def sine_position_encoding(
    mask: torch.Tensor,
    num_pos_feats: int = 128,
    temperature: float = 10000.0,
    scale: float = 2 * math.pi,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Deformable-DETR sine encoding of one feature level.

    Args:
        mask: (B, H, W) bool, True = padding. Positions count only non-pad pixels, so the values
            inside the valid region do not depend on how much padding follows it.
        num_pos_feats: channels per axis (even).
        temperature: frequency base.
        scale: the normalised running position (in (0, 1]) is multiplied by this.
        dtype: floating dtype of the result.

    Returns:
        (B, 2 * num_pos_feats, H, W): channels [0, F) encode y, channels [F, 2F) encode x; inside each
        part, even channels are sin and odd channels cos (``sin(v/t_0), cos(v/t_1), ...``).
    """
    if mask.dim() != 3 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a (B, H, W) bool tensor, got {tuple(mask.shape)} {mask.dtype}")
    eps = 1e-6
    not_mask = (~mask).to(dtype)
    y_embed = not_mask.cumsum(1)
    x_embed = not_mask.cumsum(2)
    y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + eps) * scale
    x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + eps) * scale
    dim_t = _frequencies(num_pos_feats, temperature, dtype, mask.device)
    pos_y = _interleave_sin_cos(y_embed[..., None] / dim_t)
    pos_x = _interleave_sin_cos(x_embed[..., None] / dim_t)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2).contiguous()


def box_sine_embedding(
    coords: torch.Tensor,
    num_pos_feats: int = 128,
    temperature: float = 10000.0,
    scale: float = 2 * math.pi,
) -> torch.Tensor:
    """Sine embedding of normalised points or boxes (two-stage query position, §6.2 step 9).

    Args:
        coords: (B, Q, D) with D = 2 (x, y) or 4 (cx, cy, w, h), already in [0, 1] (i.e. the sigmoid
            of the unactivated coordinates). No -0.5 shift and no normalisation is applied.
        num_pos_feats: channels per coordinate (even).
        temperature: frequency base.
        scale: multiplier applied to ``coords`` before the frequencies.

    Returns:
        (B, Q, D * num_pos_feats) in coordinate order (x, y[, w, h]); each block of num_pos_feats
        channels interleaves ``sin(v/t_0), cos(v/t_1), ...``. Same dtype as ``coords``.
    """
    if coords.dim() != 3 or coords.shape[-1] not in (2, 4):
        raise ValueError(f"coords must be (B, Q, 2|4), got {tuple(coords.shape)}")
    dim_t = _frequencies(num_pos_feats, temperature, coords.dtype, coords.device)
    pos = (coords * scale)[..., None] / dim_t
    return _interleave_sin_cos(pos).flatten(2)
