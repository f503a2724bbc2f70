"""Load, override, validate and flatten :class:`ExperimentConfig` objects.

A config file is YAML. It may name a base with ``_base_: <preset name or relative path>``;
its keys are then a declarative diff on top of that base (applied recursively). Overrides
given on the command line use dotted keys: ``--set model.rho=0.2 train.epochs=12``; their
values are parsed as YAML scalars/lists.

Every key is checked against the schema: an unknown key, a wrong type or an impossible
combination raises :class:`ConfigError` with a one-line message naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Optional, Union, get_args, get_origin

import yaml

from sdetr.config.errors import ConfigError
from sdetr.config.schema import ExperimentConfig

BASE_KEY = "_base_"
PRESET_DIR = Path(__file__).resolve().parent.parent / "zoo"


def preset_names() -> list[str]:
    """Names of the bundled presets (YAML files in ``sdetr/zoo``), sorted."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def preset_path(name: str) -> Path:
    """Path of a bundled preset (also accepts base fragments whose name starts with ``_``)."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r} (see `sdetr models` for the list)")
    return path


def load_config(source: str | Path, overrides: Iterable[str] = (),
                values: Optional[Mapping[str, Any]] = None) -> ExperimentConfig:
    """Load a preset name or YAML path, apply ``key=value`` overrides, validate.

    Args:
        source: a preset name (``deformable_detr_r50``) or a path to a YAML file.
        overrides: dotted ``key=value`` strings, applied after the file.
        values: dotted keys with already-parsed values (a sweep's grid point), applied after
            ``overrides``.
    Returns:
        The validated config. ``preset`` records the preset the file derives from.
    """
    raw, preset = _resolve_source(source)
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    for key, value in (values or {}).items():
        set_dotted(raw, key, copy.deepcopy(value))
    raw.setdefault("preset", preset)
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> ExperimentConfig:
    """Build and validate an :class:`ExperimentConfig` from a nested plain dict."""
    cfg = _build(ExperimentConfig, raw, "")
    cfg.validate()
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``model.rho=0.2`` into ``("model.rho", 0.2)`` (the value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: value {text!r} is not valid YAML ({_first_line(exc)})")
    return key, value


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set ``raw['a']['b'] = value`` for ``key = 'a.b'``, creating dicts on the way."""
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[:i + 1])}: is a value, not a section")
        node = child
    node[parts[-1]] = value


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict of a config (lists copied), suitable for YAML."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML text (loadable again with :func:`load_config`)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(cfg: ExperimentConfig) -> dict[str, str]:
    """Flatten to ``{"model.rho": "0.1", ...}`` with YAML-encoded values (for MLflow params)."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, name + ".")
            else:
                out[name] = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()
    walk(to_dict(cfg), "")
    return out


def unflatten(flat: dict[str, str]) -> ExperimentConfig:
    """Inverse of :func:`flatten`: rebuild and validate the config from flat string params."""
    raw: dict[str, Any] = {}
    for key, text in flat.items():
        set_dotted(raw, key, yaml.safe_load(text))
    return config_from_dict(raw)


# --------------------------------------------------------------------------------------------
# file resolution


def _resolve_source(source: str | Path) -> tuple[dict[str, Any], str | None]:
    """Return the merged raw dict and the preset it derives from (None if none)."""
    text = str(source)
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return _load_tree(path, seen=())
    if "/" in text:
        raise ConfigError(f"config file {text}: not found")
    raw, _ = _load_tree(preset_path(text), seen=())
    return raw, text


def _load_tree(path: Path, seen: tuple[Path, ...]) -> tuple[dict[str, Any], str | None]:
    """Load ``path`` and its ``_base_`` chain; also return the nearest preset name in it.

    ``_base_`` is one name/path or a list of them, merged left to right, then this file.
    """
    data = _read_yaml(path, seen)
    bases = data.pop(BASE_KEY, None)
    if bases is None:
        return data, None
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"config file {path}: _base_ must be a name/path or a list of them")
    merged: dict[str, Any] = {}
    preset: str | None = None
    for base in bases:
        base_raw, base_preset = _load_tree(_base_path(path, base), seen + (path.resolve(),))
        merged = _merge(merged, base_raw)
        is_preset = "/" not in base and not base.endswith((".yaml", ".yml"))
        if preset is None and not base.startswith("_"):
            preset = base if is_preset else base_preset
    return _merge(merged, data), preset


def _read_yaml(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path}: not found")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path}: _base_ cycle")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: malformed YAML ({_first_line(exc)})")
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot be read ({exc.strerror})")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    return data


def _base_path(path: Path, base: str) -> Path:
    if base.endswith((".yaml", ".yml")) or "/" in base:
        return (path.parent / base).resolve()
    return preset_path(base)


def _merge(base: dict[str, Any], diff: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in diff.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _first_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:160]


# --------------------------------------------------------------------------------------------
# typed construction


def build_typed(cls: type, raw: Any, prefix: str = "") -> Any:
    """Build the dataclass ``cls`` from a plain mapping, checking every key and type against
    its annotations (nested dataclasses, lists, Literal, Optional); ``prefix`` (e.g.
    ``"resources."``) names keys in errors. Raises :class:`ConfigError`."""
    return _build(cls, raw, prefix)


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise ConfigError(f"{prefix}{key}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {key: _coerce(hints[key], value, f"{prefix}{key}") for key, value in raw.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, key + ".")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = get_args(tp)
        return [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    return _scalar(tp, value, key)


def _scalar(tp: type, value: Any, key: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-4" as a string
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"{key}: unsupported schema type {tp!r}")
    raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
