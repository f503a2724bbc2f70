"""Sweep files: a typed :class:`SweepSpec` loaded from ``experiments/*.yaml``.

A sweep file is YAML with these top-level keys (only ``base`` is required)::

    name: smoke                      # default: the file's stem; also the MLflow parent run name
    description: one line            # shown by --dry-run, logged on the parent run
    base:                            # what every run starts from
      preset: sparse_detr_tiny       # a preset name, or
      config: ../my_run.yaml         #   a run config file (relative to the sweep file)
      set:                           # config overrides for every run (dotted or nested keys)
        train.epochs: 2
    grid:                            # axes; the runs are their cartesian product, first axis
      preset: [deformable_detr_tiny, sparse_detr_tiny]   # slowest. `preset` / `config` swap
      model.rho: [0.1, 0.3]          # the base; any other key is a dotted config key
    exclude:                         # drop every grid point that matches all items of a row
      - {preset: deformable_detr_tiny, model.rho: 0.3}
    include:                         # extra runs: base + these items (not crossed with grid)
      - {preset: lite_detr_h3l1_6x1_tiny}
    stages:
      eval_rho: [0.1, 0.5, 1.0]      # final re-evaluation at these rho (token-selecting runs)
      profile: [params, flops, fps]  # profile.what of every run
    resources:                       # per run
      workers: 2                     # Ray Train workers (default: the config's train.workers)
      cpus_per_worker: 1
      gpus_per_worker: 0             # > 0 trains on GPUs (train.use_gpu)
      zero_stage: 2                  # train.zero_stage
      deepspeed_config: ../orchestration/deepspeed/zero2.json   # train.deepspeed_config
    limits:
      max_concurrent: 1              # runs at once (default: as many as the cluster fits)
      retries: 1                     # worker-group restarts per run, from its last checkpoint
    tracking:
      uri: sqlite:///mlflow.db       # default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
      experiment: smoke              # default: the sweep's name
    output_dir: runs/sweeps          # run directories: <output_dir>/<name>/<run>-<hash8>

Paths in the file (``base.config``, ``resources.deepspeed_config``) are relative to the sweep
file; ``output_dir`` and config paths such as ``data.root`` are relative to the working
directory, as for ``sdetr train``. Every error is a :class:`~sdetr.config.ConfigError` whose
one line names the file and the key.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from sdetr.config import ConfigError, build_typed
from sdetr.config.schema import ProfileMeasurement

SOURCE_KEYS = ("preset", "config")
"""Grid / include / exclude keys that choose the base config instead of setting a key."""
TOP_LEVEL = ("name", "description", "base", "grid", "include", "exclude", "stages",
             "resources", "limits", "tracking", "output_dir")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class SweepStages:
    """Extra stages of every run: ``eval_rho`` (final re-evaluation at other keeping ratios;
    applied to token-selecting encoders only) and ``profile`` (``profile.what``; None keeps
    the run config's)."""

    eval_rho: list[float] = field(default_factory=list)
    profile: Optional[list[ProfileMeasurement]] = None


@dataclass
class SweepResources:
    """Per-run resources; None keeps the run config's value."""

    workers: Optional[int] = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    zero_stage: Optional[int] = None
    deepspeed_config: Optional[str] = None


@dataclass
class SweepLimits:
    """``max_concurrent`` runs at once (None: as many as the cluster's CPUs/GPUs fit);
    ``retries``: restarts of a run's failed worker group, each from its last checkpoint."""

    max_concurrent: Optional[int] = None
    retries: int = 1


@dataclass
class SweepTracking:
    """MLflow store (None: ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``) and
    experiment (None: the sweep's name)."""

    uri: Optional[str] = None
    experiment: Optional[str] = None


@dataclass
class SweepBase:
    """What every run starts from: ``source`` (a preset name or a config file path, absolute)
    plus ``values`` (dotted key -> parsed value)."""

    source: str
    values: dict[str, Any] = field(default_factory=dict)


@dataclass
class SweepSpec:
    """A validated sweep file (grid not yet expanded; see :mod:`sdetr.orchestration.grid`).

    ``grid`` maps an axis key to its non-empty list of values (insertion order = nesting
    order); ``include`` / ``exclude`` rows map keys to one value each.
    """

    path: Path
    name: str
    base: SweepBase
    description: str = ""
    grid: dict[str, list[Any]] = field(default_factory=dict)
    include: list[dict[str, Any]] = field(default_factory=list)
    exclude: list[dict[str, Any]] = field(default_factory=list)
    stages: SweepStages = field(default_factory=SweepStages)
    resources: SweepResources = field(default_factory=SweepResources)
    limits: SweepLimits = field(default_factory=SweepLimits)
    tracking: SweepTracking = field(default_factory=SweepTracking)
    output_dir: str = "runs/sweeps"
    text: str = ""

    @property
    def experiment(self) -> str:
        """The MLflow experiment of the sweep's runs."""
        return self.tracking.experiment or self.name

    @property
    def file_hash(self) -> str:
        """sha256 (16 hex digits) of the sweep file's text."""
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]


def load_sweep(path: str | Path, overrides: Mapping[str, Any] | None = None) -> SweepSpec:
    """Read and validate the sweep file ``path``; ``overrides`` (dotted key -> value, from
    ``--set``) are added to ``base.set``. Raises ConfigError naming the file and key."""
    path = Path(path)
    raw, text = _read(path)
    where = str(path)
    unknown = sorted(set(raw) - set(TOP_LEVEL))
    if unknown:
        raise ConfigError(f"{where}: {unknown[0]}: unknown key (known: {', '.join(TOP_LEVEL)})")
    if "base" not in raw:
        raise ConfigError(f"{where}: base: missing (a preset or config every run starts from)")
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ConfigError(f"{where}: name: {name!r} must be letters, digits, '_', '.' or '-'")
    spec = SweepSpec(
        path=path.resolve(), name=name, text=text,
        description=_string(raw.get("description", ""), where, "description"),
        base=_base(raw["base"], path, overrides or {}),
        grid=_grid(raw.get("grid"), where),
        include=_rows(raw.get("include"), where, "include"),
        exclude=_rows(raw.get("exclude"), where, "exclude"),
        stages=_typed(SweepStages, raw.get("stages"), where, "stages"),
        resources=_typed(SweepResources, raw.get("resources"), where, "resources"),
        limits=_typed(SweepLimits, raw.get("limits"), where, "limits"),
        tracking=_typed(SweepTracking, raw.get("tracking"), where, "tracking"),
        output_dir=_string(raw.get("output_dir", "runs/sweeps"), where, "output_dir"))
    _check_sections(spec, where)
    if spec.resources.deepspeed_config:
        spec.resources.deepspeed_config = str(_relative(path, spec.resources.deepspeed_config))
    return spec


def _read(path: Path) -> tuple[dict[str, Any], str]:
    if not path.is_file():
        raise ConfigError(f"sweep file {path}: not found")
    try:
        text = path.read_text()
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())[:160]
        raise ConfigError(f"sweep file {path}: malformed YAML ({detail})")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"sweep file {path}: cannot be read ({exc})")
    if data is None:
        raise ConfigError(f"sweep file {path}: empty (it needs at least a base)")
    if not isinstance(data, dict):
        raise ConfigError(f"sweep file {path}: top level must be a mapping, "
                          f"got {type(data).__name__}")
    return data, text


def _string(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {key}: expected a string, got {value!r}")
    return value


def _typed(cls: type, raw: Any, where: str, key: str) -> Any:
    try:
        return build_typed(cls, {} if raw is None else raw, f"{key}.")
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _relative(sweep_file: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else (sweep_file.parent / path).resolve()


def _base(raw: Any, path: Path, overrides: Mapping[str, Any]) -> SweepBase:
    where = str(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: base: expected a mapping with preset or config")
    unknown = sorted(set(raw) - {"preset", "config", "set"})
    if unknown:
        raise ConfigError(f"{where}: base.{unknown[0]}: unknown key (known: preset, config, set)")
    given = [k for k in SOURCE_KEYS if raw.get(k) is not None]
    if len(given) != 1:
        raise ConfigError(f"{where}: base: give exactly one of preset or config")
    value = _string(raw[given[0]], where, f"base.{given[0]}")
    source = value if given[0] == "preset" else str(_relative(path, value))
    values = dotted(raw.get("set") or {}, where, "base.set")
    values.update(overrides)
    return SweepBase(source=source, values=values)


def dotted(raw: Any, where: str, key: str) -> dict[str, Any]:
    """``{"train": {"epochs": 2}, "model.rho": 0.1}`` -> ``{"train.epochs": 2, "model.rho": 0.1}``."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {key}: expected a mapping of config keys")
    out: dict[str, Any] = {}
    for name, value in raw.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: {key}: key {name!r} must be a non-empty string")
        if isinstance(value, dict):
            out.update({f"{name}.{k}": v for k, v in dotted(value, where, key).items()})
        else:
            out[name] = value
    return out


def _grid(raw: Any, where: str) -> dict[str, list[Any]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: grid: expected a mapping of axis -> list of values")
    grid: dict[str, list[Any]] = {}
    for key, values in raw.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{where}: grid: axis {key!r} must be a non-empty string")
        if not isinstance(values, list):
            raise ConfigError(f"{where}: grid.{key}: expected a list of values, got {values!r}")
        if not values:
            raise ConfigError(f"{where}: grid.{key}: empty list (an axis needs >= 1 value)")
        if key in SOURCE_KEYS and not all(isinstance(v, str) for v in values):
            raise ConfigError(f"{where}: grid.{key}: values must be names/paths (strings)")
        seen = [yaml.safe_dump(v) for v in values]
        if len(set(seen)) != len(seen):
            raise ConfigError(f"{where}: grid.{key}: a value is listed twice")
        grid[key] = values
    if all(k in grid for k in SOURCE_KEYS):
        raise ConfigError(f"{where}: grid: use preset or config as an axis, not both")
    return grid


def _rows(raw: Any, where: str, key: str) -> list[dict[str, Any]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: {key}: expected a list of mappings")
    rows = []
    for i, row in enumerate(raw):
        if not isinstance(row, dict) or not row:
            raise ConfigError(f"{where}: {key}[{i}]: expected a non-empty mapping of keys")
        row = dotted(row, where, f"{key}[{i}]")
        if sum(k in row for k in SOURCE_KEYS) > 1:
            raise ConfigError(f"{where}: {key}[{i}]: give preset or config, not both")
        rows.append(row)
    return rows


def _check_sections(spec: SweepSpec, where: str) -> None:
    res, lim = spec.resources, spec.limits
    if res.workers is not None and res.workers < 1:
        raise ConfigError(f"{where}: resources.workers: must be >= 1, got {res.workers}")
    if res.cpus_per_worker < 0 or res.gpus_per_worker < 0:
        raise ConfigError(f"{where}: resources: cpus_per_worker / gpus_per_worker must be >= 0")
    if res.cpus_per_worker == 0 and res.gpus_per_worker == 0:
        raise ConfigError(f"{where}: resources: a worker needs cpus_per_worker or "
                          "gpus_per_worker > 0")
    if lim.max_concurrent is not None and lim.max_concurrent < 1:
        raise ConfigError(f"{where}: limits.max_concurrent: must be >= 1, "
                          f"got {lim.max_concurrent}")
    if lim.retries < 0:
        raise ConfigError(f"{where}: limits.retries: must be >= 0, got {lim.retries}")
    for rho in spec.stages.eval_rho:
        if not 0.0 < rho <= 1.0:
            raise ConfigError(f"{where}: stages.eval_rho: {rho} is outside (0, 1]")
    if spec.tracking.experiment == "":
        raise ConfigError(f"{where}: tracking.experiment: must not be empty")
