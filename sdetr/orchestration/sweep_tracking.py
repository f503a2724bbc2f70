"""The MLflow side of a sweep: one parent run per sweep, one child run per grid point.

Parent run (found again by the tags ``sdetr.sweep.role=parent`` and ``sdetr.sweep.name``):
the sweep file as the artifact ``sweep.yaml`` and the tags ``sdetr.sweep.file_hash``,
``sdetr.sweep.grid_size``, ``sdetr.sweep.file``. ``--force`` starts a new parent and tags the
old one ``sdetr.sweep.superseded_by``.

Child run (found again by ``sdetr.config_hash`` under the parent): created by the driver before
anything trains, status SCHEDULED until the engine starts tracking into it (RUNNING), then
FINISHED / FAILED / KILLED. Tags ``sdetr.sweep.name``, ``sdetr.sweep.run``, ``sdetr.run_dir``,
``sdetr.sweep.axis.<key>`` (one per axis); the engine adds its params, metrics and provenance.
An interrupted driver tags its open children ``sdetr.stop_requested`` before Ray stops their
workers, so a worker that errs as its peers die ends its run KILLED, not FAILED; the tag is
withdrawn when the sweep resumes the run.

No run stays RUNNING after a crash: :meth:`SweepTracker.reconcile` marks a child that is not
training any more FINISHED (its result.json says so), else KILLED or FAILED.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from sdetr.orchestration.grid import RunPlan
from sdetr.orchestration.spec import SweepSpec
from sdetr.tracking import MlflowTracker, TrackingError, resolve_tracking_uri
from sdetr.tracking.mlflow_tracker import PARENT_TAG, STOP_TAG, open_client

logger = logging.getLogger(__name__)

ROLE_TAG = "sdetr.sweep.role"
SWEEP_TAG = "sdetr.sweep.name"
HASH_TAG = "sdetr.config_hash"
AXIS_PREFIX = "sdetr.sweep.axis."
OPEN_STATUSES = ("RUNNING", "SCHEDULED")


@dataclass
class ChildRun:
    """A child run's id and status (as MLflow had it when read)."""

    run_id: str
    status: str
    stop_requested: bool = False


class SweepTracker:
    """Parent and child runs of one sweep in one MLflow experiment (one ``MlflowClient``)."""

    def __init__(self, spec: SweepSpec, tracking_uri: Optional[str] = None) -> None:
        self.spec = spec
        self.tracking_uri = resolve_tracking_uri(tracking_uri or spec.tracking.uri)
        self.parent = MlflowTracker(self.tracking_uri, spec.experiment, spec.name)
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = open_client(self.tracking_uri)
        return self._client

    # --------------------------------------------------------------------------- parent
    def start_parent(self, grid_size: int, *, force: bool) -> str:
        """Resume the sweep's newest parent run (or start one; always with ``force``)."""
        from mlflow.exceptions import MlflowException
        try:
            previous = self._find_parent()
            if previous is not None and not force:
                self.parent.run_id = previous
                self.parent.start()
            else:
                self.parent.start()
                if previous is not None:
                    self.client.set_tag(previous, "sdetr.sweep.superseded_by", self.parent.run_id)
                self.parent.set_tags({ROLE_TAG: "parent", SWEEP_TAG: self.spec.name})
                self.parent.log_text(self.spec.text, "sweep.yaml")
        except MlflowException as exc:
            raise TrackingError(f"MLflow store {self.tracking_uri}: "
                                f"{' '.join(str(exc).split())[:300]}") from exc
        self.parent.set_tags({"sdetr.sweep.file": str(self.spec.path),
                              "sdetr.sweep.file_hash": self.spec.file_hash,
                              "sdetr.sweep.grid_size": str(grid_size),
                              "mlflow.note.content": self.spec.description or self.spec.name})
        return self.parent.run_id or ""

    def _find_parent(self) -> Optional[str]:
        experiment = self.client.get_experiment_by_name(self.spec.experiment)
        if experiment is None:
            return None
        runs = self.client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`{ROLE_TAG}` = 'parent' and tags.`{SWEEP_TAG}` = "
                          f"'{self.spec.name}'",
            order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0].info.run_id if runs else None

    def finish_parent(self, status: str) -> None:
        self.parent.finish(status)

    # --------------------------------------------------------------------------- children
    def children(self) -> dict[str, ChildRun]:
        """The parent's child runs by config hash (the newest one of a hash)."""
        runs = self.client.search_runs(
            [self._experiment_id()], filter_string=f"tags.`{PARENT_TAG}` = '{self.parent.run_id}'",
            order_by=["attributes.start_time ASC"], max_results=10000)
        return {r.data.tags[HASH_TAG]: ChildRun(r.info.run_id, r.info.status,
                                                STOP_TAG in r.data.tags)
                for r in runs if HASH_TAG in r.data.tags}

    def _experiment_id(self) -> str:
        return self.client.get_run(self.parent.run_id).info.experiment_id

    def child_for(self, plan: RunPlan, existing: dict[str, ChildRun]) -> str:
        """The child run of ``plan``: the existing one (a stop asked of it by an interrupted
        driver withdrawn), else a new SCHEDULED run."""
        found = existing.get(plan.config_hash)
        if found is not None:
            if found.stop_requested:
                self.client.delete_tag(found.run_id, STOP_TAG)
                found.stop_requested = False
            return found.run_id
        run = self.client.create_run(self._experiment_id(), run_name=plan.name,
                                     tags=self.child_tags(plan))
        self.client.update_run(run.info.run_id, status="SCHEDULED")
        existing[plan.config_hash] = ChildRun(run.info.run_id, "SCHEDULED")
        return run.info.run_id

    def child_tags(self, plan: RunPlan) -> dict[str, str]:
        tags = {PARENT_TAG: self.parent.run_id or "", HASH_TAG: plan.config_hash,
                SWEEP_TAG: self.spec.name, "sdetr.sweep.run": plan.name,
                "sdetr.run_dir": str(plan.run_dir)}
        tags.update({f"{AXIS_PREFIX}{k}": _tag_value(v) for k, v in plan.axes.items()})
        return tags

    def set_status(self, run_id: str, status: str, reason: str = "") -> None:
        """End (or re-schedule) a child run that is not training."""
        if reason:
            self.client.set_tag(run_id, "sdetr.sweep.status_reason", reason[:5000])
        if status in OPEN_STATUSES:
            self.client.update_run(run_id, status=status)
        else:
            self.client.set_terminated(run_id, status, end_time=int(time.time() * 1000))

    def request_stop(self, run_ids: Iterable[str], reason: str) -> None:
        """Tag the open ones of ``run_ids`` ``sdetr.stop_requested``: their workers, whose
        peers are about to be shut down, then end them KILLED rather than FAILED."""
        wanted = set(run_ids)
        for child in self.children().values():
            if child.run_id in wanted and child.status in OPEN_STATUSES:
                self.client.set_tag(child.run_id, STOP_TAG, reason)

    def reconcile(self, finished_ids: Iterable[str], failed: dict[str, str]) -> None:
        """Close the open children that are not training: FINISHED if their run finished,
        FAILED (with the reason) if it failed, KILLED if still RUNNING (its driver or workers
        died). SCHEDULED children (not started yet) stay SCHEDULED."""
        done = set(finished_ids)
        for child in self.children().values():
            if child.status not in OPEN_STATUSES:
                continue
            if child.run_id in done:
                self.set_status(child.run_id, "FINISHED")
            elif child.run_id in failed:
                self.set_status(child.run_id, "FAILED", failed[child.run_id])
            elif child.status == "RUNNING":
                self.set_status(child.run_id, "KILLED", "its sweep driver or workers stopped")


def _tag_value(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)
