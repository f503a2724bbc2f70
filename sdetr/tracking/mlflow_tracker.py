"""Experiment tracking: a no-op :class:`Tracker` and the MLflow-backed :class:`MlflowTracker`.

Only rank 0 of a run tracks (``make_tracker`` hands the no-op tracker to other ranks). Metrics
are buffered and sent with ``MlflowClient.log_batch`` (many small calls against SQLite are
slow). Everything goes through one ``MlflowClient``: no global "active run" state of the fluent
API, so several trackers (a sweep's parent and its children) can live in one process.

mlflow is imported lazily, when a tracker starts: importing this module costs nothing.

Tracking URI: the ``tracking_uri`` argument, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///<cwd>/mlflow.db``. With the SQLite store, artifacts go to ``<cwd>/mlruns/`` (the
experiment's artifact location is fixed when the experiment is created).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Iterator, Mapping, Optional, Sequence, TypeVar

logger = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "sdetr"
FINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
PARENT_TAG = "mlflow.parentRunId"
STOP_TAG = "sdetr.stop_requested"  # set by whoever launched the run (an interrupted sweep)
MAX_PARAMS_PER_BATCH = 100      # MLflow's limit per log_batch call
MAX_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_VALUE_LENGTH = 6000
DEFAULT_FLUSH_EVERY = 50

T = TypeVar("T")


class TrackingError(ValueError):
    """The tracking store cannot be used as asked (bad URI, unknown run id). One line."""


def resolve_tracking_uri(tracking_uri: Optional[str] = None) -> str:
    """``tracking_uri`` > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///<absolute cwd>/mlflow.db``."""
    if tracking_uri:
        return tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def sqlite_path(tracking_uri: str) -> Optional[Path]:
    """The database file of a ``sqlite:///`` URI (None for any other store)."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    return Path(tracking_uri[len(prefix):])


@contextlib.contextmanager
def store_lock(tracking_uri: str) -> Iterator[None]:
    """Hold an exclusive lock on ``<database>.lock`` beside a SQLite store (no-op for other
    stores): MLflow creates and migrates a new SQLite database's schema on first use, and two
    processes doing that at once (two ``sdetr train`` started together on a fresh store) break
    each other's migration."""
    path = sqlite_path(tracking_uri)
    if path is None:
        yield
        return
    if not path.parent.is_dir():
        raise TrackingError(f"MLflow store {tracking_uri}: folder {path.parent} does not exist")
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def open_client(tracking_uri: str) -> Any:
    """An ``MlflowClient`` of ``tracking_uri`` whose store exists: the first request, which
    creates a new SQLite database's tables, runs under :func:`store_lock`. Raises
    ``MlflowException`` when the store does not answer."""
    from mlflow import MlflowClient
    with store_lock(tracking_uri):
        client = MlflowClient(tracking_uri=tracking_uri)
        client.search_experiments(max_results=1)
    return client


def _chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


class Tracker:
    """Tracker that records nothing (non-zero ranks, ``--no-track``). Same API as
    :class:`MlflowTracker`; usable as a context manager (``finish`` on exit: FINISHED, or
    FAILED on an exception, KILLED as :meth:`ending_status` says)."""

    run_id: Optional[str] = None

    def start(self) -> str:
        """Start (or resume) the run; return its id ("" for the no-op tracker)."""
        return ""

    def log_params(self, flat: Mapping[str, Any]) -> list[str]:
        """Log string params; return the keys that were skipped because the run already has
        a different value for them."""
        return []

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record scalar metrics at ``step`` (buffered)."""

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values converted with ``str``)."""

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        """Upload a local file (or folder) into the run's artifacts."""

    def log_text(self, text: str, artifact_file: str) -> None:
        """Store ``text`` as the artifact ``artifact_file`` (e.g. "config.yaml")."""

    def flush(self) -> None:
        """Send the buffered metrics now."""

    def finish(self, status: str = "FINISHED") -> None:
        """Flush and end the run with ``status`` (FINISHED, FAILED or KILLED)."""

    def stop_requested(self) -> str:
        """Why the run was asked to stop (its tag ``sdetr.stop_requested``), else ""."""
        return ""

    def ending_status(self, exc: BaseException) -> str:
        """Status of a run ended by ``exc``: KILLED for Ctrl-C, SystemExit, or any error
        raised once a stop was requested (a worker whose peers are being shut down), else
        FAILED."""
        if isinstance(exc, (KeyboardInterrupt, SystemExit)) or self.stop_requested():
            return "KILLED"
        return "FAILED"

    def __enter__(self) -> "Tracker":
        self.start()
        return self

    def __exit__(self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        else:
            self.finish(self.ending_status(exc if exc is not None else exc_type()))


class MlflowTracker(Tracker):
    """One MLflow run.

    Args:
        tracking_uri: store URI (None: see the module docstring).
        experiment: experiment name; created when missing.
        run_name: display name of a new run.
        run_id: resume this run instead of creating one (its params are read first so that
            identical params are not logged again; MLflow refuses to change a param).
        parent_run_id: nest the new run under this one (tag ``mlflow.parentRunId``), as a
            sweep does with its trials.
        flush_every: send buffered metrics once this many are waiting.
    """

    def __init__(self, tracking_uri: Optional[str], experiment: str, run_name: str, *,
                 run_id: Optional[str] = None, parent_run_id: Optional[str] = None,
                 flush_every: int = DEFAULT_FLUSH_EVERY) -> None:
        if not experiment:
            raise ValueError("experiment name must not be empty")
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.experiment = experiment
        self.run_name = run_name
        self.run_id = run_id
        self.parent_run_id = parent_run_id
        self.flush_every = flush_every
        self._client: Any = None
        self._params: dict[str, str] = {}
        self._buffer: list[Any] = []
        self._finished = False

    # ------------------------------------------------------------------------ lifecycle
    def start(self) -> str:
        if self._client is not None:
            raise RuntimeError(f"tracker already started (run {self.run_id})")
        from mlflow.exceptions import MlflowException
        try:
            client = open_client(self.tracking_uri)
            run = self._resume(client) if self.run_id else self._create(client)
        except MlflowException as exc:
            message = " ".join(str(exc).split())[:300]
            raise TrackingError(f"MLflow store {self.tracking_uri}: {message}") from exc
        self._client = client
        self.run_id = run.info.run_id
        self._params = dict(run.data.params)
        logger.info("MLflow run %s (%s) in experiment %r at %s", self.run_id, self.run_name,
                    self.experiment, self.tracking_uri)
        return self.run_id

    def _experiment_id(self, client: Any) -> str:
        from mlflow.exceptions import MlflowException
        found = client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        try:
            return client.create_experiment(self.experiment)
        except MlflowException as exc:  # another process created it in between
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return client.get_experiment_by_name(self.experiment).experiment_id

    def _create(self, client: Any) -> Any:
        tags: dict[str, str] = {}
        if self.parent_run_id:
            client.get_run(self.parent_run_id)  # unknown parent: MlflowException, one line
            tags[PARENT_TAG] = self.parent_run_id
        return client.create_run(self._experiment_id(client), run_name=self.run_name, tags=tags)

    def _resume(self, client: Any) -> Any:
        run = client.get_run(self.run_id)
        if run.info.status != "RUNNING":
            client.update_run(self.run_id, status="RUNNING")
        logger.info("resuming MLflow run %s (was %s)", self.run_id, run.info.status)
        return run

    @property
    def client(self) -> Any:
        """The ``MlflowClient`` of the started run."""
        if self._client is None:
            raise RuntimeError("MlflowTracker: call start() first")
        return self._client

    def finish(self, status: str = "FINISHED") -> None:
        if status not in FINAL_STATUSES:
            raise ValueError(f"status must be one of {', '.join(FINAL_STATUSES)}, got {status!r}")
        if self._client is None or self._finished:
            return
        try:
            self.flush()
        finally:
            self._client.set_terminated(self.run_id, status)
            self._finished = True
        logger.info("MLflow run %s ended: %s", self.run_id, status)

    def stop_requested(self) -> str:
        if self._client is None or not self.run_id:
            return ""
        from mlflow.exceptions import MlflowException
        try:
            return self._client.get_run(self.run_id).data.tags.get(STOP_TAG, "")
        except MlflowException as exc:  # the run still ends, FAILED; say why it was not read
            logger.warning("MLflow run %s: tag %s not read: %s", self.run_id, STOP_TAG,
                           " ".join(str(exc).split())[:300])
            return ""

    # ------------------------------------------------------------------------ logging
    def log_params(self, flat: Mapping[str, Any]) -> list[str]:
        from mlflow.entities import Param
        new: dict[str, str] = {}
        changed: list[str] = []
        for key, raw in flat.items():
            value = str(raw)
            if len(value) > MAX_PARAM_VALUE_LENGTH:
                logger.warning("param %s: value of %d characters cut to %d (MLflow limit)",
                               key, len(value), MAX_PARAM_VALUE_LENGTH)
                value = value[:MAX_PARAM_VALUE_LENGTH]
            old = self._params.get(key)
            if old is None:
                new[key] = value
            elif old != value:
                changed.append(key)
        if changed:
            logger.warning("run %s already has other values for %d params (MLflow cannot change "
                           "them; kept the old ones): %s", self.run_id, len(changed),
                           ", ".join(changed[:10]))
        params = [Param(key, value) for key, value in new.items()]
        for chunk in _chunks(params, MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=list(chunk))
        self._params.update(new)
        return changed

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric
        if self._client is None:  # fail here, not later at the flush
            raise RuntimeError("MlflowTracker: call start() first")
        timestamp = int(time.time() * 1000)
        self._buffer += [Metric(key, float(value), timestamp, int(step))
                         for key, value in metrics.items()]
        if len(self._buffer) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        while self._buffer:
            chunk = self._buffer[:MAX_METRICS_PER_BATCH]
            self.client.log_batch(self.run_id, metrics=chunk)
            del self._buffer[:len(chunk)]

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag
        run_tags = [RunTag(key, str(value)) for key, value in tags.items()]
        for chunk in _chunks(run_tags, MAX_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=list(chunk))

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"artifact not found: {path}")
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)


def make_tracker(rank: int, tracking_uri: Optional[str] = None,
                 experiment: str = DEFAULT_EXPERIMENT, run_name: str = "run", *,
                 run_id: Optional[str] = None, parent_run_id: Optional[str] = None,
                 enabled: bool = True, flush_every: int = DEFAULT_FLUSH_EVERY) -> Tracker:
    """An :class:`MlflowTracker` on rank 0 when ``enabled``, else the no-op :class:`Tracker`.
    The tracker is not started: call ``start()`` (or use it as a context manager)."""
    if rank != 0 or not enabled:
        return Tracker()
    return MlflowTracker(tracking_uri, experiment, run_name, run_id=run_id,
                         parent_run_id=parent_run_id, flush_every=flush_every)
