"""Live progress of a sweep: runs done / running / failed / pending, each running run's epoch
and step (from its ``progress.json``), and the ETA.

:class:`SweepStatus` holds the state; :class:`SweepProgress` is the Ray Tune callback that
updates it from trial events and refreshes the display (a tqdm bar per running run plus one
for the sweep on a terminal; a log line every ``log_every_s`` otherwise).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ray.tune import Callback

from sdetr.engine.progress_file import read_progress

logger = logging.getLogger(__name__)


@dataclass
class RunState:
    """One run of the sweep as the driver sees it."""

    name: str
    run_dir: Path
    epochs: int
    state: str = "pending"  # pending | running | done | failed | skipped
    started: float = 0.0
    seconds: float = 0.0
    error: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)

    def progress(self) -> Optional[dict[str, Any]]:
        """The run's progress record written since it started here (None before)."""
        rec = read_progress(self.run_dir) if self.state == "running" else None
        return rec if rec and rec.get("updated", 0) >= self.started else None

    def fraction(self) -> float:
        """Share of the run's training done (0 before its first progress record)."""
        if self.state in ("done", "skipped"):
            return 1.0
        rec = self.progress()
        if not rec or not rec.get("steps"):
            return 0.0
        done = (rec["epoch"] - 1 + rec["step"] / rec["steps"]) / max(rec["epochs"], 1)
        return min(max(done, 0.0), 1.0)

    def describe(self) -> str:
        rec = self.progress()
        if not rec:
            return f"{self.name}: starting"
        phase = rec.get("phase", "train")
        where = f"epoch {rec['epoch']}/{rec['epochs']} step {rec['step']}/{rec['steps']}"
        rate = rec.get("seconds_per_step")
        return f"{self.name}: {phase} {where}" + (f" ({rate:.2f} s/step)" if rate else "")


class SweepStatus:
    """Counts and ETA over all runs; ``concurrency`` runs progress at once."""

    def __init__(self, runs: list[RunState], concurrency: int) -> None:
        self.runs = {r.name: r for r in runs}
        self.concurrency = max(concurrency, 1)
        self.start = time.time()

    def count(self, state: str) -> int:
        return sum(r.state == state for r in self.runs.values())

    def eta_s(self) -> Optional[float]:
        """Remaining seconds: mean time per finished run (or the running runs' pace) times
        the work left, spread over the concurrent slots."""
        done = [r.seconds for r in self.runs.values() if r.state == "done" and r.seconds]
        left = sum(1.0 - r.fraction() for r in self.runs.values()
                   if r.state in ("pending", "running"))
        if done:
            per_run = sum(done) / len(done)
        else:
            running = [(time.time() - r.started, r.fraction()) for r in self.runs.values()
                       if r.state == "running" and r.fraction() > 0.05]
            if not running:
                return None
            per_run = sum(t / f for t, f in running) / len(running)
        return per_run * left / self.concurrency

    def summary_line(self) -> str:
        active = self.count("running") + self.count("pending")
        eta = self.eta_s() if active else None
        return (f"{self.count('done') + self.count('skipped')}/{len(self.runs)} done, "
                f"{self.count('running')} running, {self.count('failed')} failed, "
                f"{self.count('pending')} pending"
                + (f", ETA {_clock(eta)}" if eta is not None else ""))


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class SweepProgress(Callback):
    """Tune callback: trial events -> :class:`SweepStatus`, refreshed display."""

    def __init__(self, status: SweepStatus, *, enabled: bool = True, refresh_s: float = 1.0,
                 log_every_s: float = 60.0) -> None:
        self.status, self.enabled = status, enabled
        self.refresh_s, self.log_every_s = refresh_s, log_every_s
        self.tty = enabled and sys.stderr.isatty()
        self._bars: dict[str, Any] = {}
        self._overall: Any = None
        self._last_refresh = self._last_log = 0.0

    # ------------------------------------------------------------------ trial events
    def _run(self, trial: Any) -> RunState:
        return self.status.runs[trial.config["run"]["name"]]

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run = self._run(trial)
        run.state, run.started = "running", time.time()
        logger.info("run %s started (%s)", run.name, self.status.summary_line())

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        self._run(trial).metrics = dict(result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run = self._run(trial)
        run.state, run.seconds = "done", time.time() - run.started
        self._close_bar(run.name)
        logger.info("run %s finished in %.0f s (%s)", run.name, run.seconds,
                    self.status.summary_line())

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run = self._run(trial)
        run.state, run.seconds = "failed", time.time() - run.started
        self._close_bar(run.name)
        logger.warning("run %s failed (%s)", run.name, self.status.summary_line())

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.time()
        if not self.enabled or now - self._last_refresh < self.refresh_s:
            return
        self._last_refresh = now
        if self.tty:
            self._draw()
        elif now - self._last_log >= self.log_every_s:
            self._last_log = now
            running = [r.describe() for r in self.status.runs.values() if r.state == "running"]
            logger.info("sweep: %s%s", self.status.summary_line(),
                        "".join(f"; {line}" for line in running))

    # ------------------------------------------------------------------ terminal bars
    def _draw(self) -> None:
        from tqdm import tqdm
        if self._overall is None:
            self._overall = tqdm(total=len(self.status.runs), unit="run", position=0,
                                 dynamic_ncols=True, leave=True,
                                 bar_format="{desc} |{bar}| {n_fmt}/{total_fmt} runs")
        finished = self.status.count("done") + self.status.count("skipped")
        self._overall.n = finished
        self._overall.set_description_str(f"sweep: {self.status.summary_line()}",
                                          refresh=False)
        self._overall.refresh()
        for run in self.status.runs.values():
            if run.state != "running":
                continue
            bar = self._bars.get(run.name)
            if bar is None:
                bar = tqdm(total=1000, position=len(self._bars) + 1, dynamic_ncols=True,
                           leave=False, bar_format="  {desc} |{bar}| {percentage:3.0f}%")
                self._bars[run.name] = bar
            bar.n = int(1000 * run.fraction())
            bar.set_description_str(run.describe(), refresh=False)
            bar.refresh()

    def _close_bar(self, name: str) -> None:
        bar = self._bars.pop(name, None)
        if bar is not None:
            bar.close()

    def close(self) -> None:
        """Remove the bars (before the summary table is printed)."""
        for name in list(self._bars):
            self._close_bar(name)
        if self._overall is not None:
            self._overall.n = self.status.count("done") + self.status.count("skipped")
            self._overall.set_description_str(f"sweep: {self.status.summary_line()}")
            self._overall.close()
            self._overall = None
