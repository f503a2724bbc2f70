"""Loading a local weights file into a backbone (no download ever happens)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from sdetr.models.backbone.base import Backbone, LoadReport

logger = logging.getLogger(__name__)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else ""


def read_state_dict(path: str) -> dict[str, Tensor]:
    """Read ``path`` with ``torch.load(weights_only=True)`` on CPU.

    Accepts a plain state_dict or a dict holding one under ``"model"`` or ``"state_dict"``.
    Raises ValueError("weights file <path>: ...") if the file is missing, unreadable, or holds
    no dict of tensors.
    """
    if not Path(path).is_file():
        raise ValueError(f"weights file {path}: not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises pickle/zip/unpickling errors of many types
        raise ValueError(f"weights file {path}: cannot be read "
                         f"({type(err).__name__}: {_first_line(err)})") from err
    if isinstance(obj, Mapping):
        for wrapper in ("model", "state_dict"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"weights file {path}: expected a non-empty state_dict, "
                         f"got {type(obj).__name__}")
    not_tensor = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if not_tensor:
        raise ValueError(f"weights file {path}: entry {not_tensor[0]!r} is not a tensor; "
                         "expected a state_dict")
    return dict(obj)


def load_backbone_weights(backbone: Backbone, path: str) -> LoadReport:
    """Load ``path`` into ``backbone`` (non-strict) and report what happened.

    Foreign names are translated by ``backbone.translate_external_state_dict`` (torchvision/timm
    ResNet, official or timm Swin, or this backbone's own state_dict). Missing and unexpected keys
    are logged and returned, not fatal. Raises ValueError naming the file if it cannot be read,
    shares no key with the backbone (e.g. a detector checkpoint), or a shared key has another shape.
    """
    state_dict = read_state_dict(path)
    translated, ignored = backbone.translate_external_state_dict(state_dict)
    own = backbone.state_dict()
    common = [k for k in translated if k in own]
    if not common:
        sample = ", ".join(list(state_dict)[:3])
        raise ValueError(f"weights file {path}: no key in common with {type(backbone).__name__} "
                         f"(file keys start: {sample})")
    for key in common:
        if translated[key].shape != own[key].shape:
            raise ValueError(f"weights file {path}: {key} has shape {tuple(translated[key].shape)}, "
                             f"the backbone expects {tuple(own[key].shape)}")
    result = backbone.load_state_dict(translated, strict=False)
    report = LoadReport(path=str(path), loaded=tuple(common), missing=tuple(result.missing_keys),
                        unexpected=tuple(result.unexpected_keys), ignored=tuple(ignored))
    _log_report(report)
    return report


def _log_report(report: LoadReport) -> None:
    logger.info("weights file %s: loaded %d tensors, ignored %d (%s)", report.path, len(report.loaded),
                len(report.ignored), ", ".join(report.ignored[:5]))
    if report.missing:
        logger.warning("weights file %s: %d backbone keys not in the file (kept at init): %s",
                       report.path, len(report.missing), ", ".join(report.missing[:10]))
    if report.unexpected:
        logger.warning("weights file %s: %d unexpected keys not loaded: %s",
                       report.path, len(report.unexpected), ", ".join(report.unexpected[:10]))
