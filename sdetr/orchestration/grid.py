"""Expand a :class:`SweepSpec` into :class:`RunPlan` s: one resolved, validated config per run.

Order: the grid's cartesian product (first axis slowest) minus ``exclude`` matches, then the
``include`` rows. Each point goes through :func:`sdetr.config.load_config` (so an impossible
combination fails before anything starts, naming the file, the run and the key), then the
sweep's resources and stages are applied. A run is identified by :func:`config_hash`, a hash of
its resolved config without the keys that only say where or how it runs; its directory is
``<output_dir>/<sweep name>/<run name>-<hash8>``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from sdetr.config import ConfigError, ExperimentConfig, load_config, to_dict
from sdetr.orchestration.spec import SOURCE_KEYS, SweepSpec

IDENTITY_EXCLUDED = ("name", "preset", "train.output_dir", "data.num_workers",
                     "train.keep_checkpoints", "train.cpus")
"""Config keys that do not change what a run computes: left out of :func:`config_hash`."""
HASH_CHARS = 16


@dataclass
class RunPlan:
    """One run of a sweep.

    name: short unique name from its axis values (MLflow run name); axes: the grid / include
    items that define it (key -> value, ``preset`` / ``config`` included); cfg: the resolved
    config (absolute ``data.root``); config_hash: :func:`config_hash`; run_dir: absolute.
    """

    name: str
    axes: dict[str, Any]
    cfg: ExperimentConfig
    config_hash: str
    run_dir: Path

    @property
    def workers(self) -> int:
        return self.cfg.train.workers


def config_hash(cfg: ExperimentConfig) -> str:
    """sha256 (16 hex digits) of the resolved config minus :data:`IDENTITY_EXCLUDED`; a
    ``train.deepspeed_config`` file counts by its content, not its path."""
    tree = to_dict(cfg)
    ds_file = cfg.train.deepspeed_config
    if ds_file is not None and Path(ds_file).is_file():
        tree["train"]["deepspeed_config"] = hashlib.sha256(Path(ds_file).read_bytes()).hexdigest()
    for key in IDENTITY_EXCLUDED:
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node[part]
        node.pop(leaf, None)
    text = json.dumps(tree, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_CHARS]


def points(spec: SweepSpec) -> list[dict[str, Any]]:
    """The sweep's runs as axis dicts: grid product minus exclusions, then include rows."""
    keys = list(spec.grid)
    product = [dict(zip(keys, combo)) for combo in itertools.product(*spec.grid.values())]
    if not keys:
        product = [] if spec.include else [{}]
    kept = [p for p in product if not any(_matches(p, row) for row in spec.exclude)]
    return kept + [dict(row) for row in spec.include]


def _matches(point: dict[str, Any], row: dict[str, Any]) -> bool:
    return all(k in point and point[k] == v for k, v in row.items())


def expand(spec: SweepSpec) -> list[RunPlan]:
    """Resolve every run of ``spec``; raise ConfigError on the first impossible one and on two
    runs with the same config."""
    plans: list[RunPlan] = []
    seen: dict[str, str] = {}
    names: set[str] = set()
    all_points = points(spec)
    if not all_points:
        raise ConfigError(f"{spec.path}: the grid is empty after exclude")
    for axes in all_points:
        name = _unique(run_name(axes) or spec.name, names)
        cfg = resolve(spec, axes, name)
        digest = config_hash(cfg)
        if digest in seen:
            raise ConfigError(f"{spec.path}: runs {seen[digest]} and {name} resolve to the same "
                              "config (an axis value that changes nothing? use exclude)")
        seen[digest] = name
        run_dir = Path(cfg.train.output_dir) / f"{_slug(name)}-{digest[:8]}"
        plans.append(RunPlan(name=name, axes=axes, cfg=cfg, config_hash=digest,
                             run_dir=run_dir))
    return plans


def resolve(spec: SweepSpec, axes: dict[str, Any], name: str) -> ExperimentConfig:
    """The validated config of one run: base + base.set + resources + axes, then stages."""
    values = dict(spec.base.values)
    values.update(_resource_values(spec))
    source = spec.base.source
    for key, value in axes.items():
        if key == "preset":
            source = value
        elif key == "config":
            source = str((spec.path.parent / value).resolve())
        else:
            values[key] = value
    values["name"] = name
    values["train.output_dir"] = str((Path(spec.output_dir) / spec.name).resolve())
    try:
        cfg = load_config(source, values=values)
        _apply_stages(spec, cfg, axes)
        cfg.validate()
    except ConfigError as exc:
        raise ConfigError(f"{spec.path}: run {name} ({describe(axes) or 'base'}): {exc}") from None
    cfg.data.root = str(Path(cfg.data.root).resolve())
    return cfg


def _resource_values(spec: SweepSpec) -> dict[str, Any]:
    res = spec.resources
    out: dict[str, Any] = {}
    if res.workers is not None:
        out["train.workers"] = res.workers
    if res.zero_stage is not None:
        out["train.zero_stage"] = res.zero_stage
    if res.deepspeed_config is not None:
        out["train.deepspeed_config"] = res.deepspeed_config
    out["train.use_gpu"] = res.gpus_per_worker > 0
    return out


def _apply_stages(spec: SweepSpec, cfg: ExperimentConfig, axes: dict[str, Any]) -> None:
    stages = spec.stages
    if stages.eval_rho and cfg.model.selects_tokens and "eval.rho_sweep" not in axes:
        cfg.eval.rho_sweep = list(stages.eval_rho)
    if stages.profile is not None and "profile.what" not in axes:
        cfg.profile.what = list(stages.profile)


def describe(axes: dict[str, Any]) -> str:
    """``preset=sparse_detr_tiny model.rho=0.3``."""
    return " ".join(f"{k}={_text(v)}" for k, v in axes.items())


def run_name(axes: dict[str, Any]) -> str:
    """Short name from axis values: a preset/config as itself, a string value as itself, a
    bool as ``<last key part>`` / ``no_<last key part>``, others as ``<last key part><value>``
    (``rho0.3``, ``seed1``), joined by ``-``."""
    parts = []
    for key, value in axes.items():
        last = key.split(".")[-1]
        if key in SOURCE_KEYS:
            parts.append(Path(str(value)).stem if key == "config" else str(value))
        elif isinstance(value, str):
            parts.append(value)
        elif isinstance(value, bool):
            parts.append(last if value else f"no_{last}")
        else:
            parts.append(f"{last}{_text(value)}")
    return "-".join(parts)


def _text(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(_text(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.,=-]+", "_", name)[:120]


def _unique(name: str, taken: set[str]) -> str:
    out, i = name, 2
    while out in taken:
        out, i = f"{name}-{i}", i + 1
    taken.add(out)
    return out


def unique_data(plans: Iterable[RunPlan]) -> list[ExperimentConfig]:
    """One config per distinct ``data`` section (for dataset checks and generation)."""
    out: dict[str, ExperimentConfig] = {}
    for plan in plans:
        out.setdefault(json.dumps(to_dict(plan.cfg.data), sort_keys=True), plan.cfg)
    return list(out.values())
