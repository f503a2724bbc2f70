"""``sdetr bench train``: time real training steps of a config, broken down by phase.

The steps are the training command's own: the same :class:`~sdetr.engine.train.Trainer` set-up
(model, DeepSpeed engine, loader), the same :func:`~sdetr.engine.steps.run_epoch`, on the same
Ray Train workers (or in this process), with the per-phase stopwatch of
:mod:`sdetr.engine.step_timing`. Nothing is tracked or checkpointed; the run directory is a
temporary folder removed at the end. The first ``warmup`` steps are run but not counted.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from sdetr.config import ConfigError, ExperimentConfig, to_dict
from sdetr.engine.data import ensure_dataset, set_loader_epoch
from sdetr.engine.deepspeed_engine import autocast_dtype
from sdetr.engine.distributed import all_gather_object
from sdetr.engine.launch import launch_workers, prepare_launch, worker_resources
from sdetr.engine.step_timing import StepTimer
from sdetr.engine.steps import progress_bar, run_epoch
from sdetr.engine.train import Trainer, WorkerArgs, enter_worker
from sdetr.utils.io import atomic_write_text

logger = logging.getLogger(__name__)

BENCH_FILE = "bench_train.json"
BENCH_KEYS = ("bench_steps", "bench_warmup", "bench_epoch")


def bench_worker(config: dict[str, Any]) -> None:
    """What every worker runs: set up like a training run, time ``bench_warmup +
    bench_steps`` steps of epoch ``bench_epoch`` (1-based: its sample order and, with
    ``data.early_epochs``, its scales), gather every rank's timer summary; rank 0 writes them
    to ``<run_dir>/bench_train.json``."""
    steps, warmup, epoch = (int(config[k]) for k in BENCH_KEYS)
    args, cfg, ctx = enter_worker({k: v for k, v in config.items() if k not in BENCH_KEYS})
    trainer = Trainer(cfg, args, ctx)
    available = trainer.steps_per_epoch
    if warmup + steps > available:
        raise ConfigError(f"--steps {steps} + --warmup {warmup} exceed the {available} steps "
                          f"of one epoch of {cfg.name}")
    set_loader_epoch(trainer.train_loader, epoch - 1)
    timer = StepTimer(warmup=warmup)
    bar = progress_bar(warmup + steps, "bench train", enabled=args.progress and ctx.is_main,
                       under_ray=args.under_ray)
    run_epoch(trainer.engine, trainer.criterion, trainer.train_loader, steps=warmup + steps,
              accumulation=trainer.accumulation, device=ctx.device, epoch=epoch, first_step=0,
              bar=bar, autocast=autocast_dtype(cfg.train), timer=timer)
    ranks = all_gather_object({"summary": timer.summary(), "threads": torch.get_num_threads()})
    if ctx.is_main:
        result = {"name": cfg.name, "workers": ctx.world_size,
                  "micro_batch_size": cfg.train.micro_batch_size,
                  "accumulation": trainer.accumulation, "batch_size": cfg.train.batch_size,
                  "precision": cfg.train.precision, "zero_stage": cfg.train.zero_stage,
                  "kernel_backend": trainer.kernel_backend, "device": ctx.device.type,
                  "malloc_retain": trainer.malloc_state,
                  "steps": steps, "warmup": warmup, "epoch": epoch,
                  "train_scales": cfg.data.scales_of_epoch(epoch), "ranks": ranks}
        atomic_write_text(Path(args.run_dir) / BENCH_FILE, json.dumps(result, indent=2))


def run_train_bench(cfg: ExperimentConfig, *, steps: int, warmup: int, epoch: int = 1,
                    workers: Optional[int] = None, use_ray: bool = True,
                    cpus_per_worker: Optional[float] = None,
                    progress: bool = True) -> dict[str, Any]:
    """Time ``steps`` training steps of ``cfg`` after ``warmup`` uncounted ones; the result
    of :func:`bench_worker` (one timer summary per rank, seconds).

    ``workers``: Ray Train workers (default ``train.workers``; 1 without Ray);
    ``cpus_per_worker``: Ray CPUs of each worker, which sets its torch thread count (default
    ``train.cpus`` split over the workers, else Ray Train's 1).
    """
    if steps < 1 or warmup < 0:
        raise ConfigError(f"--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
    if not 1 <= epoch <= cfg.train.epochs:
        raise ConfigError(f"--epoch must be in 1..train.epochs={cfg.train.epochs}, got {epoch}")
    cfg, world, use_gpu = prepare_launch(cfg, workers, use_ray)
    ensure_dataset(cfg.data, splits=("train",))
    run_dir = Path(tempfile.mkdtemp(prefix="sdetr-bench-train-"))
    try:
        args = WorkerArgs(config=to_dict(cfg), run_dir=str(run_dir), resume="never",
                          track=False, use_gpu=use_gpu, under_ray=use_ray, progress=progress,
                          cwd=str(Path.cwd()))
        extra = {"bench_steps": steps, "bench_warmup": warmup, "bench_epoch": epoch}
        logger.info("bench train %s: %d worker(s)%s, %d + %d steps of epoch %d", cfg.name,
                    world, " on Ray" if use_ray else " in this process", warmup, steps, epoch)
        resources = ({"CPU": cpus_per_worker} if cpus_per_worker
                     else worker_resources(cfg.train.cpus, world))
        launch_workers(args, world, resources, worker=bench_worker, extra=extra)
        return json.loads((run_dir / BENCH_FILE).read_text())
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


__all__ = ["BENCH_FILE", "bench_worker", "run_train_bench"]
