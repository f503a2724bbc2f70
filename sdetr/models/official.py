"""Load checkpoints saved by the official Deformable DETR / Sparse DETR code (REFERENCE §11).

The official layout keeps everything under ``transformer.*`` plus top-level head lists
(``class_embed.n``, ``bbox_embed.n``), with aliased duplicates of the heads under
``transformer.decoder.*`` and ``transformer.encoder.*``. Our detector keeps each part with the
seam that uses it; :func:`official_key_to_ours` maps one layout onto the other.

Loading is safe: ``torch.load(weights_only=True)`` with only ``argparse.Namespace`` (the
pickled ``args`` of training checkpoints) allow-listed. No pickled code is executed.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

IGNORED_SUFFIXES = ("total_ops", "total_params", "num_batches_tracked")
_HEAD = re.compile(r"^(class_embed|bbox_embed)\.(\d+)\.(.*)$")
_ALIAS = re.compile(r"^transformer\.(decoder|encoder)\.(class_embed|bbox_embed)\.(\d+)\.(.*)$")
_PREFIXES = (
    ("transformer.level_embed", "level_embed"),
    ("transformer.encoder.layers.", "encoder.layers."),
    ("transformer.decoder.layers.", "decoder.layers."),
    ("transformer.enc_mask_predictor.", "encoder.scorer."),
    ("transformer.reference_points.", "query_selector.reference_points."),
    ("transformer.enc_output.", "proposals.enc_output."),
    ("transformer.enc_output_norm.", "proposals.enc_output_norm."),
    ("transformer.pos_trans.", "query_selector.pos_trans."),
    ("transformer.pos_trans_norm.", "query_selector.pos_trans_norm."),
    ("query_embed.", "query_selector.query_embed."),
    ("input_proj.", "input_proj.proj."),
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; one line, naming the file."""


@dataclass(frozen=True)
class HeadLayout:
    """Where the official head index n lives in our model."""

    dec_layers: int
    two_stage: bool
    num_enc_aux: int

    @classmethod
    def of(cls, model: nn.Module) -> "HeadLayout":
        encoder_aux = getattr(model.encoder, "aux_heads", None)
        return cls(dec_layers=len(model.heads), two_stage=model.proposals is not None,
                   num_enc_aux=len(encoder_aux) if encoder_aux is not None else 0)

    def target(self, kind: str, n: int) -> Optional[str]:
        """Our module path of official ``{kind}.{n}`` (kind = class_embed | bbox_embed)."""
        if n < self.dec_layers:
            return f"heads.{kind}.{n}"
        if self.two_stage and n == self.dec_layers:
            return f"query_selector.{kind}"
        aux = n - self.dec_layers - (1 if self.two_stage else 0)
        if 0 <= aux < self.num_enc_aux:
            return f"encoder.aux_heads.{kind}.{aux}"
        return None

    def alias_index(self, where: str, n: int) -> int:
        """Top-level index of ``transformer.{where}.{kind}.{n}`` (§11.2 aliasing rule)."""
        if where == "decoder":
            return n
        return n + self.dec_layers + (1 if self.two_stage else 0)


@dataclass
class OfficialLoadReport:
    path: str
    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    ignored: list[str]
    args: Optional[dict[str, Any]]


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load`` with weights_only=True and argparse.Namespace allow-listed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: file not found")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unpickling refused"
        raise CheckpointError(f"checkpoint {path}: refused to unpickle ({first[:200]})")
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path}: not a readable torch file ({type(exc).__name__})")
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict, got {type(obj).__name__}")
    return obj


def official_state_dict(obj: dict[str, Any], path: str | Path) -> dict[str, Tensor]:
    """The model state_dict inside an official checkpoint (key ``model``, or the dict itself)."""
    state = obj.get("model", obj)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path}: no tensor state_dict under 'model'")
    return state


def official_key_to_ours(key: str, layout: HeadLayout, backbone: nn.Module) -> Optional[str]:
    """Our key for one official key, or None if it has no place in our model."""
    match = _HEAD.match(key)
    if match:
        target = layout.target(match.group(1), int(match.group(2)))
        return f"{target}.{match.group(3)}" if target else None
    for official, ours in _PREFIXES:
        if key.startswith(official):
            return ours + key[len(official):]
    if key.startswith("backbone.0.body."):
        inner = key[len("backbone.0.body."):]
        translated, _ = backbone.translate_external_state_dict({inner: torch.empty(0)})
        return f"backbone.{next(iter(translated))}" if translated else None
    return None


def translate_official(state: dict[str, Tensor], model: nn.Module
                       ) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """Official state_dict → (ours, unexpected official keys, ignored keys).

    Aliased head keys are checked to hold the same tensor as their canonical key and dropped.
    """
    layout = HeadLayout.of(model)
    ours: dict[str, Tensor] = {}
    unexpected, ignored = [], []
    for key, value in state.items():
        if key.endswith(IGNORED_SUFFIXES):
            ignored.append(key)
            continue
        alias = _ALIAS.match(key)
        if alias:
            where, kind, n, rest = alias.groups()
            canonical = f"{kind}.{layout.alias_index(where, int(n))}.{rest}"
            if canonical in state and not torch.equal(state[canonical], value):
                raise CheckpointError(f"aliased key {key} differs from {canonical}")
            if canonical in state:
                ignored.append(key)
                continue
            key = canonical
        target = official_key_to_ours(key, layout, model.backbone)
        if target is None:
            unexpected.append(key)
        else:
            ours[target] = value
    return ours, unexpected, ignored


def describe_official(keys: list[str]) -> str:
    """A human name for the architecture an official state_dict belongs to."""
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("transformer.enc_mask_predictor."):
        return "Sparse DETR"
    if has("transformer.pos_trans."):
        shape_note = "two-stage / top-k queries"
        return f"Deformable DETR ({shape_note})"
    if has("query_embed."):
        return "Deformable DETR (learned queries)"
    return "an unknown architecture"


def load_official_checkpoint(path: str | Path, model: nn.Module, *,
                             strict_backbone: bool = False) -> OfficialLoadReport:
    """Load an official Deformable/Sparse DETR checkpoint into ``model``.

    Refuses (CheckpointError) when the checkpoint belongs to another architecture: any
    non-backbone key missing or unexpected, or any shape mismatch. Missing/unexpected backbone
    keys are only reported unless ``strict_backbone``.
    """
    obj = read_checkpoint(path)
    state = official_state_dict(obj, path)
    ours, unexpected, ignored = translate_official(state, model)
    own = model.state_dict()
    unexpected += [k for k in ours if k not in own]
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in ours.items()
                  if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in ours and not k.endswith(IGNORED_SUFFIXES)]
    fatal_missing = [k for k in missing if strict_backbone or not k.startswith("backbone.")]
    fatal_unexpected = [k for k in unexpected if strict_backbone or not k.startswith("backbone.")]
    if mismatched or fatal_missing or fatal_unexpected:
        raise CheckpointError(_refusal(path, state, mismatched, fatal_missing, fatal_unexpected))
    model.load_state_dict({k: v for k, v in ours.items() if k in own}, strict=False)
    args = obj.get("args")
    report = OfficialLoadReport(path=str(path), loaded=sorted(k for k in ours if k in own),
                                missing=missing, unexpected=unexpected, ignored=ignored,
                                args=vars(args) if isinstance(args, argparse.Namespace) else None)
    logger.info("loaded %s: %d tensors, %d missing, %d unexpected, %d ignored", path,
                len(report.loaded), len(missing), len(unexpected), len(ignored))
    return report


def _refusal(path: str | Path, state: dict[str, Tensor], mismatched: list[str],
             missing: list[str], unexpected: list[str]) -> str:
    parts = []
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatches (e.g. {mismatched[0]})")
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    kind = describe_official(list(state))
    return (f"checkpoint {path} looks like {kind} and does not fit this model: "
            + "; ".join(parts))


# ------------------------------------------------------------------------------------------
# export: our model → the official layout (for interop, and to test the loader end to end)

_OUR_HEAD = re.compile(
    r"^(heads\.(class_embed|bbox_embed)\.(\d+)|query_selector\.(class_embed|bbox_embed)"
    r"|encoder\.aux_heads\.(class_embed|bbox_embed)\.(\d+))\.(.*)$")


def _backbone_key_to_official(key: str, swin: bool) -> str:
    """``backbone.<ours>`` → ``backbone.0.body.<official>`` (ResNet identical; Swin renamed)."""
    inner = key[len("backbone."):]
    norm = re.match(r"^out_norms\.(\d+)\.(.*)$", inner)
    if norm:
        return f"backbone.0.body.norm{int(norm.group(1)) + 1}.{norm.group(2)}"
    inner = inner[len("body."):] if inner.startswith("body.") else inner
    down = re.match(r"^layers\.(\d+)\.downsample\.(.*)$", inner)
    if down and swin:  # timm keeps the patch merging at the start of the next stage
        inner = f"layers.{int(down.group(1)) - 1}.downsample.{down.group(2)}"
    return f"backbone.0.body.{inner}"


def export_official_state_dict(model: nn.Module, *, refine_alias: bool = True
                               ) -> dict[str, Tensor]:
    """Our model's weights under the official key names, aliases included (REFERENCE §11.2).

    ``refine_alias``: with box refinement but no two-stage, add ``transformer.decoder.bbox_embed``
    aliases as Deformable DETR's code does (Sparse DETR's code does not).
    """
    layout = HeadLayout.of(model)
    swin = type(model.backbone).__name__.startswith("Swin")
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        for name in _official_names(key, layout, model.box_refine, refine_alias, swin):
            out[name] = value
    return out


def _official_names(key: str, layout: HeadLayout, box_refine: bool, refine_alias: bool,
                    swin: bool) -> list[str]:
    head = _OUR_HEAD.match(key)
    if head:
        _, k1, n1, k2, k3, n3, rest = head.groups()
        kind = k1 or k2 or k3
        if k1:
            n = int(n1)
        elif k2:
            n = layout.dec_layers
        else:
            n = layout.dec_layers + (1 if layout.two_stage else 0) + int(n3)
        names = [f"{kind}.{n}.{rest}"]
        if layout.two_stage or (kind == "bbox_embed" and box_refine and refine_alias
                                and n < layout.dec_layers):
            names.append(f"transformer.decoder.{kind}.{n}.{rest}")
        if k3:
            names.append(f"transformer.encoder.{kind}.{n3}.{rest}")
        return names
    if key.startswith("backbone."):
        return [_backbone_key_to_official(key, swin)]
    for official, ours in _PREFIXES:
        if key.startswith(ours):
            return [official + key[len(ours):]]
    raise KeyError(f"no official name for {key}")
