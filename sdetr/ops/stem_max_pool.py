"""The ResNet stem's max pool on the CPU: 3x3 window, stride 2, padding 1, on NCHW tensors.

Shapes: input (B, C, H, W) → output (B, C, ⌈H/2⌉, ⌈W/2⌉), same dtype; the op's indices are int64
(B, C, ⌈H/2⌉, ⌈W/2⌉), the flat position h·W + w of each maximum inside its (H, W) plane.

Values, indices and gradients are exactly those of ``nn.MaxPool2d(3, 2, 1)``: the window is
scanned row by row, a larger value or a NaN replaces the running maximum (ties keep the first
position), and the gradient goes to the maximum's position. torch's NCHW CPU forward of this pool
is ~20-30x slower than its channels_last one, which is why the op exists. Backends:

* ``"reference"``: torch's channels_last kernel (the input converted to channels_last and the
  output back: two copies, ~12 ms of the 4 x 64 x 176 x 128 bf16 stem map on 2 cores);
* ``"compiled"``: ``sdetr_C::stem_max_pool_forward``, a direct NCHW kernel (no copies).

Both backward through torch's NCHW ``max_pool2d_with_indices_backward`` (fast) with the NCHW
indices. CPU only: :class:`sdetr.models.backbone.resnet.StemMaxPool` pools CUDA tensors with
``F.max_pool2d``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import backends

OP_NAME = "stem_max_pool"
KERNEL, STRIDE, PADDING = (3, 3), (2, 2), (1, 1)


def _check_input(x: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"stem_max_pool: input must be (B, C, H, W), got shape {tuple(x.shape)}")
    if x.device.type != "cpu":
        raise ValueError(f"stem_max_pool: CPU tensors only, got one on {x.device}")


def stem_max_pool_pytorch(x: Tensor) -> tuple[Tensor, Tensor]:
    """Reference forward: (output, indices), both contiguous NCHW (shapes in the module docstring),
    computed by torch's channels_last kernel."""
    y, indices = torch.ops.aten.max_pool2d_with_indices(
        x.contiguous(memory_format=torch.channels_last), KERNEL, STRIDE, PADDING)
    return y.contiguous(), indices.contiguous()


def stem_max_pool_backward(grad_output: Tensor, x: Tensor, indices: Tensor) -> Tensor:
    """Gradient of the input (B, C, H, W), contiguous NCHW, from the forward's NCHW ``indices``."""
    return torch.ops.aten.max_pool2d_with_indices_backward(
        grad_output.contiguous(), x, KERNEL, STRIDE, PADDING, (1, 1), False, indices)


class _StemMaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, backend: str) -> Tensor:
        ctx.backend = backends.get_backend(OP_NAME, backend)
        y, indices = ctx.backend.forward(x)
        ctx.save_for_backward(x, indices)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        x, indices = ctx.saved_tensors
        return ctx.backend.backward(grad, x, indices), None


def stem_max_pool(x: Tensor, backend: str | None = None) -> Tensor:
    """3x3 / stride 2 / padding 1 max pool of a CPU (B, C, H, W) tensor → (B, C, ⌈H/2⌉, ⌈W/2⌉),
    contiguous NCHW, differentiable; ``backend`` as in :mod:`sdetr.ops.backends` (None: the
    default / automatic one)."""
    name = backends.resolve_backend(OP_NAME, backend)
    _check_input(x)
    x = x.contiguous()
    if torch.is_grad_enabled() and x.requires_grad:
        return _StemMaxPool.apply(x, name)
    return backends.get_backend(OP_NAME, name).forward(x)[0]


backends.register_backend(OP_NAME, backends.REFERENCE, stem_max_pool_pytorch, stem_max_pool_backward)
