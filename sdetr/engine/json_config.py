"""Plain-JSON helpers for config files: strict reading, dotted access, deep merge.

Used by :mod:`sdetr.engine.deepspeed_engine` for ``train.deepspeed_config``. Every error is a
one-line :class:`~sdetr.config.ConfigError` that names the file and the key.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from sdetr.config import ConfigError


class _DuplicateKey(ValueError):
    """A JSON object names the same key twice."""


def config_error(name: str, key: str, message: str) -> ConfigError:
    """The one-line ConfigError for ``key`` of the file ``name``."""
    return ConfigError(f"{name}: {key}: {message}")


def read_json_object(path: Path, name: str, key: str) -> dict[str, Any]:
    """The top-level object of the JSON file ``path``.

    ``name`` is the file as the user gave it and ``key`` the config key that points at it, both
    for messages. A relative path is resolved against the current working directory.
    Raises ConfigError for a missing or unreadable file, malformed JSON, a key given twice in
    one object, or a top level that is not an object.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise config_error(name, key, f"no such file (relative paths are resolved against the "
                                      f"working directory {Path.cwd()})") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise config_error(name, key, f"cannot read the file ({reason})") from None
    try:
        raw = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise config_error(name, key, f"malformed JSON at line {exc.lineno} column "
                                      f"{exc.colno}: {exc.msg}") from None
    except _DuplicateKey as exc:
        raise config_error(name, str(exc), "key given twice in one object") from None
    if not isinstance(raw, dict):
        raise config_error(name, key, f"the top level must be a JSON object, got "
                                      f"{type(raw).__name__}")
    return raw


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json`` object hook that refuses duplicate keys (DeepSpeed refuses them too)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def get_path(config: dict[str, Any], path: tuple[str, ...]) -> Any:
    """The value at ``path`` (keys from the top) of nested dicts, or None."""
    node: Any = config
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def put_path(config: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """Set ``path`` of nested dicts to ``value``, creating the dicts on the way."""
    for key in path[:-1]:
        config = config.setdefault(key, {})
    config[path[-1]] = value


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """A new dict: ``base`` with ``over`` merged in, objects recursively, other values replaced."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
