"""A sweep's MLflow children when the driver is interrupted (SQLite store, no Ray): the driver's
stop request makes a worker that errs as its peers die end its run KILLED; a resumed sweep
withdraws the request, so a later real error is FAILED again."""

from __future__ import annotations

import textwrap

import pytest

from sdetr.orchestration import expand, load_sweep
from sdetr.orchestration.sweep_tracking import SweepTracker
from sdetr.tracking import MlflowTracker
from sdetr.tracking.mlflow_tracker import STOP_TAG


@pytest.fixture()
def sweep(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: s
        base: {{preset: deformable_detr_tiny, set: {{data.root: data/s, train.epochs: 1}}}}
        grid: {{train.seed: [1, 2]}}
        tracking: {{uri: "sqlite:///{tmp_path / 'mlflow.db'}", experiment: s}}
        """))
    spec = load_sweep(path)
    return spec, expand(spec)


def start_sweep(spec, plans) -> tuple[SweepTracker, dict[str, str]]:
    """What the driver does before Tune starts: parent resumed or created, one child a plan."""
    tracker = SweepTracker(spec)
    tracker.start_parent(len(plans), force=False)
    children = tracker.children()
    return tracker, {p.name: tracker.child_for(p, children) for p in plans}


def worker_fails(tracker: SweepTracker, run_id: str, exc: BaseException) -> str:
    """Rank 0 of a run resumes tracking into its child run, then raises ``exc``."""
    run = MlflowTracker(tracker.tracking_uri, tracker.spec.experiment, "x", run_id=run_id)
    with pytest.raises(type(exc)):
        with run:
            raise exc
    return tracker.client.get_run(run_id).info.status


def test_an_error_after_the_driver_asked_to_stop_ends_the_run_killed(sweep):
    tracker, ids = start_sweep(*sweep)
    first, second = ids.values()
    MlflowTracker(tracker.tracking_uri, "s", "x", run_id=first).start()  # RUNNING
    tracker.request_stop(ids.values(), "its sweep was interrupted")
    tags = {i: tracker.client.get_run(i).data.tags for i in ids.values()}
    assert tags[first][STOP_TAG] == tags[second][STOP_TAG] == "its sweep was interrupted"
    peer_died = RuntimeError("Connection closed by peer [127.0.0.1]:29500")
    assert worker_fails(tracker, first, peer_died) == "KILLED"
    tracker.reconcile([], {})
    assert tracker.client.get_run(second).info.status == "SCHEDULED"  # never started


def test_a_resumed_sweep_withdraws_the_stop_request(sweep):
    tracker, ids = start_sweep(*sweep)
    tracker.request_stop(ids.values(), "its sweep was interrupted")
    again, same = start_sweep(*sweep)
    assert same == ids
    assert not any(STOP_TAG in again.client.get_run(i).data.tags for i in ids.values())
    first, second = ids.values()
    assert worker_fails(again, first, RuntimeError("loss is non-finite")) == "FAILED"
    assert worker_fails(again, second, KeyboardInterrupt()) == "KILLED"


def test_finished_and_failed_runs_are_not_asked_to_stop(sweep):
    tracker, ids = start_sweep(*sweep)
    first, second = ids.values()
    assert worker_fails(tracker, first, ValueError("bad annotation")) == "FAILED"
    tracker.request_stop(ids.values(), "its sweep was interrupted")
    assert STOP_TAG not in tracker.client.get_run(first).data.tags
    assert STOP_TAG in tracker.client.get_run(second).data.tags
