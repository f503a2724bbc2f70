"""Start ONE training run: on N Ray Train workers, or in this process (world size 1).

:func:`run_training` prepares the run directory (``<train.output_dir>/<name>`` unless given),
generates a synthetic dataset once, writes the resolved ``config.yaml``, then runs
:func:`sdetr.engine.train.train_worker` under a Ray Train ``TorchTrainer`` (gloo on CPU, NCCL
on GPU) or in this process with a one-rank gloo group. A run whose ``result.json`` says it
finished all its epochs is not trained again.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from sdetr.config import ConfigError, ExperimentConfig, flatten, load_config, to_dict, to_yaml
from sdetr.engine import checkpoints as ckpt
from sdetr.engine.data import ensure_dataset
from sdetr.engine.deepspeed_engine import accumulation_steps, check_deepspeed_json
from sdetr.engine.precision import resolve_precision
from sdetr.engine.train import CONFIG_FILE, RESULT_FILE, WorkerArgs, train_worker
from sdetr.tracking import DEFAULT_EXPERIMENT, resolve_tracking_uri
from sdetr.utils.io import atomic_write_text

logger = logging.getLogger(__name__)

# Keys that may differ between a run and its resumption (they do not change the optimisation),
# and whole sections that may (the profiling stage measures, it does not train).
RESUMABLE_CHANGES = ("train.epochs", "train.workers", "train.cpus", "train.eval_every",
                     "train.eval_every_steps",
                     "train.keep_checkpoints", "train.output_dir", "data.num_workers",
                     "model.kernel_backend")
RESUMABLE_SECTIONS = ("profile.",)


@dataclass
class TrainResult:
    """Outcome of :func:`run_training`.

    status: "finished" (trained now) or "already_finished" (nothing to do); metrics: the
    final evaluation (AP, AP50, ...); model_path: ``<run_dir>/model_final.pth``.
    """

    run_dir: Path
    status: str
    mlflow_run_id: Optional[str]
    epochs: int
    metrics: dict[str, float] = field(default_factory=dict)
    model_path: Optional[Path] = None
    seconds: float = 0.0


def default_run_dir(cfg: ExperimentConfig) -> Path:
    """``<train.output_dir>/<name>``."""
    return Path(cfg.train.output_dir) / cfg.name


def read_result(run_dir: Path) -> Optional[dict[str, Any]]:
    """The ``result.json`` of a finished run, or None."""
    path = run_dir / RESULT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def run_training(cfg: ExperimentConfig, *, workers: Optional[int] = None,
                 resume: str = "auto", tracking_uri: Optional[str] = None,
                 use_ray: bool = True, run_dir: Optional[str | Path] = None,
                 experiment: str = DEFAULT_EXPERIMENT, parent_run_id: Optional[str] = None,
                 track: bool = True, max_failures: int = 0, progress: bool = True,
                 mlflow_run_id: Optional[str] = None,
                 resources_per_worker: Optional[dict[str, float]] = None) -> TrainResult:
    """Train ``cfg`` to the end (or resume it) and return the result.

    Args:
        workers: Ray Train workers (default ``train.workers``); must be 1 or None without Ray.
        resume: "auto" (continue from the newest complete checkpoint of the run directory),
            "never" (delete its checkpoints and result, start over) or a checkpoint folder
            (used unless the run directory holds a newer checkpoint).
        tracking_uri: MLflow store (default ``$MLFLOW_TRACKING_URI``, else
            ``sqlite:///<cwd>/mlflow.db``); experiment / parent_run_id: where the run goes.
        use_ray: False runs in this process (world size 1; debugging, tests).
        max_failures: Ray Train restarts of a failed worker group (each resumes from the
            newest checkpoint).
        mlflow_run_id: track into this existing MLflow run unless the checkpoint resumed
            from names one (a sweep's child run).
        resources_per_worker: Ray resources of one worker, e.g. ``{"CPU": 4, "GPU": 1}``
            (default: ``{"CPU": train.cpus / workers}`` when ``train.cpus`` is set, else Ray
            Train's, one CPU or one GPU).
    """
    start = time.perf_counter()
    requested = cfg.train.precision
    cfg, world, use_gpu = prepare_launch(cfg, workers, use_ray)
    if resume not in ("auto", "never"):
        resume = str(Path(resume).resolve())
    run_dir = Path(run_dir or default_run_dir(cfg)).resolve()
    finished = _prepare_run_dir(cfg, run_dir, resume)
    if finished is not None:
        return _result(run_dir, finished, "already_finished", time.perf_counter() - start)
    ensure_dataset(cfg.data)
    atomic_write_text(run_dir / CONFIG_FILE, to_yaml(cfg))
    # After the clean-up for "never", a Ray restart of the worker group must resume: "auto".
    args = WorkerArgs(config=to_dict(cfg), run_dir=str(run_dir),
                      resume="auto" if resume == "never" else resume,
                      tracking_uri=resolve_tracking_uri(tracking_uri), experiment=experiment,
                      parent_run_id=parent_run_id, mlflow_run_id=mlflow_run_id,
                      track=track, use_gpu=use_gpu,
                      under_ray=use_ray, progress=progress, cwd=str(Path.cwd()),
                      precision_requested=requested)
    logger.info("training %s in %s: %d worker(s)%s, %d micro-batch(es) per step", cfg.name,
                run_dir, world, " on Ray" if use_ray else " in this process",
                accumulation_steps(cfg.train.batch_size, cfg.train.micro_batch_size, world))
    try:
        launch_workers(args, world, resources_per_worker or worker_resources(cfg.train.cpus, world),
                       max_failures=max_failures)
    except KeyboardInterrupt:  # in-process, the engine ended its run KILLED itself
        if use_ray and track:
            end_interrupted_run(run_dir, args.tracking_uri)
        raise
    result = read_result(run_dir)
    if result is None:
        raise RuntimeError(f"training ended without writing {run_dir / RESULT_FILE}")
    return _result(run_dir, result, "finished", time.perf_counter() - start)


def end_interrupted_run(run_dir: Path, tracking_uri: str) -> None:
    """End KILLED the MLflow run that rank 0 was tracking into (its id in the run's
    ``progress.json``) when it is still RUNNING: Ray stopped the workers without letting them
    end it. Any MLflow error is logged, not raised (the interruption is what the user sees)."""
    from mlflow.exceptions import MlflowException

    from sdetr.engine.progress_file import read_progress
    from sdetr.tracking.mlflow_tracker import open_client

    run_id = (read_progress(run_dir) or {}).get("mlflow_run_id")
    if not run_id:
        return
    try:
        client = open_client(tracking_uri)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "sdetr.error", "interrupted (Ctrl-C or SIGTERM)")
            client.set_terminated(run_id, "KILLED")
            logger.info("MLflow run %s ended KILLED", run_id)
    except MlflowException as exc:
        logger.warning("MLflow run %s not ended: %s", run_id, " ".join(str(exc).split())[:300])


def _world_size(cfg: ExperimentConfig, workers: Optional[int], use_ray: bool) -> int:
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if not use_ray:
        if workers not in (None, 1):
            raise ConfigError(f"--workers {workers} needs Ray; without Ray a run is one process")
        return 1
    return workers or cfg.train.workers


def prepare_launch(cfg: ExperimentConfig, workers: Optional[int], use_ray: bool
                   ) -> tuple[ExperimentConfig, int, bool]:
    """What every launch checks and resolves before a worker starts: (the config with absolute
    paths and ``train.precision`` resolved, the world size, whether the workers use CUDA).
    Raises ConfigError for a worker count or DeepSpeed file that does not fit, here and not in
    a worker."""
    world = _world_size(cfg, workers, use_ray)
    accumulation_steps(cfg.train.batch_size, cfg.train.micro_batch_size, world)
    use_gpu = cfg.train.use_gpu and torch.cuda.is_available()
    if cfg.train.use_gpu and not use_gpu:
        logger.warning("train.use_gpu is true but CUDA is not available: training on CPU")
    cfg = resolve_precision(absolute_paths(cfg), use_gpu)
    check_deepspeed_json(cfg)
    return cfg, world, use_gpu


def worker_resources(cpus: Optional[float], world: int) -> Optional[dict[str, float]]:
    """``{"CPU": cpus / world}`` (``train.cpus`` split over the workers), or None (Ray Train's
    default) when ``cpus`` is None."""
    return None if cpus is None else {"CPU": cpus / world}


def launch_workers(args: WorkerArgs, world: int,
                   resources_per_worker: Optional[dict[str, float]], *, max_failures: int = 0,
                   worker: Callable[[dict[str, Any]], Any] = train_worker,
                   extra: Optional[dict[str, Any]] = None) -> None:
    """``worker`` on ``world`` Ray Train workers of ``resources_per_worker`` (None: Ray Train's
    default) when ``args.under_ray``, else in this process (world 1)."""
    if not args.under_ray:
        run_in_process(args, worker=worker, extra=extra)
        return
    run_on_ray(args, ScalingConfigArgs(world, args.use_gpu, resources_per_worker), max_failures,
               Path(args.run_dir), worker=worker, extra=extra)


def absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """A copy whose data.root, train.output_dir and train.deepspeed_config are absolute (Ray
    workers have another working directory)."""
    out = copy.deepcopy(cfg)
    out.data.root = str(Path(cfg.data.root).resolve())
    out.train.output_dir = str(Path(cfg.train.output_dir).resolve())
    if cfg.train.deepspeed_config is not None:
        out.train.deepspeed_config = str(Path(cfg.train.deepspeed_config).resolve())
    return out


def _prepare_run_dir(cfg: ExperimentConfig, run_dir: Path, resume: str
                     ) -> Optional[dict[str, Any]]:
    """Create/clean ``run_dir`` for ``resume``; return result.json if the run is done."""
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = run_dir / ckpt.CHECKPOINTS
    if resume == "never":
        for path in (ckpt_dir, run_dir / RESULT_FILE, run_dir / ckpt.FINAL_MODEL):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        return None
    ckpt.remove_partial(ckpt_dir)
    if resume != "auto":
        ckpt.read_checkpoint(resume)  # CheckpointError now, not in a worker
        return None
    result = read_result(run_dir)
    if result is not None or ckpt.find_latest(ckpt_dir) is not None:
        _check_same_config(cfg, run_dir / CONFIG_FILE)
    if result and result.get("status") == "FINISHED" and result["epochs"] >= cfg.train.epochs:
        return result
    return None


def _check_same_config(cfg: ExperimentConfig, saved: Path) -> None:
    """Refuse to resume a run with a config that changes the optimisation."""
    if not saved.is_file():
        return
    old, new = flatten(load_config(saved)), flatten(cfg)
    changed = sorted(k for k in set(old) | set(new)
                     if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES
                     and not k.startswith(RESUMABLE_SECTIONS))
    if changed:
        details = ", ".join(f"{k}: {old.get(k)} -> {new.get(k)}" for k in changed[:4])
        raise ConfigError(f"{saved.parent} holds a run of another config ({details}); "
                          "use --resume never or another --run-dir")


def _result(run_dir: Path, result: dict[str, Any], status: str, seconds: float) -> TrainResult:
    model = result.get("model")
    return TrainResult(run_dir=run_dir, status=status,
                       mlflow_run_id=result.get("mlflow_run_id"), epochs=result["epochs"],
                       metrics=dict(result.get("metrics", {})),
                       model_path=Path(model) if model else None, seconds=seconds)


def run_in_process(args: WorkerArgs, worker: Callable[[dict[str, Any]], Any] = train_worker,
                   extra: Optional[dict[str, Any]] = None) -> None:
    """``worker`` (default :func:`train_worker`) on ``args`` (+ ``extra`` keys) at world size
    1 in this process, in a one-rank gloo (NCCL on GPU) process group.

    The group is created on first use and kept for the life of the process: DeepSpeed caches
    its process groups, so a destroyed and re-created group would break a second run here.
    """
    import torch.distributed as dist

    from sdetr.engine.distributed import init_single_process_group
    backend = "nccl" if args.use_gpu else "gloo"
    if not dist.is_initialized():
        init_single_process_group(backend)
    elif dist.get_world_size() != 1 or dist.get_backend() != backend:
        raise RuntimeError(f"this process already has a {dist.get_backend()} process group of "
                           f"{dist.get_world_size()} ranks; a plain run needs one {backend} rank")
    worker({**dataclasses.asdict(args), **(extra or {})})


@dataclass
class ScalingConfigArgs:
    """The Ray Train ``ScalingConfig`` of a run."""

    workers: int
    use_gpu: bool
    resources_per_worker: Optional[dict[str, float]] = None


def run_on_ray(args: WorkerArgs, scaling: ScalingConfigArgs, max_failures: int,
               run_dir: Path, worker: Callable[[dict[str, Any]], Any] = train_worker,
               extra: Optional[dict[str, Any]] = None) -> None:
    """Run ``worker`` (default :func:`train_worker`) on ``args`` (+ ``extra`` keys) on Ray
    Train workers; re-raise a worker's error."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from sdetr.utils import ray_hooks

    started = not ray.is_initialized()
    if started:  # $RAY_ADDRESS joins an existing cluster; otherwise always a fresh local one
        on_sigterm = signal.getsignal(signal.SIGTERM)
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False,
                 configure_logging=False,
                 runtime_env={"worker_process_setup_hook": ray_hooks.HOOK})
        # Ray's core worker installs a crash handler for SIGTERM that aborts the process; keep
        # the caller's (sdetr train turns SIGTERM into KeyboardInterrupt: Ray is shut down)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_sigterm)
    try:
        trainer = TorchTrainer(
            worker, train_loop_config={**dataclasses.asdict(args), **(extra or {})},
            scaling_config=ScalingConfig(num_workers=scaling.workers, use_gpu=scaling.use_gpu,
                                         resources_per_worker=scaling.resources_per_worker),
            torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
            run_config=RunConfig(name=f"train-{int(time.time())}",
                                 storage_path=str(run_dir / "ray"),
                                 failure_config=FailureConfig(max_failures=max_failures)))
        _fit(trainer)
    finally:
        if started:
            ray.shutdown()


def _fit(trainer: Any) -> None:
    """``trainer.fit()``; a worker's exception is re-raised as itself (rank 0's first)."""
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    try:
        trainer.fit()
    except WorkerGroupError as exc:
        failures = dict(sorted(exc.worker_failures.items()))
        if not failures:
            raise
        cause = next(iter(failures.values()))
        if isinstance(cause, RayTaskError) and cause.cause is not None:
            cause = cause.cause
        raise cause from exc
