"""GFLOPs of a detector with fvcore, in the official convention (REFERENCE §10.1).

:func:`count_flops` traces one forward (eval mode, no grad) with ``fvcore.nn.FlopCountAnalysis``
and fvcore's default handles plus :data:`~sdetr.profiling.handles.CUSTOM_HANDLES` (1 multiply-add
= 1 flop). On top of fvcore's total it reports:

* ``groups``: a per-component breakdown that sums to the total (see :func:`flop_group`);
* ``detail``: sub-components the reconciliation of Sparse DETR's published figures needs
  (the shared token projection per caller, the top-k head, the box heads in refinement);
* ``uncounted`` / ``ignored_by_convention``: every op fvcore had no handle for, with call counts.

Two departures from a bare ``FlopCountAnalysis(model, inputs).total()``, both to count what the
eager forward executes, as the official measurement did:

* outputs are flattened to their tensors (fvcore cannot trace a dict holding Python bools);
* every module call stays in the graph: the tracer otherwise drops calls whose results are
  unused, e.g. the box head that refines the last decoder layer's reference (0.04 G at
  850×1040; the released code returns that reference, so its count includes it).

Group attribution uses the call stack of each op (its JIT scope), so a module shared by two
callers (the ``proposals`` projection used by Sparse DETR's scorer and by the query selection)
is charged to the caller.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from sdetr.profiling.handles import CUSTOM_HANDLES, IGNORED_BY_CONVENTION, Handle

logger = logging.getLogger(__name__)

GROUPS: tuple[str, ...] = ("backbone", "input_proj", "scoring_network", "encoder",
                           "encoder_aux_heads", "query_selection", "decoder", "heads", "other")
"""Breakdown groups, in forward order. ``heads`` = decoder heads + the two-stage/top-k token
head; ``query_selection`` = the token projection of the memory, ``pos_trans`` and the rest of
query selection; ``other`` = detector-level ops outside any submodule (mask resizing)."""

_WRAPPED = "detector"


@dataclass
class FlopCount:
    """One fvcore count. All counts are multiply-adds (flops in the official convention).

    total: sum over operators. groups: :data:`GROUPS` → count (sums to ``total``).
    detail: sub-components (each also inside one group). by_operator: fvcore op name → count.
    uncounted / ignored_by_convention: op name → number of calls without a handle.
    """

    total: int
    groups: dict[str, int]
    detail: dict[str, int]
    by_operator: dict[str, int]
    uncounted: dict[str, int]
    ignored_by_convention: dict[str, int]

    @property
    def gflops(self) -> float:
        return self.total / 1e9

    def as_dict(self) -> dict[str, Any]:
        """JSON form: GFLOPs (floats, 1e9 flops) plus the op lists."""
        return {
            "gflops": self.gflops,
            "groups": {k: v / 1e9 for k, v in self.groups.items()},
            "detail": {k: v / 1e9 for k, v in self.detail.items()},
            "by_operator": {k: v / 1e9 for k, v in self.by_operator.items()},
            "uncounted": dict(self.uncounted),
            "ignored_by_convention": dict(self.ignored_by_convention),
        }


class TracedForward(nn.Module):
    """Wraps a detector for fvcore: ``forward(images, masks)`` returns a flat tuple of every tensor
    in the detector's output, plus (``keep_module_outputs``) the tensor outputs of every leaf-module
    call, so that the tracer keeps module calls whose results are unused."""

    def __init__(self, detector: nn.Module, keep_module_outputs: bool = True) -> None:
        super().__init__()
        self.detector = detector
        self.keep_module_outputs = keep_module_outputs

    def forward(self, images: Tensor, masks: Tensor) -> tuple[Tensor, ...]:
        kept: list[Tensor] = []

        def keep(module: nn.Module, args: Any, output: Any) -> None:
            kept.extend(tensor_leaves(output))

        handles = [m.register_forward_hook(keep) for m in self.detector.modules()
                   if self.keep_module_outputs and next(m.children(), None) is None]
        try:
            out = self.detector(images, masks)
        finally:
            for handle in handles:
                handle.remove()
        return tuple(tensor_leaves(out)) + tuple(kept)


def tensor_leaves(obj: Any) -> list[Tensor]:
    """Every tensor inside nested dicts / lists / tuples / dataclasses, in order."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in tensor_leaves(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensor_leaves(v)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [t for f in dataclasses.fields(obj) for t in tensor_leaves(getattr(obj, f.name))]
    return []


def _under(stack: Sequence[str], prefix: str) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for name in stack)


def flop_group(stack: Sequence[str]) -> str:
    """Group of an op from its module call stack (names relative to the detector, outermost
    first). The first matching rule wins:

    encoder.aux_heads → encoder_aux_heads; encoder.scorer (incl. the token projection it calls)
    → scoring_network; query_selector.{class,bbox}_embed (top-k head) → heads; query_selector
    (incl. the token projection of the memory) → query_selection; heads (also when called by
    the decoder for refinement) → heads; decoder; encoder; input_proj; backbone; proposals
    called from elsewhere → query_selection; anything else → other.
    """
    if _under(stack, "encoder.aux_heads"):
        return "encoder_aux_heads"
    if _under(stack, "encoder.scorer"):
        return "scoring_network"
    if _under(stack, "query_selector.class_embed") or _under(stack, "query_selector.bbox_embed"):
        return "heads"
    if _under(stack, "query_selector"):
        return "query_selection"
    for prefix in ("heads", "decoder", "encoder", "input_proj", "backbone"):
        if _under(stack, prefix):
            return prefix
    if _under(stack, "proposals"):
        return "query_selection"
    return "other"


def flop_details(stack: Sequence[str]) -> list[str]:
    """Detail entries an op belongs to (each also lies inside one group)."""
    out = []
    if _under(stack, "proposals"):
        if _under(stack, "encoder.scorer"):
            out.append("token_projection_backbone")
        elif _under(stack, "query_selector"):
            out.append("token_projection_memory")
    if _under(stack, "query_selector.class_embed") or _under(stack, "query_selector.bbox_embed"):
        out.append("topk_head")
    if _under(stack, "heads"):
        out.append("decoder_heads_refinement" if _under(stack, "decoder") else "decoder_heads_outputs")
    if _under(stack, "encoder.layers") and any(n.endswith(".value_proj") for n in stack):
        out.append("encoder_value_projection")
    return out


def _stack_from_scope(scope: str) -> list[str]:
    """JIT scope ``/detector/detector.encoder/...`` → ``["encoder", ...]``."""
    names = [n for n in scope.split("/") if n]
    prefix = _WRAPPED + "."
    return [n[len(prefix):] for n in names if n.startswith(prefix)]


class _ScopeRecorder:
    """Wraps fvcore handles to record (call stack, count) of every counted op."""

    def __init__(self) -> None:
        self.records: list[tuple[list[str], int]] = []

    def wrap(self, handle: Handle) -> Handle:
        def recorded(inputs: list[Any], outputs: list[Any]) -> Any:
            count = handle(inputs, outputs)
            total = sum(count.values()) if isinstance(count, Mapping) else count
            scope = outputs[0].node().scopeName() if outputs else ""
            self.records.append((_stack_from_scope(scope), int(total)))
            return count
        return recorded


def _all_handles() -> dict[str, Handle]:
    # fvcore's default table is module-private; fvcore is frozen (last release 2022).
    from fvcore.nn.flop_count import _DEFAULT_SUPPORTED_OPS
    return {**_DEFAULT_SUPPORTED_OPS, **CUSTOM_HANDLES}


def count_flops(model: nn.Module, images: Tensor, masks: Tensor, *,
                keep_module_outputs: bool = True) -> FlopCount:
    """fvcore count of one ``model(images, masks)`` forward.

    The caller puts the model in the wanted mode (see :func:`sdetr.profiling.modes.profiling_modules`);
    this function only adds ``torch.no_grad``. images (B, 3, H, W), masks (B, H, W) bool
    (True = padding), on the model's device.
    """
    from fvcore.nn import FlopCountAnalysis
    recorder = _ScopeRecorder()
    traced = TracedForward(model, keep_module_outputs=keep_module_outputs)
    with torch.no_grad():
        analysis = FlopCountAnalysis(traced, (images, masks))
        analysis.set_op_handle(**{name: recorder.wrap(h) for name, h in _all_handles().items()})
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        total = int(analysis.total())
        by_operator = {k: int(v) for k, v in analysis.by_operator().items() if v}
        unsupported = dict(analysis.unsupported_ops())
    groups = Counter({g: 0 for g in GROUPS})
    detail: Counter = Counter()
    for stack, count in recorder.records:
        groups[flop_group(stack)] += count
        for name in flop_details(stack):
            detail[name] += count
    if sum(groups.values()) != total:
        raise RuntimeError(f"flop groups sum to {sum(groups.values())}, fvcore total is {total}")
    ignored = {k: v for k, v in sorted(unsupported.items()) if k in IGNORED_BY_CONVENTION}
    uncounted = {k: v for k, v in sorted(unsupported.items()) if k not in IGNORED_BY_CONVENTION}
    if uncounted:
        logger.warning("fvcore could not count these ops (calls): %s", uncounted)
    return FlopCount(total=total, groups=dict(groups), detail=dict(sorted(detail.items())),
                     by_operator=by_operator, uncounted=uncounted,
                     ignored_by_convention=ignored)


def mean_flop_counts(counts: Sequence[FlopCount]) -> dict[str, Any]:
    """Summary of per-image counts (the 100-image protocol): the true mean, and the LAST image's
    value, which is what the official ``compute_gflops`` returns (§10.1)."""
    if not counts:
        raise ValueError("mean_flop_counts: no counts")
    n = len(counts)
    per_image = [c.gflops for c in counts]
    groups = {g: sum(c.groups.get(g, 0) for c in counts) / n / 1e9 for g in counts[0].groups}
    uncounted: Counter = Counter()
    for c in counts:
        uncounted.update(c.uncounted)
    return {
        "gflops": sum(per_image) / n,
        "gflops_last_image": per_image[-1],
        "gflops_min": min(per_image),
        "gflops_max": max(per_image),
        "groups": groups,
        "per_image": per_image,
        "uncounted": dict(uncounted),
        "ignored_by_convention": counts[-1].ignored_by_convention,
    }


def inference_only_gflops(count: FlopCount) -> Optional[float]:
    """The count without Sparse DETR's encoder auxiliary heads (None when none ran).

    Exact: the auxiliary heads only add ops (their inputs are computed anyway)."""
    aux = count.groups.get("encoder_aux_heads", 0)
    return (count.total - aux) / 1e9 if aux else None
