"""DeepSpeed: the config dict derived from a :class:`TrainConfig`, and engine creation.

The total batch of one optimizer step is ``train.batch_size`` whatever the worker count:
``batch_size = micro_batch_size × world_size × gradient_accumulation_steps``, with the
accumulation computed for the ACTUAL world size. (Training with fewer workers at the same
per-worker batch would otherwise shrink the batch and change the optimisation.)

On CPU, DeepSpeed must be imported with ``DS_ACCELERATOR=cpu`` (a GPU machine would otherwise
pick CUDA) and uses gloo. Its CPU communication backend also JIT-compiles a shared-memory
all-reduce op (``deepspeed_shm_comm``, 45-90 s the first time) that is only used by
``inference_all_reduce`` (tensor-parallel inference), never by training; :func:`import_deepspeed`
marks that op as unavailable so training never waits for the build.

``train.deepspeed_config`` may name a DeepSpeed JSON file (``orchestration/deepspeed/*.json``)
whose settings are deep-merged over the generated config: communication tuning such as
``zero_optimization.overlap_comm``, bucket sizes or ``communication_data_type``. The values the
engine derives from the run (:data:`ENGINE_OWNED`) stay the engine's: the file may only repeat
them or say ``"auto"``. :func:`load_deepspeed_json` says why a file cannot be used, in one line
naming the file and the key; :func:`check_deepspeed_json` runs it on a loaded config so that a
sweep can refuse an impossible combination before anything starts.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from types import ModuleType
from typing import Any, Union

import torch
from torch import nn
from torch.optim import Optimizer

from sdetr.config import ExperimentConfig, TrainConfig
from sdetr.engine.json_config import (config_error, deep_merge, get_path, put_path,
                                      read_json_object)

logger = logging.getLogger(__name__)

SHM_COMM_OP = "deepspeed_shm_comm"
_NEVER_PRINT = 10**9

PathLike = Union[str, "os.PathLike[str]"]
AUTO = "auto"

ENGINE_OWNED: tuple[tuple[str, ...], ...] = (
    ("train_batch_size",), ("train_micro_batch_size_per_gpu",),
    ("gradient_accumulation_steps",), ("gradient_clipping",), ("zero_optimization", "stage"),
    ("bf16", "enabled"), ("zero_allow_untested_optimizer",))
"""Keys of a DeepSpeed config that the engine derives from the run; a JSON file may give them
only as ``"auto"`` or as the value the engine would compute."""

_REFUSED_SECTIONS = {
    "optimizer": "the engine builds its own AdamW with the param groups of train.lr, "
                 "train.lr_backbone, train.lr_linear_proj_mult and train.weight_decay",
    "scheduler": "the engine steps its own LR schedule (train.lr_drop)",
    "bfloat16": "old name of the bf16 section: rename it to bf16",
}
_REFUSED_MODES = {
    "fp16": "fp16 is not supported (the engine does no loss scaling and DeepSpeed has no fp16 "
            "on CPU): use train.precision=bf16 or bf16-mixed",
    "amp": "apex AMP is not supported: use train.precision=bf16 or bf16-mixed",
}


def accumulation_steps(batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Micro-batches per optimizer step on each worker so that the total stays ``batch_size``.

    Raises ValueError (naming the numbers) if ``batch_size`` is not a multiple of
    ``micro_batch_size × world_size``.
    """
    if min(batch_size, micro_batch_size, world_size) < 1:
        raise ValueError(f"batch sizes and world size must be >= 1, got batch_size="
                         f"{batch_size}, micro_batch_size={micro_batch_size}, "
                         f"world_size={world_size}")
    per_step = micro_batch_size * world_size
    if batch_size % per_step:
        raise ValueError(f"train.batch_size {batch_size} is not a multiple of "
                         f"train.micro_batch_size {micro_batch_size} × {world_size} workers")
    return batch_size // per_step


def deepspeed_config(train: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict of ``train`` for ``world_size`` data-parallel workers.

    With ``train.deepspeed_config`` set, the file (validated by :func:`load_deepspeed_json` for
    this world size) is deep-merged over the generated dict and its ``"auto"`` values are
    replaced by the computed ones.
    """
    config = _generated_config(train, world_size)
    if train.deepspeed_config is None:
        return config
    extra = load_deepspeed_json(train.deepspeed_config, train, world_size=world_size)
    merged = deep_merge(config, extra)
    for path in ENGINE_OWNED:
        put_path(merged, path, get_path(config, path))
    logger.info("DeepSpeed config: merged %s (top-level keys %s)", train.deepspeed_config,
                ", ".join(sorted(extra)) or "none")
    return merged


def _generated_config(train: TrainConfig, world_size: int) -> dict[str, Any]:
    """The config the engine derives from ``train`` alone."""
    bf16 = train.precision == "bf16"
    config: dict[str, Any] = {
        "train_batch_size": train.batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps(
            train.batch_size, train.micro_batch_size, world_size),
        "gradient_clipping": train.clip_max_norm,
        "zero_optimization": {"stage": train.zero_stage},
        # ZeRO wraps our torch AdamW (param groups of §1.1) instead of a DeepSpeed optimizer.
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "steps_per_print": _NEVER_PRINT,
        "wall_clock_breakdown": False,
    }
    if bf16:  # DeepSpeed casts only the parameters by default; BatchNorm needs its buffers too
        config["data_types"] = {"buffer_dtype": "bf16"}
    return config


def load_deepspeed_json(path: PathLike, train: TrainConfig,
                        world_size: int | None = None) -> dict[str, Any]:
    """Read the DeepSpeed JSON file ``path`` and check that it fits the run ``train``.

    A relative ``path`` is resolved against the current working directory. ``world_size``
    (default ``train.workers``) sets the gradient accumulation the batch keys must agree with.

    Returns:
        The file's top-level object, unchanged (``"auto"`` values included).
    Raises:
        ConfigError: one line naming the file and the key, for a missing or unreadable file,
            malformed JSON or a duplicate key, a top level that is not an object, an engine-owned
            key (:data:`ENGINE_OWNED`) that is neither ``"auto"`` nor the engine's value,
            ``"auto"`` anywhere else, an ``optimizer``/``scheduler``/``bfloat16`` section, or
            fp16/amp enabled.
    """
    name = str(path)
    raw = read_json_object(Path(path), name, "train.deepspeed_config")
    world = train.workers if world_size is None else world_size
    expected = _generated_config(train, world)
    for section, why in _REFUSED_SECTIONS.items():
        if section in raw:
            raise config_error(name, section, f"section not allowed: {why}")
    for section, why in _REFUSED_MODES.items():
        if _section(raw, section, name).get("enabled", False) is not False:
            raise config_error(name, f"{section}.enabled", f"must be false or absent: {why}")
    for key in ("zero_optimization", "bf16"):
        _section(raw, key, name)
    for path_ in ENGINE_OWNED:
        value = get_path(raw, path_)
        want = get_path(expected, path_)
        if value is not None and value != AUTO and not _same(value, want):
            raise config_error(name, ".".join(path_), f"{json.dumps(value)} disagrees with the "
                               f"run's {json.dumps(want)} ({_owner_hint(path_, train, world)}); "
                               "set it to \"auto\" or leave it out")
    _refuse_other_autos(raw, name, ())
    return raw


def check_deepspeed_json(cfg: ExperimentConfig) -> None:
    """Validate ``cfg.train.deepspeed_config`` against ``cfg`` (for ``train.workers`` workers);
    a no-op when it is unset. Raises :class:`ConfigError` like :func:`load_deepspeed_json`."""
    if cfg.train.deepspeed_config is not None:
        load_deepspeed_json(cfg.train.deepspeed_config, cfg.train)


def _section(raw: dict[str, Any], key: str, name: str) -> dict[str, Any]:
    """``raw[key]`` ({} if absent); raises ConfigError if it is not an object."""
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise config_error(name, key, f"must be a JSON object, got {json.dumps(value)}")
    return value


def _same(value: Any, want: Any) -> bool:
    """Equal values of the same kind (``true`` is not ``1``; ``1`` is ``1.0``)."""
    if isinstance(value, bool) or isinstance(want, bool):
        return value is want
    if isinstance(value, (int, float)) and isinstance(want, (int, float)):
        return value == want
    return False


def _owner_hint(path: tuple[str, ...], train: TrainConfig, world: int) -> str:
    """Where the engine's value of the owned key ``path`` comes from, for messages."""
    if path[0] in ("train_batch_size", "train_micro_batch_size_per_gpu",
                   "gradient_accumulation_steps"):
        return (f"the engine owns the batch: train.batch_size {train.batch_size} = "
                f"train.micro_batch_size {train.micro_batch_size} × {world} workers × "
                f"{train.batch_size // (train.micro_batch_size * world)} accumulation steps")
    return {"gradient_clipping": "from train.clip_max_norm",
            "zero_optimization": "from train.zero_stage",
            "bf16": f"from train.precision={train.precision!r}; DeepSpeed's bf16 mode is "
                    "precision=bf16",
            "zero_allow_untested_optimizer": "ZeRO must accept the engine's torch AdamW",
            }[path[0]]


def _refuse_other_autos(value: Any, name: str, path: tuple[str, ...]) -> None:
    """Raise ConfigError for an ``"auto"`` outside :data:`ENGINE_OWNED` (DeepSpeed cannot
    parse it and the engine does not fill it in)."""
    if isinstance(value, dict):
        for key, item in value.items():
            _refuse_other_autos(item, name, (*path, key))
    elif value == AUTO and path not in ENGINE_OWNED:
        owned = ", ".join(".".join(p) for p in ENGINE_OWNED)
        raise config_error(name, ".".join(path), f"\"auto\" is only filled in for {owned}")


def autocast_dtype(train: TrainConfig) -> torch.dtype | None:
    """The dtype the forward runs in under ``torch.autocast``, or None for no autocast.

    Only ``bf16-mixed`` autocasts; ``bf16`` holds the model itself in bf16 (DeepSpeed's mode).
    """
    if train.precision == "auto":
        raise ValueError("train.precision 'auto' must be resolved by the launcher "
                         "(sdetr.engine.precision.resolve_precision) before training")
    return torch.bfloat16 if train.precision == "bf16-mixed" else None


def import_deepspeed(use_gpu: bool) -> ModuleType:
    """Import DeepSpeed for the right accelerator and quiet its INFO logging.

    Without a GPU, ``DS_ACCELERATOR=cpu`` must be set before the first import; raises
    RuntimeError if DeepSpeed was already imported for another accelerator. On CPU the
    shared-memory comm op is marked unavailable (see the module docstring).
    """
    wanted = "cuda" if use_gpu else "cpu"
    current = os.environ.get("DS_ACCELERATOR")
    if current not in (None, wanted):
        raise RuntimeError(f"DS_ACCELERATOR={current} but this run needs {wanted!r}")
    os.environ["DS_ACCELERATOR"] = wanted
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from deepspeed.utils import logger as ds_logger

    name = get_accelerator().device_name()
    if name != wanted:
        raise RuntimeError(f"DeepSpeed was imported for accelerator {name!r}, this run "
                           f"needs {wanted!r}: set DS_ACCELERATOR before importing it")
    ds_logger.setLevel(logging.WARNING)
    if not use_gpu:
        deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False
    return deepspeed


def backbone_weights_to_channels_last(model: nn.Module, config: dict[str, Any]) -> None:
    """Lay a ``channels_last`` backbone's weights out channels_last, once the engine exists
    (its start-up broadcast views every weight as NCHW bytes). Not under ZeRO 1/2 or bf16
    weights, whose flat buffers alias the weights: those stay NCHW, with a warning."""
    backbone = getattr(model, "backbone", None)
    if not getattr(backbone, "channels_last", False):
        return
    stage, bf16 = config["zero_optimization"]["stage"], config["bf16"]["enabled"]
    if stage == 0 and not bf16:
        backbone.weights_to_channels_last()
        return
    logger.warning("model.backbone.channels_last: the backbone's weights stay NCHW under ZeRO "
                   "stage %d / bf16 weights %s (DeepSpeed's flat buffers alias them); its maps "
                   "are channels_last and its convolutions convert the weights at every call",
                   stage, bf16)


def initialize_engine(model: nn.Module, optimizer: Optimizer, config: dict[str, Any], *,
                      use_gpu: bool) -> Any:
    """``deepspeed.initialize`` on ``model`` with our ``optimizer``; returns the engine.

    The torch.distributed process group must already exist (Ray Train or
    :func:`~sdetr.engine.distributed.init_single_process_group`); DeepSpeed reuses it. With
    one rank and ZeRO 0 the gradient all-reduce is switched off (it would change nothing).
    """
    deepspeed = import_deepspeed(use_gpu)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    if torch.distributed.get_world_size() == 1 and config["zero_optimization"]["stage"] == 0:
        # A one-rank all-reduce only copies the gradients through flat buffers and back
        # (1.8-2.5% of a _tiny step, measured by `sdetr bench train`); the result is the same.
        engine.enable_backward_allreduce = False
    backbone_weights_to_channels_last(model, config)
    logger.info("DeepSpeed engine: ZeRO stage %d, bf16 weights %s, %d micro-batches per step, "
                "clip %.3g", config["zero_optimization"]["stage"], config["bf16"]["enabled"],
                config["gradient_accumulation_steps"], config["gradient_clipping"])
    return engine
