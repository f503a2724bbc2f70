"""``<run dir>/progress.json``: where a running run is, for whoever watches it (a sweep).

Rank 0 rewrites the file atomically at most every ``interval_s`` seconds while it trains, and
whenever the run changes phase. Fields: ``phase`` ("train", "eval", "profile", "done"),
``epoch`` (1-based epoch in progress), ``epochs``, ``step`` / ``steps`` (optimizer steps done /
per epoch in this epoch), ``seconds_per_step`` (this epoch so far), ``pid``, ``node_id`` (Ray
node, "" outside Ray), ``mlflow_run_id`` ("" until tracking starts, or untracked), ``updated``
(Unix time).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

from sdetr.utils.io import atomic_write_text

logger = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"


def ray_node_id() -> str:
    """The Ray node id of this process, or "" when it is not a Ray worker."""
    try:
        import ray
        if not ray.is_initialized():
            return ""
        return ray.get_runtime_context().get_node_id()
    except ImportError:
        return ""


def read_progress(run_dir: str | Path) -> Optional[dict[str, Any]]:
    """The run's progress record, or None (not started, or not readable right now)."""
    try:
        return json.loads((Path(run_dir) / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None


class ProgressFile:
    """Writer of ``progress.json``; a no-op when ``enabled`` is False (ranks other than 0).

    Also a :class:`sdetr.engine.steps.Progress` for one epoch (``update`` counts steps) that
    forwards to ``inner`` (the terminal bar or log lines).
    """

    def __init__(self, run_dir: str | Path, epochs: int, steps: int, *, enabled: bool,
                 interval_s: float = 2.0) -> None:
        self.path = Path(run_dir) / PROGRESS_FILE
        self.epochs, self.steps, self.enabled = epochs, steps, enabled
        self.interval_s = interval_s
        self.node_id = ray_node_id() if enabled else ""
        self.inner: Any = None
        self.mlflow_run_id = ""
        self.epoch, self.step = 0, 0
        self._start = self._last = 0.0

    def epoch_bar(self, epoch: int, inner: Any) -> "ProgressFile":
        """Start epoch ``epoch`` (1-based): returns self as the epoch's progress object."""
        self.inner, self.epoch, self.step = inner, epoch, 0
        self._start = time.perf_counter()
        self.phase("train")
        return self

    def update(self, n: int = 1) -> None:
        self.step += n
        if self.inner is not None:
            self.inner.update(n)
        if time.perf_counter() - self._last >= self.interval_s:
            self.phase("train")

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()
        self.phase("train")

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` spent on something else (a mid-epoch evaluation) out of the
        epoch's rate and ETA, here and in ``inner`` (a :class:`~sdetr.engine.steps.LogProgress`
        or a tqdm bar, whose clock starts at ``start_t``)."""
        self._start += seconds
        exclude = getattr(self.inner, "exclude", None)
        if exclude is not None:
            exclude(seconds)
        elif hasattr(self.inner, "start_t"):
            self.inner.start_t += seconds

    def phase(self, name: str) -> None:
        """Write the record now with ``phase`` = ``name``."""
        if not self.enabled:
            return
        self._last = time.perf_counter()
        per_step = (self._last - self._start) / self.step if self.step else None
        record = {"phase": name, "epoch": self.epoch, "epochs": self.epochs,
                  "step": self.step, "steps": self.steps, "seconds_per_step": per_step,
                  "pid": os.getpid(), "node_id": self.node_id,
                  "mlflow_run_id": self.mlflow_run_id, "updated": time.time()}
        try:
            atomic_write_text(self.path, json.dumps(record))
        except OSError as exc:  # progress is informative: never stop a run for it
            logger.debug("cannot write %s: %s", self.path, exc)
