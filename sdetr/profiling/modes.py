"""Which modules a profiled forward runs ("full" vs "inference_only").

* ``full`` (default): what the released code runs at inference, e.g. Sparse DETR's encoder
  auxiliary heads (its ``aux_in_eval``), so FLOPs/FPS compare with the official figures.
* ``inference_only``: training-only modules off (our eval default).

Either way the model is in eval mode and logging-only side computations are off (Sparse DETR's
``track_corr``: the timed forward is the model only, §10.2).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

from torch import nn

ModuleSet = Literal["full", "inference_only"]
MODULE_SETS: tuple[str, ...] = ("full", "inference_only")


def has_training_only_modules(model: nn.Module) -> bool:
    """True when some submodule is marked ``training_only`` (e.g. encoder auxiliary heads)."""
    return any(getattr(m, "training_only", False) for m in model.modules())


def describe_modules(model: nn.Module, modules: ModuleSet) -> str:
    """Protocol note for ``modules`` on ``model``."""
    if not has_training_only_modules(model):
        return f"{modules} (the model has no training-only modules)"
    if modules == "full":
        return "full (training-only modules such as encoder auxiliary heads run at inference, as the released code)"
    return "inference_only (training-only modules such as encoder auxiliary heads off)"


@contextlib.contextmanager
def profiling_modules(model: nn.Module, modules: ModuleSet = "full", *,
                      train: bool = False) -> Iterator[nn.Module]:
    """Put ``model`` in eval (or ``train``) mode with the module set ``modules``; restore after.

    Sets every ``track_corr`` attribute to False and every ``aux_in_eval`` attribute to
    ``modules == "full"`` (attributes of Sparse DETR and its encoder).
    """
    if modules not in MODULE_SETS:
        raise ValueError(f"modules must be one of {MODULE_SETS}, got {modules!r}")
    saved_training = {m: m.training for m in model.modules()}
    saved_attrs: list[tuple[nn.Module, str, object]] = []
    for m in model.modules():
        for attr, value in (("track_corr", False), ("aux_in_eval", modules == "full")):
            if hasattr(m, attr):
                saved_attrs.append((m, attr, getattr(m, attr)))
                setattr(m, attr, value)
    model.train(train)
    try:
        yield model
    finally:
        for m, attr, value in saved_attrs:
            setattr(m, attr, value)
        for m, was_training in saved_training.items():
            m.training = was_training
