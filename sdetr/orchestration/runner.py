"""Run a sweep on Ray: every unfinished grid point as a Ray Tune function trial.

:func:`run_sweep` (what ``sdetr sweep FILE`` calls) checks every run before anything starts,
connects to a cluster (``address``, else ``$RAY_ADDRESS``) or starts a local one (stopped on
exit, Ctrl-C and SIGTERM included), resumes or creates the sweep's MLflow parent run and a
child run per grid point, skips the finished runs (their ``result.json``), runs the others
with at most ``max_concurrent`` at once, and closes every MLflow run it opened: after an
interruption no run is left RUNNING, and the next invocation resumes the rest.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from sdetr.engine.launch import read_result
from sdetr.orchestration.checks import check_runs
from sdetr.orchestration.grid import RunPlan
from sdetr.orchestration.progress import RunState, SweepProgress, SweepStatus
from sdetr.orchestration.spec import SweepSpec
from sdetr.orchestration.sweep_tracking import SweepTracker
from sdetr.orchestration.trial import TRIAL_RESOURCES, run_trial, trial_config

logger = logging.getLogger(__name__)


@dataclass
class SweepResult:
    """Outcome of :func:`run_sweep`: one :class:`RunState` per grid point, the parent run,
    the wall time and the sum of the runs' own seconds (training + eval + profile)."""

    runs: list[RunState]
    parent_run_id: str
    tracking_uri: str
    seconds: float
    run_seconds: float = 0.0
    failed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def finished_result(plan: RunPlan) -> Optional[dict[str, Any]]:
    """The run's result.json when it finished all its epochs, else None."""
    result = read_result(plan.run_dir)
    if result and result.get("status") == "FINISHED" and result["epochs"] >= plan.cfg.train.epochs:
        return result
    return None


def run_sweep(spec: SweepSpec, plans: list[RunPlan], *, address: Optional[str] = None,
              force: bool = False, max_concurrent: Optional[int] = None,
              progress: bool = True) -> SweepResult:
    """Train, evaluate and profile every run of ``plans`` (see the module docstring)."""
    check_runs(plans)
    start = time.time()
    tracker = SweepTracker(spec)
    parent_id = tracker.start_parent(len(plans), force=force)
    children = tracker.children()
    todo, runs, done_ids = _split(plans, children, force)
    tracker.reconcile(done_ids, {})  # a RUNNING child from a killed driver: KILLED for now
    run_ids = {plan.name: tracker.child_for(plan, children) for plan in todo}
    ending, failed = "FINISHED", {}
    try:
        if todo:
            with ray_cluster(address):
                concurrency = max_concurrent or spec.limits.max_concurrent or fitting_runs(spec, todo)
                try:
                    failed = _tune(spec, todo, runs, run_ids, tracker, force=force,
                                   concurrency=concurrency, progress=progress)
                except (KeyboardInterrupt, SystemExit):  # before Ray stops the workers
                    tracker.request_stop(run_ids.values(), "its sweep was interrupted")
                    raise
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, SIGTERM
        ending = "KILLED"
        raise
    except BaseException:
        ending = "FAILED"
        raise
    finally:
        done_ids += [run_ids[plan.name] for plan in todo if finished_result(plan)]
        tracker.reconcile(done_ids, {run_ids[n]: e for n, e in failed.items()})
        tracker.finish_parent("FAILED" if failed and ending == "FINISHED" else ending)
    for run in runs:
        if run.state == "running":  # Tune ended without an event for it
            run.state = "done" if run.name not in failed else "failed"
    return SweepResult(runs=runs, parent_run_id=parent_id, tracking_uri=tracker.tracking_uri,
                       seconds=time.time() - start,
                       run_seconds=sum(_own_seconds(p) for p in todo),
                       failed=sorted(failed))


def _split(plans: list[RunPlan], children: dict, force: bool
           ) -> tuple[list[RunPlan], list[RunState], list[str]]:
    """(plans to run, a RunState per plan, MLflow ids of the finished ones)."""
    todo, runs, done_ids = [], [], []
    for plan in plans:
        state = RunState(plan.name, plan.run_dir, plan.cfg.train.epochs)
        result = None if force else finished_result(plan)
        if result is None:
            todo.append(plan)
        else:
            state.state, state.metrics = "skipped", dict(result.get("metrics", {}))
            child = children.get(plan.config_hash)
            if child is not None:
                done_ids.append(child.run_id)
        runs.append(state)
    return todo, runs, done_ids


def _own_seconds(plan: RunPlan) -> float:
    """Training + evaluation + profiling seconds of a finished run (its result.json)."""
    result = read_result(plan.run_dir) or {}
    return float(sum(result.get("seconds", {}).values()))


def _tune(spec: SweepSpec, todo: list[RunPlan], runs: list[RunState], run_ids: dict[str, str],
          tracker: SweepTracker, *, force: bool, concurrency: int, progress: bool
          ) -> dict[str, str]:
    """Run ``todo`` as Tune trials; return {run name: error line} of the failed ones."""
    from ray import tune

    res = spec.resources
    space = [trial_config(p, mlflow_run_id=run_ids[p.name], tracking_uri=tracker.tracking_uri,
                          experiment=spec.experiment, force=force, retries=spec.limits.retries,
                          cpus_per_worker=res.cpus_per_worker,
                          gpus_per_worker=res.gpus_per_worker) for p in todo]
    status = SweepStatus(runs, concurrency)
    callback = SweepProgress(status, enabled=progress)
    tuner = tune.Tuner(
        tune.with_resources(run_trial, TRIAL_RESOURCES),
        param_space={"run": tune.grid_search(space)},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, reuse_actors=True),
        run_config=tune.RunConfig(
            name=f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(Path(spec.output_dir).resolve() / spec.name / "tune"),
            failure_config=tune.FailureConfig(max_failures=0), verbose=0,
            callbacks=[callback]))
    logger.info("sweep %s: %d run(s) to train, %d at a time", spec.name, len(todo), concurrency)
    try:
        with _console_logs_above_bars(callback.tty):
            grid = tuner.fit()
    finally:
        callback.close()
    failed: dict[str, str] = {}
    for result in grid:
        if result.error is not None:
            name = result.config["run"]["name"]
            failed[name] = _error_line(result.error)
            status.runs[name].state, status.runs[name].error = "failed", failed[name]
    return failed


def _console_logs_above_bars(bars: bool) -> Any:
    """While terminal bars are drawn, log lines are printed above them (tqdm.write)."""
    if not bars:
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm
    return logging_redirect_tqdm()


def _error_line(error: BaseException) -> str:
    cause = getattr(error, "cause", None) or error
    text = " ".join(str(cause).split()) or type(cause).__name__
    return text.splitlines()[0][:300] if text else type(cause).__name__


def fitting_runs(spec: SweepSpec, plans: list[RunPlan]) -> int:
    """How many runs the cluster's CPUs (and GPUs) hold at once (>= 1)."""
    import ray
    total = ray.cluster_resources()
    res, workers = spec.resources, max(p.workers for p in plans)
    fits = [math.inf]
    if res.cpus_per_worker > 0:
        fits.append(total.get("CPU", 0) // (workers * res.cpus_per_worker))
    if res.gpus_per_worker > 0:
        fits.append(total.get("GPU", 0) // (workers * res.gpus_per_worker))
    return int(max(1, min(fits)))


class ray_cluster:
    """Context manager: connect to ``address`` / ``$RAY_ADDRESS``, or start a local Ray that
    is shut down on exit (also after Ctrl-C or SIGTERM, which :mod:`sdetr.cli` turns into
    SystemExit). Worker output goes to the runs' ``logs/`` folders, not to this terminal."""

    def __init__(self, address: Optional[str]) -> None:
        self.address = address or os.environ.get("RAY_ADDRESS") or None

    def __enter__(self) -> "ray_cluster":
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's verbose=0 is then quiet
        os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # Ctrl-C reaches us
        import ray

        from sdetr.utils import ray_hooks
        start = time.perf_counter()
        on_sigterm = signal.getsignal(signal.SIGTERM)
        ray.init(address=self.address or "local", include_dashboard=False,
                 configure_logging=False, log_to_driver=False,
                 runtime_env={"worker_process_setup_hook": ray_hooks.HOOK})
        # Ray's core worker installs a crash handler for SIGTERM that aborts the process; keep
        # ours (sdetr sweep exits through its `finally` blocks: MLflow runs closed, Ray shut down)
        signal.signal(signal.SIGTERM, on_sigterm)
        logger.info("Ray %s in %.1f s: %s", f"cluster at {self.address}" if self.address
                    else "local cluster started", time.perf_counter() - start,
                    ", ".join(f"{k} {v:g}" for k, v in sorted(ray.cluster_resources().items())
                              if k in ("CPU", "GPU")))
        return self

    def __exit__(self, *exc: Any) -> None:
        import ray
        ray.shutdown()
