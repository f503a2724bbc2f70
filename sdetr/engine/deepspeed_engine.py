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
"""

from __future__ import annotations

import logging
import os
from types import ModuleType
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from sdetr.config import TrainConfig

logger = logging.getLogger(__name__)

SHM_COMM_OP = "deepspeed_shm_comm"
_NEVER_PRINT = 10**9


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
    """The DeepSpeed config dict of ``train`` for ``world_size`` data-parallel workers."""
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


def autocast_dtype(train: TrainConfig) -> torch.dtype | None:
    """The dtype the forward runs in under ``torch.autocast``, or None for no autocast.

    Only ``bf16-mixed`` autocasts; ``bf16`` holds the model itself in bf16 (DeepSpeed's mode).
    """
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


def initialize_engine(model: nn.Module, optimizer: Optimizer, config: dict[str, Any], *,
                      use_gpu: bool) -> Any:
    """``deepspeed.initialize`` on ``model`` with our ``optimizer``; returns the engine.

    The torch.distributed process group must already exist (Ray Train or
    :func:`~sdetr.engine.distributed.init_single_process_group`); DeepSpeed reuses it.
    """
    deepspeed = import_deepspeed(use_gpu)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    logger.info("DeepSpeed engine: ZeRO stage %d, bf16 weights %s, %d micro-batches per step, "
                "clip %.3g", config["zero_optimization"]["stage"], config["bf16"]["enabled"],
                config["gradient_accumulation_steps"], config["gradient_clipping"])
    return engine
