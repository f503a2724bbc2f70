"""The training loop of ONE run, as a Ray Train ``train_loop_per_worker`` or in a plain process.

:func:`train_worker` is what every worker runs. It expects a torch.distributed process group
(Ray Train makes one; :func:`sdetr.engine.launch.run_training` makes a one-rank gloo group in
plain mode). Per epoch: train through DeepSpeed (gradient accumulation keeps the total batch),
step the LR schedule, evaluate on rank 0 when due, log to MLflow from rank 0, write a
checkpoint. After the last epoch rank 0 runs the profiling stage (``cfg.profile``,
:mod:`sdetr.engine.profile_stage`), then writes ``model_final.pth`` and ``result.json``.

MLflow metric names: ``train/<loss key>`` (weighted total ``train/loss`` and every term,
averaged over the epoch and the workers), ``lr/<group>``, ``time/epoch_s``,
``time/step_s``, the step's breakdown ``time/<phase>_s`` (seconds per step, mean over the
workers; phases in :mod:`sdetr.engine.step_timing`), ``eval/<AP key>`` and ``eval/seconds`` (also ``eval_rho<r>/...`` for a final
rho sweep; see ``sdetr.engine.evaluate.metrics_for_logging``), ``profile/<figure>`` (the
profiling stage; see ``sdetr.profiling.profile_metrics``); step = complete epochs.
With ``train.eval_every_steps``: ``eval_steps/<AP key>``, ``eval_steps/seconds`` and
``eval_steps/train_min`` (training minutes before that evaluation, evaluations excluded) at
step = optimizer steps done, for the evaluations inside epochs.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from sdetr.config import ConfigError, ExperimentConfig, config_from_dict, flatten
from sdetr.engine import checkpoints as ckpt
from sdetr.engine.data import aspect_ratios, build_dataset, build_loader, set_loader_epoch
from sdetr.engine.deepspeed_engine import autocast_dtype, deepspeed_config, initialize_engine
from sdetr.engine.distributed import (DistContext, all_gather_object, current_context,
                                      log_to_file, one_line, rng_state, run_on_main,
                                      seed_everything, set_rng_state)
from sdetr.engine.ema import WeightEma
from sdetr.engine.evaluate import evaluate, evaluate_rho_sweep, metrics_for_logging
from sdetr.engine.host_memory import configure_host_malloc
from sdetr.engine.optim import build_lr_schedule, build_optimizer, group_lrs
from sdetr.engine.profile_stage import run_profile_stage
from sdetr.engine.progress_file import ProgressFile, ray_node_id
from sdetr.engine.step_timing import StepTimer, step_breakdown
from sdetr.engine.steps import progress_bar, run_epoch
from sdetr.models import BuiltModel, build, fold_batch_norm, save_model_weights
from sdetr.tracking import DEFAULT_EXPERIMENT, Tracker, make_tracker, run_tags
from sdetr.utils.io import atomic_write_text

logger = logging.getLogger(__name__)

RESULT_FILE = "result.json"
CONFIG_FILE = "config.yaml"


@dataclass
class WorkerArgs:
    """What :func:`train_worker` receives (as a plain dict, so Ray can ship it).

    config: ``sdetr.config.to_dict`` of the resolved config; run_dir: absolute run directory;
    resume: "auto" (newest complete checkpoint of run_dir, if any), "never" (ignore them), or
    a checkpoint folder (see ``Trainer._resume``); use_gpu: train on ``cuda:<LOCAL_RANK>``;
    mlflow_run_id: the MLflow run to track into when the checkpoint names none (a sweep creates
    its child runs first); under_ray: progress as log lines (Ray forwards worker output line
    by line); cwd: the
    launcher's working directory, restored in Ray workers (Ray Train starts them in its own
    storage folder; MLflow's SQLite store puts artifacts under the working directory).
    """

    config: dict[str, Any]
    run_dir: str
    resume: str = "auto"
    tracking_uri: Optional[str] = None
    experiment: str = DEFAULT_EXPERIMENT
    parent_run_id: Optional[str] = None
    mlflow_run_id: Optional[str] = None
    track: bool = True
    use_gpu: bool = False
    under_ray: bool = False
    progress: bool = True
    cwd: Optional[str] = None
    precision_requested: Optional[str] = None


def enter_worker(config: dict[str, Any]) -> tuple[WorkerArgs, ExperimentConfig, DistContext]:
    """A worker's start: its :class:`WorkerArgs` (from the dict Ray shipped), the launcher's
    working directory restored, the config rebuilt, and its rank/device context."""
    args = WorkerArgs(**config)
    if args.cwd is not None and Path.cwd() != Path(args.cwd):
        logger.info("working directory %s -> %s", Path.cwd(), args.cwd)
        os.chdir(args.cwd)
    return args, config_from_dict(args.config), current_context(args.use_gpu)


def train_worker(config: dict[str, Any]) -> Optional[dict[str, Any]]:
    """Train one run on this worker (every rank calls it); rank 0 returns the result dict."""
    args, cfg, ctx = enter_worker(config)
    with log_to_file(Path(args.run_dir) / "logs" / f"rank{ctx.rank}.log"):
        logger.info("rank %d/%d on %s: %d torch threads (OMP_NUM_THREADS=%s)", ctx.rank,
                    ctx.world_size, ctx.device, torch.get_num_threads(),
                    os.environ.get("OMP_NUM_THREADS", "unset"))
        return Trainer(cfg, args, ctx).run()


class Trainer:
    """State of one worker's run: model/engine, loaders, schedule, tracker, progress."""

    def __init__(self, cfg: ExperimentConfig, args: WorkerArgs, ctx: DistContext) -> None:
        self.cfg, self.args, self.ctx = cfg, args, ctx
        self.run_dir = Path(args.run_dir)
        self.ckpt_dir = self.run_dir / ckpt.CHECKPOINTS
        train = cfg.train
        self.malloc_state = configure_host_malloc(train.malloc_retain)
        seed_everything(train.seed)  # identical initial weights on every rank
        built = build(cfg.model, num_select=cfg.eval.num_select)
        self.kernel_backend = built.kernel_backend
        self.criterion = built.criterion.to(ctx.device)
        self.postprocess = built.postprocess
        model = built.model.to(ctx.device)
        optimizer = build_optimizer(model, train)
        self.optimizer = optimizer
        self.ds_config = deepspeed_config(train, ctx.world_size)
        self.accumulation = self.ds_config["gradient_accumulation_steps"]
        self.engine = initialize_engine(model, optimizer, self.ds_config, use_gpu=args.use_gpu)
        self.ema = (WeightEma(self.engine.module, train.ema_decay)
                    if train.ema_decay is not None else None)
        seed_everything(train.seed + ctx.rank)
        dataset = build_dataset(cfg.data, "train")
        if dataset.num_classes > cfg.model.num_classes:
            raise ConfigError(f"model.num_classes={cfg.model.num_classes} but the training set "
                              f"has category id {dataset.num_classes - 1}")
        self.train_loader = build_loader(
            dataset, train.micro_batch_size, shuffle=True,
            seed=train.seed, num_workers=cfg.data.num_workers, rank=ctx.rank,
            world_size=ctx.world_size, drop_last=True,
            aspect_ratios=aspect_ratios(dataset) if cfg.data.group_by_aspect else None)
        self.steps_per_epoch = len(self.train_loader) // self.accumulation
        if self.steps_per_epoch < 1:
            raise ValueError(f"the training set is too small for one step of train.batch_size="
                             f"{train.batch_size} ({len(self.train_loader.dataset)} images)")
        self.scheduler, self.schedule_per_step = build_lr_schedule(optimizer, train,
                                                                   self.steps_per_epoch)
        self.state = ckpt.TrainState(world_size=ctx.world_size, zero_stage=train.zero_stage)
        self.tracker: Tracker = Tracker()
        self.progress = ProgressFile(self.run_dir, train.epochs, self.steps_per_epoch,
                                     enabled=ctx.is_main)
        self._val: Any = None
        self._epoch_start = 0.0
        self._paused = 0.0  # seconds of mid-epoch evaluation in the current epoch

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> Optional[dict[str, Any]]:
        self._resume()
        node_ids = all_gather_object(ray_node_id())
        run_on_main(self.ctx, lambda: self._start_tracking(node_ids))
        try:
            while self.state.epoch < self.cfg.train.epochs:
                self._train_epoch()
            if self.state.eval_epoch != self.state.epoch:
                self._evaluate_and_log()
            self.progress.phase("profile")
            start = time.perf_counter()
            profile = run_on_main(self.ctx, self._profile)
            self.state.add_seconds("profile", time.perf_counter() - start)
            return run_on_main(self.ctx, lambda: self._write_final(profile))
        except BaseException as exc:
            self._fail(exc)
            raise

    def _resume(self) -> None:
        """Newest complete checkpoint of the run dir; with ``resume=PATH`` that checkpoint
        unless the run dir holds a newer one (a Ray restart of a run started from PATH)."""
        if self.args.resume == "never":
            return
        info = ckpt.find_latest(self.ckpt_dir)
        if self.args.resume != "auto":
            given = ckpt.read_checkpoint(self.args.resume)
            if info is None or info.state.epoch <= given.state.epoch:
                info = given
        if info is None:
            return
        self.state = ckpt.load_checkpoint(self.engine, info, scheduler=self.scheduler,
                                          ctx=self.ctx, ema=self.ema)
        self.state.world_size = self.ctx.world_size
        if info.path.parent.resolve() != self.ckpt_dir.resolve():
            self.state.mlflow_run_id = None  # another run's checkpoint: a new MLflow run

    def _start_tracking(self, node_ids: list[str]) -> None:
        resumed = self.state.mlflow_run_id or self.args.mlflow_run_id
        self.tracker = make_tracker(
            self.ctx.rank, self.args.tracking_uri, self.args.experiment, self.cfg.name,
            run_id=resumed, parent_run_id=None if resumed else self.args.parent_run_id,
            enabled=self.args.track)
        self.state.mlflow_run_id = self.tracker.start() or None
        self.progress.mlflow_run_id = self.state.mlflow_run_id or ""
        self.tracker.log_params(flatten(self.cfg))
        tags = run_tags(self.cfg, kernel_backend=self.kernel_backend,
                        world_size=self.ctx.world_size, device=self.ctx.device.type)
        tags.update({"sdetr.run_dir": str(self.run_dir),
                     "sdetr.eval.fold_bn": str(self.cfg.eval.fold_bn).lower(),
                     "sdetr.accumulation_steps": str(self.accumulation),
                     "sdetr.torch_threads": str(torch.get_num_threads()),
                     "sdetr.malloc_retain": self.malloc_state})
        if any(node_ids):
            tags.update({"sdetr.node_id": node_ids[0],
                         "sdetr.node_ids": ",".join(sorted(set(node_ids)))})
        if self.state.epoch > 0:
            tags["sdetr.resumed_at_epoch"] = str(self.state.epoch)
        if self.args.precision_requested not in (None, self.cfg.train.precision):
            tags["sdetr.precision_requested"] = str(self.args.precision_requested)
        self.tracker.set_tags(tags)
        config_file = self.run_dir / CONFIG_FILE
        if self.state.epoch == 0 and config_file.is_file():
            self.tracker.log_artifact(config_file)

    def _fail(self, exc: BaseException) -> None:
        if not self.ctx.is_main:
            return
        status = self.tracker.ending_status(exc)
        if self.tracker.run_id:
            self.tracker.set_tags({"sdetr.error": one_line(exc)[:5000]})
        self.tracker.finish(status)

    # ------------------------------------------------------------------ one epoch
    def _train_epoch(self) -> None:
        epoch = self.state.epoch  # 0-based index of the epoch about to run
        set_loader_epoch(self.train_loader, epoch)
        seed = (self.cfg.train.seed * 1_000_003 + epoch) * 131 + self.ctx.rank
        self.train_loader.generator.manual_seed(seed)  # augmentation = f(seed, rank, epoch)
        lrs = group_lrs(self.optimizer)
        bar = self.progress.epoch_bar(epoch + 1, progress_bar(
            self.steps_per_epoch, f"epoch {epoch + 1}/{self.cfg.train.epochs}",
            enabled=self.args.progress and self.ctx.is_main, under_ray=self.args.under_ray))
        start = self._epoch_start = time.perf_counter()
        self._paused = 0.0
        timer = StepTimer()
        losses = run_epoch(self.engine, self.criterion, self.train_loader,
                           steps=self.steps_per_epoch, accumulation=self.accumulation,
                           device=self.ctx.device, epoch=epoch + 1,
                           first_step=self.state.global_step, bar=bar,
                           autocast=autocast_dtype(self.cfg.train), timer=timer,
                           after_step=self._after_step)
        seconds = time.perf_counter() - start - self._paused
        self.state.add_seconds("train", seconds)
        if not self.schedule_per_step:
            self.scheduler.step()
        self.state.epoch = epoch + 1
        self.state.global_step += self.steps_per_epoch
        metrics = {f"train/{k}": v for k, v in losses.items()}
        metrics.update(lrs)
        metrics.update({"time/epoch_s": seconds, "time/step_s": seconds / self.steps_per_epoch})
        metrics.update(step_breakdown(timer, self.ctx.device))
        logger.info("epoch %d/%d: loss %.4f, %.1f s (%.2f s/step)", epoch + 1,
                    self.cfg.train.epochs, losses["loss"], seconds,
                    seconds / self.steps_per_epoch)
        run_on_main(self.ctx, lambda: self._log(metrics))
        every = self.cfg.train.eval_every
        if self.state.epoch % every == 0 or self.state.epoch == self.cfg.train.epochs:
            self._evaluate_and_log()
        ckpt.save_checkpoint(self.engine, self.ckpt_dir, self.state, scheduler=self.scheduler,
                             model_cfg=self.cfg.model, ctx=self.ctx,
                             keep=self.cfg.train.keep_checkpoints, ema=self.ema)

    def _log(self, metrics: dict[str, float]) -> None:
        self.tracker.log_metrics(metrics, self.state.epoch)
        self.tracker.flush()

    # ------------------------------------------------------------------ evaluation
    def _evaluate_and_log(self) -> None:
        """Evaluate on rank 0 (one process over the whole val split), log, remember."""
        start = time.perf_counter()
        metrics = run_on_main(self.ctx, self._evaluate)
        self.state.add_seconds("eval", time.perf_counter() - start)
        self.state.eval_epoch = self.state.epoch
        if self.ctx.is_main and metrics is not None:
            self.state.last_eval = metrics

    def _after_step(self, step_in_epoch: int) -> None:
        """After each optimizer step: a per-step LR schedule, a mid-epoch evaluation (only
        with ``train.eval_every_steps``)."""
        if self.schedule_per_step:
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.engine.module, self.state.global_step + step_in_epoch)
        if self.cfg.train.eval_every_steps:
            self._mid_epoch_eval(step_in_epoch)

    def _mid_epoch_eval(self, step_in_epoch: int) -> None:
        """After step ``step_in_epoch`` (1-based) of the running epoch: evaluate when the
        optimizer steps done are a multiple of ``train.eval_every_steps`` and the epoch is not
        over (its end has its own evaluation). The time it takes is left out of the epoch's,
        and the RNG states are restored after it, so training goes on as without it."""
        done = self.state.global_step + step_in_epoch
        if done % self.cfg.train.eval_every_steps or step_in_epoch == self.steps_per_epoch:
            return
        start = time.perf_counter()
        train_s = (self.state.seconds.get("train", 0.0)
                   + start - self._epoch_start - self._paused)
        state = rng_state()
        run_on_main(self.ctx, lambda: self._evaluate_at_step(done, train_s))
        set_rng_state(state)
        seconds = time.perf_counter() - start
        self._paused += seconds
        self.state.add_seconds("eval", seconds)
        self.progress.exclude(seconds)  # the epoch's rate and ETA count steps only
        self.progress.phase("train")

    def _evaluate_at_step(self, done: int, train_s: float) -> None:
        """Evaluate mid-epoch; log ``eval_steps/*`` at step ``done`` (optimizer steps)."""
        self.progress.phase("eval")
        loader, coco_gt = self._val_loader()
        result = evaluate(self._inference_model(), self.postprocess, loader, coco_gt,
                          device=self.ctx.device, progress=self._eval_progress)
        logged = metrics_for_logging(result, "eval_steps")
        logged["eval_steps/train_min"] = train_s / 60.0
        self.tracker.log_metrics(logged, done)
        self.tracker.flush()
        logger.info("step %d (%.1f training min): AP %.4f, AP50 %.4f", done, train_s / 60.0,
                    result.metrics["AP"], result.metrics["AP50"])

    def _val_loader(self) -> tuple[Any, Any]:
        """(val loader, its pycocotools COCO), built on first use."""
        if self._val is None:
            dataset = build_dataset(self.cfg.data, "val")
            loader = build_loader(dataset, self.cfg.eval.batch_size, shuffle=False,
                                  seed=self.cfg.train.seed, num_workers=self.cfg.data.num_workers)
            self._val = (loader, dataset.coco)
        return self._val

    def _evaluate(self) -> dict[str, float]:
        self.progress.phase("eval")
        loader, coco_gt = self._val_loader()
        final = self.state.epoch == self.cfg.train.epochs
        model = self._inference_model()
        out_dir = self.run_dir / "eval"
        result = evaluate(model, self.postprocess, loader, coco_gt, device=self.ctx.device,
                          detections_path=out_dir / "detections_final.json" if final else None,
                          progress=self._eval_progress)
        record: dict[str, Any] = {"epoch": self.state.epoch, "metrics": result.metrics,
                                  "extra": result.extra, "num_images": result.num_images,
                                  "seconds": result.seconds}
        logged = metrics_for_logging(result, "eval")
        if final and self.cfg.eval.rho_sweep:
            sweep = evaluate_rho_sweep(model, self.postprocess, loader, coco_gt,
                                       rhos=self.cfg.eval.rho_sweep, device=self.ctx.device,
                                       progress=self._eval_progress)
            record["rho_sweep"] = {str(r): res.metrics for r, res in sweep.items()}
            for rho, res in sweep.items():
                logged.update(metrics_for_logging(res, f"eval_rho{rho:g}"))
        path = out_dir / f"metrics_{ckpt.checkpoint_tag(self.state.epoch)}.json"
        atomic_write_text(path, json.dumps(record, indent=2))
        self.tracker.log_metrics(logged, self.state.epoch)
        self.tracker.log_artifact(path, "eval")
        self.tracker.flush()
        return dict(result.metrics)

    @property
    def _eval_progress(self) -> bool:
        """A tqdm bar for evaluation, except in Ray workers (their output is forwarded line by
        line, so carriage-return updates would pile up)."""
        return self.args.progress and not self.args.under_ray

    def _inference_model(self) -> torch.nn.Module:
        """What evaluation runs: :meth:`_eval_model`, with its BatchNorms folded into a copy
        when ``eval.fold_bn``."""
        model = self._eval_model()
        if not self.cfg.eval.fold_bn:
            return model
        owned = model is not self.engine.module and (self.ema is None
                                                     or model is not self.ema.module)
        return fold_batch_norm(model, inplace=owned)[0]

    def _eval_model(self) -> torch.nn.Module:
        """The trained module in fp32 (a float copy when DeepSpeed holds it in bf16), or its
        weight average with ``train.ema_decay``."""
        if self.ema is not None:
            return self.ema.module
        module = self.engine.module
        if next(module.parameters()).dtype == torch.float32:
            return module
        import copy
        return copy.deepcopy(module).float()

    # ------------------------------------------------------------------ end of run
    def _profile(self) -> dict[str, float]:
        """The profiling stage (``cfg.profile``) on the trained model; its MLflow metrics."""
        built = BuiltModel(model=self.engine.module, criterion=self.criterion,
                           postprocess=self.postprocess, kernel_backend=self.kernel_backend)
        return run_profile_stage(self.cfg, built, self.run_dir, self.tracker,
                                 device=self.ctx.device, step=self.state.epoch)

    def _write_final(self, profile: Optional[dict[str, float]]) -> dict[str, Any]:
        model_path = save_model_weights(self.run_dir / ckpt.FINAL_MODEL, self._eval_model(),
                                        self.cfg.model)
        result = {"status": "FINISHED", "name": self.cfg.name,
                  "mlflow_run_id": self.state.mlflow_run_id, "epochs": self.state.epoch,
                  "global_step": self.state.global_step, "metrics": self.state.last_eval,
                  "profile": profile or {}, "seconds": self.state.seconds,
                  "model": str(model_path), "world_size": self.ctx.world_size,
                  "kernel_backend": self.kernel_backend}
        atomic_write_text(self.run_dir / RESULT_FILE, json.dumps(result, indent=2))
        self.progress.phase("done")
        self.tracker.log_artifact(self.run_dir / RESULT_FILE)
        self.tracker.finish("FINISHED")
        logger.info("run %s finished: %s", self.cfg.name,
                    ", ".join(f"{k} {v:.4f}" for k, v in self.state.last_eval.items()))
        return result


__all__ = ["CONFIG_FILE", "RESULT_FILE", "Trainer", "WorkerArgs", "enter_worker",
           "train_worker"]
