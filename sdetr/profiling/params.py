"""Parameter counts in the conventions the papers use (REFERENCE §8).

* ``params_total``: every distinct parameter tensor (shared heads counted once).
* ``params_trainable``: those with ``requires_grad`` — the papers' "Params" column for dense
  models (frozen backbone stem excluded).
* ``params_inference``: trainable parameters that inference actually uses, i.e. without
  training-only modules such as Sparse DETR's encoder auxiliary heads — the papers' count for
  Sparse DETR (40.9M).
* ``params_inference_all``: everything inference uses, frozen parameters included.

A module marks itself training-only with a class or instance attribute
``training_only = True``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn


@dataclass(frozen=True)
class ParamCounts:
    params_total: int
    params_trainable: int
    params_frozen: int
    params_inference: int
    params_inference_all: int
    params_training_only: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def training_only_parameters(model: nn.Module) -> set[int]:
    """ids of parameters that belong to modules flagged ``training_only``."""
    ids: set[int] = set()
    for module in model.modules():
        if getattr(module, "training_only", False):
            ids.update(id(p) for p in module.parameters())
    return ids


def count_parameters(model: nn.Module) -> ParamCounts:
    """Count distinct parameters of ``model`` in the conventions described above."""
    params = {id(p): p for p in model.parameters()}
    train_only = training_only_parameters(model)
    total = sum(p.numel() for p in params.values())
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    inference = [p for i, p in params.items() if i not in train_only]
    return ParamCounts(
        params_total=total,
        params_trainable=trainable,
        params_frozen=total - trainable,
        params_inference=sum(p.numel() for p in inference if p.requires_grad),
        params_inference_all=sum(p.numel() for p in inference),
        params_training_only=sum(params[i].numel() for i in train_only if i in params),
    )
