"""Define a differentiable custom op and its backward op once per process.

Shared by every op of this package that has a backward (``ms_deform_attn``, ``kda``): the
backward op is defined first (the forward's autograd calls it), both get fake kernels, the
forward gets autograd and, because the kernels are float32/float64 only, an autocast rule that
runs it in float32. Re-import or ``importlib.reload`` keeps the first definition.
"""

from __future__ import annotations

from typing import Callable

import torch


def op_defined(name: str) -> bool:
    """True when ``torch.ops.sdetr.<name>`` exists."""
    return hasattr(torch.ops.sdetr, name)


def define_differentiable_op(qualname: str, kernel: Callable, fake: Callable,
                             backward_qualname: str, backward_kernel: Callable,
                             backward_fake: Callable, autograd_backward: Callable,
                             setup_context: Callable) -> None:
    """Define ``qualname`` (with autograd) and ``backward_qualname`` unless already defined."""
    if not op_defined(backward_qualname.split("::")[1]):
        backward_op = torch.library.custom_op(backward_qualname, mutates_args=())(backward_kernel)
        backward_op.register_fake(backward_fake)
    if not op_defined(qualname.split("::")[1]):
        forward_op = torch.library.custom_op(qualname, mutates_args=())(kernel)
        forward_op.register_fake(fake)
        forward_op.register_autograd(autograd_backward, setup_context=setup_context)
        for device_type in ("cpu", "cuda"):
            if torch.amp.is_autocast_available(device_type):
                torch.library.register_autocast(qualname, device_type, torch.float32)
