"""Training checkpoints: atomic, last-K, resumable; and loading trained weights for eval.

Layout of a run directory::

    <run>/checkpoints/epoch_0003/          one complete checkpoint
        ds/...                             DeepSpeed files (module, optimizer/ZeRO partitions,
                                           client state: scheduler + TrainState)
        rng_rank<r>.pt                     python/numpy/torch RNG state of rank r
        model.pth                          plain model weights (sdetr.models.save_model_weights)
        meta.json                          TrainState as JSON; written last
    <run>/checkpoints/latest               text: the tag of the newest complete checkpoint
    <run>/checkpoints/.partial-epoch_0004  being written (ignored and removed on resume)

Atomicity: every rank writes into ``.partial-<tag>``; once all ranks are done, rank 0 writes
``meta.json`` and renames the folder to ``<tag>`` (a single ``rename``), then rewrites
``latest`` atomically and removes checkpoints beyond the last ``keep``. A killed process
therefore leaves at worst a ``.partial-*`` folder, never a broken ``<tag>``. Resuming takes the
newest complete checkpoint (``latest`` if it names one, else the newest folder with a
``meta.json``). The run directory must be on storage all ranks share.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from sdetr.config import ExperimentConfig, ModelConfig
from sdetr.engine.distributed import DistContext, barrier, rng_state, set_rng_state
from sdetr.engine.ema import WeightEma
from sdetr.models import CheckpointError, load_model_weights, save_model_weights
from sdetr.utils.io import atomic_write_text

logger = logging.getLogger(__name__)

FORMAT = "sdetr-train-checkpoint/1"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
META = "meta.json"
MODEL_FILE = "model.pth"
FINAL_MODEL = "model_final.pth"
DS_TAG = "ds"
PARTIAL_PREFIX = ".partial-"
_TAG_RE = re.compile(r"^epoch_(\d{4,})$")


@dataclass
class TrainState:
    """Where a run stands after ``epoch`` COMPLETE epochs and ``global_step`` optimizer steps.

    ``last_eval``: metrics of the latest evaluation (e.g. {"AP": ...}), ``eval_epoch`` the
    epoch it was run after (0 = none yet); ``mlflow_run_id``: the run to continue on resume;
    ``seconds``: wall seconds spent so far by stage ("train", "eval"), summed over resumes.
    """

    epoch: int = 0
    global_step: int = 0
    mlflow_run_id: Optional[str] = None
    world_size: int = 1
    zero_stage: int = 0
    last_eval: dict[str, float] = field(default_factory=dict)
    eval_epoch: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def add_seconds(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint folder and its :class:`TrainState`."""

    path: Path
    state: TrainState


def checkpoint_tag(epoch: int) -> str:
    """Folder name of the checkpoint after ``epoch`` complete epochs: ``epoch_0003``."""
    return f"epoch_{epoch:04d}"


def read_checkpoint(path: str | Path) -> CheckpointInfo:
    """Read a complete checkpoint folder; CheckpointError (naming it) if it is not one."""
    path = Path(path)
    meta_path = path / META
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {path}: no {META} (not a complete training "
                              "checkpoint)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: unknown format {meta.get('format')!r}")
    state = TrainState(**meta["state"])
    return CheckpointInfo(path, state)


def complete_checkpoints(ckpt_dir: Path) -> list[CheckpointInfo]:
    """Complete checkpoints under ``ckpt_dir``, oldest first (by epoch)."""
    if not ckpt_dir.is_dir():
        return []
    found = [read_checkpoint(p) for p in ckpt_dir.iterdir()
             if p.is_dir() and _TAG_RE.match(p.name) and (p / META).is_file()]
    return sorted(found, key=lambda info: (info.state.epoch, info.state.global_step))


def find_latest(ckpt_dir: Path) -> Optional[CheckpointInfo]:
    """The newest complete checkpoint under ``ckpt_dir`` (see the module docstring), or None."""
    found = complete_checkpoints(ckpt_dir)
    pointer = ckpt_dir / LATEST
    if pointer.is_file():
        named = ckpt_dir / pointer.read_text().strip()
        match = [info for info in found if info.path == named]
        if match and match[0] is found[-1]:
            return match[0]
        logger.warning("%s names %s, but the newest complete checkpoint is %s", pointer,
                       named.name, found[-1].path.name if found else "none")
    return found[-1] if found else None


def remove_partial(ckpt_dir: Path) -> list[Path]:
    """Delete half-written ``.partial-*`` folders left by a killed run; return them."""
    if not ckpt_dir.is_dir():
        return []
    removed = [p for p in ckpt_dir.iterdir() if p.name.startswith(PARTIAL_PREFIX)]
    for path in removed:
        logger.warning("removing the incomplete checkpoint %s (a killed run?)", path)
        shutil.rmtree(path)
    return removed


def prune(ckpt_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints; return the deleted folders."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    old = [info.path for info in complete_checkpoints(ckpt_dir)[:-keep]]
    for path in old:
        shutil.rmtree(path)
    return old


def save_checkpoint(engine: Any, ckpt_dir: Path, state: TrainState, *, scheduler: Any,
                    model_cfg: ModelConfig, ctx: DistContext, keep: int,
                    ema: Optional[WeightEma] = None) -> Path:
    """Write the checkpoint after ``state.epoch`` epochs; a collective (every rank calls it).

    With ``ema`` its average goes into the client state and is what ``model.pth`` holds (the
    weights the run evaluates). Returns the final folder. See the module docstring for the
    layout and atomicity.
    """
    tag = checkpoint_tag(state.epoch)
    partial = ckpt_dir / f"{PARTIAL_PREFIX}{tag}"
    if ctx.is_main:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
    barrier()
    client_state = {"train_state": dataclasses.asdict(state),
                    "scheduler": scheduler.state_dict()}
    if ema is not None:
        client_state["ema"] = ema.state_dict()
    engine.save_checkpoint(str(partial), tag=DS_TAG, client_state=client_state,
                           save_latest=False)
    torch.save(rng_state(), partial / f"rng_rank{ctx.rank}.pt")
    barrier()
    final = ckpt_dir / tag
    if ctx.is_main:
        save_model_weights(partial / MODEL_FILE, engine.module if ema is None else ema.module,
                           model_cfg)
        meta = {"format": FORMAT, "tag": tag, "state": dataclasses.asdict(state)}
        atomic_write_text(partial / META, json.dumps(meta, indent=2))
        if final.exists():  # re-done epoch (resume from an older checkpoint)
            shutil.rmtree(final)
        os.replace(partial, final)
        atomic_write_text(ckpt_dir / LATEST, tag + "\n")
        for path in prune(ckpt_dir, keep):
            logger.info("removed old checkpoint %s", path.name)
        logger.info("checkpoint %s written", final)
    barrier()
    return final


def load_checkpoint(engine: Any, info: CheckpointInfo, *, scheduler: Any,
                    ctx: DistContext, ema: Optional[WeightEma] = None) -> TrainState:
    """Restore model, optimizer, scheduler, the weight average (with ``ema``) and this rank's
    RNG state from ``info``.

    Raises CheckpointError when a ZeRO (stage >= 1) checkpoint was written by another number
    of workers (its optimizer partitions do not fit), and when ``ema`` is given but the
    checkpoint has no average (a run started without ``train.ema_decay``).
    """
    state = info.state
    if state.world_size != ctx.world_size and state.zero_stage > 0:
        raise CheckpointError(
            f"checkpoint {info.path} was written by {state.world_size} workers with ZeRO stage "
            f"{state.zero_stage}; resume it with {state.world_size} workers")
    load_path, client = engine.load_checkpoint(str(info.path), tag=DS_TAG,
                                               load_optimizer_states=True,
                                               load_lr_scheduler_states=False)
    if load_path is None:
        raise CheckpointError(f"checkpoint {info.path}: DeepSpeed could not load {DS_TAG}/")
    scheduler.load_state_dict(client["scheduler"])
    if ema is not None:
        if "ema" not in client:
            raise CheckpointError(f"checkpoint {info.path} holds no weight average: it was "
                                  "written without train.ema_decay")
        ema.load_state_dict(client["ema"])
    rng_file = info.path / f"rng_rank{ctx.rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        logger.warning("%s missing (other worker count): RNG of rank %d not restored",
                       rng_file, ctx.rank)
    logger.info("resumed from %s (epoch %d, step %d)", info.path, state.epoch,
                state.global_step)
    return TrainState(**client["train_state"])


def resolve_weights_file(path: str | Path) -> Path:
    """The model weights file that ``path`` stands for.

    ``path`` may be a weights file, a checkpoint folder (``.../epoch_0003``), a
    ``checkpoints`` folder (its newest complete checkpoint), or a run directory
    (``model_final.pth`` if training finished, else its newest complete checkpoint).
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: no such file or folder")
    if (path / FINAL_MODEL).is_file():
        return path / FINAL_MODEL
    if (path / META).is_file():
        return read_checkpoint(path).path / MODEL_FILE
    for ckpt_dir in (path / CHECKPOINTS, path):
        latest = find_latest(ckpt_dir)
        if latest is not None:
            return latest.path / MODEL_FILE
    raise CheckpointError(f"checkpoint {path}: neither a weights file, a training checkpoint "
                          "nor a run directory with one")


def load_model_from_run_checkpoint(path: str | Path, model: nn.Module,
                                   cfg: ModelConfig | ExperimentConfig) -> Path:
    """Load trained weights into ``model`` (built from ``cfg``); return the file used.

    ``path``: see :func:`resolve_weights_file`. The file's model config must describe the same
    architecture as ``cfg`` (CheckpointError naming the differing keys otherwise).
    """
    model_cfg = cfg.model if isinstance(cfg, ExperimentConfig) else cfg
    weights = resolve_weights_file(path)
    load_model_weights(weights, model, model_cfg)
    logger.info("loaded model weights from %s", weights)
    return weights
