"""sdetr's own model-weight files: the state_dict plus the model config that built it.

Loading checks that the file was made by the same architecture (the model config, minus
settings that do not change the weights' layout) before touching any weight, so a checkpoint
from another model is refused with a one-line message naming the differing keys.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdetr.config.schema import ModelConfig
from sdetr.models.official import CheckpointError
from sdetr.utils.io import atomic_torch_save

FORMAT = "sdetr-model/1"
# Settings that do not change the layout or meaning of the weights.
_NOT_ARCHITECTURE = {"dropout", "kernel_backend", "loss", "rho", "token_selection"}
_NOT_ARCHITECTURE_BACKBONE = {"weights", "drop_path_rate", "train_all"}


def architecture_signature(cfg: ModelConfig) -> dict[str, Any]:
    """The model config fields that determine the state_dict layout (flat dict)."""
    sig = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_ARCHITECTURE}
    sig["backbone"] = {k: v for k, v in sig["backbone"].items()
                       if k not in _NOT_ARCHITECTURE_BACKBONE}
    return sig


def save_model_weights(path: str | Path, model: nn.Module, cfg: ModelConfig) -> Path:
    """Write {format, model config, state_dict} atomically."""
    return atomic_torch_save({"format": FORMAT, "model_config": dataclasses.asdict(cfg),
                              "model": model.state_dict()}, path)


def load_model_weights(path: str | Path, model: nn.Module, cfg: ModelConfig) -> None:
    """Load weights saved by :func:`save_model_weights` into ``model`` (built from ``cfg``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file becomes one line naming it
        raise CheckpointError(f"checkpoint {path}: not a readable torch file "
                              f"({type(exc).__name__})") from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: not an sdetr model file (for checkpoints of "
                              "the official code use `sdetr checkpoint --official`)")
    theirs = architecture_signature(ModelConfig(**_model_kwargs(obj["model_config"])))
    ours = architecture_signature(cfg)
    diffs = _diff(theirs, ours)
    if diffs:
        raise CheckpointError(f"checkpoint {path} is from another model: " + ", ".join(diffs[:4]))
    try:
        model.load_state_dict(obj["model"], strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"checkpoint {path}: weights do not fit this model ({first})")


def _model_kwargs(raw: dict[str, Any]) -> dict[str, Any]:
    from sdetr.config.schema import BackboneConfig, LossConfig
    kwargs = dict(raw)
    kwargs["backbone"] = BackboneConfig(**raw["backbone"])
    kwargs["loss"] = LossConfig(**raw["loss"])
    return kwargs


def _diff(theirs: dict[str, Any], ours: dict[str, Any], prefix: str = "model.") -> list[str]:
    out = []
    for key in sorted(set(theirs) | set(ours)):
        a, b = theirs.get(key), ours.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}={a!r} in the file vs {b!r} here")
    return out
