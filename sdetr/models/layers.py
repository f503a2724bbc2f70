"""Small shared building blocks: MLP head, inverse sigmoid, module cloning."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["MLP", "inverse_sigmoid", "get_clones"]


class MLP(nn.Module):
    """Plain multi-layer perceptron with ReLU between layers (none after the last).

    The Linears live in ``self.layers`` so state_dict keys read ``layers.{0..num_layers-1}.*``
    (the official ``bbox_embed.n.layers.{0,1,2}``).

    Args:
        input_dim: channels of the input.
        hidden_dim: channels of every hidden layer.
        output_dim: channels of the output.
        num_layers: number of Linear layers (>= 1).
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MLP num_layers must be >= 1, got {num_layers}")
        in_dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        out_dims = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(in_dims, out_dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., input_dim) -> (..., output_dim)."""
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = torch.relu(x)
        return x


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Logit with clamping: ``log(clamp(x, eps) / clamp(1 - x, eps))`` after clamping x to [0, 1]."""
    x = x.clamp(min=0.0, max=1.0)
    x1 = x.clamp(min=eps)
    x2 = (1.0 - x).clamp(min=eps)
    return torch.log(x1 / x2)


def get_clones(module: nn.Module, n: int) -> nn.ModuleList:
    """``n`` independent deep copies of ``module`` (same initial values, unshared parameters)."""
    if n < 0:
        raise ValueError(f"get_clones n must be >= 0, got {n}")
    return nn.ModuleList(copy.deepcopy(module) for _ in range(n))
