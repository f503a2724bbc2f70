"""MLflow tracking against one SQLite store: round trip, resume, nesting, batching; provenance."""

from __future__ import annotations

import subprocess
import sys

import pytest

mlflow = pytest.importorskip("mlflow")

from sdetr.config import flatten, load_config  # noqa: E402
from sdetr.tracking import (MlflowTracker, Tracker, TrackingError, git_sha,  # noqa: E402
                            make_tracker, resolve_tracking_uri, run_tags)
from sdetr.tracking import provenance  # noqa: E402

EXPERIMENT = "tests"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(tracking URI, client) of a fresh SQLite store whose artifacts stay in tmp."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    return uri, client


def _tracker(store, name: str, **kwargs) -> MlflowTracker:
    return MlflowTracker(store[0], EXPERIMENT, name, **kwargs)


def test_params_metrics_tags_artifacts_round_trip(store, tmp_path):
    _, client = store
    cfg = load_config("sparse_detr_tiny")
    params = flatten(cfg)
    params.update({f"extra.p{i}": str(i) for i in range(40)}, long="x" * 7000)
    assert len(params) > 100  # needs two log_batch calls
    tracker = _tracker(store, "round-trip")
    run_id = tracker.start()
    assert tracker.log_params(params) == []
    tracker.log_metrics({"loss": 1.5, "val/AP": 0.25}, step=0)
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.set_tags(run_tags(cfg, kernel_backend="reference", world_size=2, device="cpu"))
    (tmp_path / "metrics.json").write_text("{}")
    tracker.log_artifact(tmp_path / "metrics.json")
    tracker.log_text("name: x\n", "config.yaml")
    tracker.finish()
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    (run,) = client.search_runs([experiment_id], filter_string="tags.mlflow.runName = "
                                "'round-trip'")
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    logged = run.data.params
    assert len(logged.pop("long")) == 6000  # MLflow's limit: cut, not refused
    assert logged == {k: v for k, v in params.items() if k != "long"}
    assert run.data.metrics == {"loss": 1.0, "val/AP": 0.25}  # latest values
    assert run.data.tags["sdetr.world_size"] == "2"
    assert run.data.tags["sdetr.preset"] == "sparse_detr_tiny"
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [1.5, 1.0]
    assert {a.path for a in client.list_artifacts(run_id)} == {"metrics.json", "config.yaml"}
    assert client.download_artifacts(run_id, "config.yaml", str(tmp_path)).endswith(".yaml")


def test_resume_adds_metrics_without_param_errors(store):
    _, client = store
    first = _tracker(store, "resumable")
    run_id = first.start()
    first.log_params({"a": "1", "b": "2"})
    first.log_metrics({"loss": 3.0}, step=0)
    first.finish("KILLED")
    resumed = _tracker(store, "resumable", run_id=run_id)
    assert resumed.start() == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    assert resumed.log_params({"a": "1", "b": "3", "c": "4"}) == ["b"]
    resumed.log_metrics({"loss": 2.0}, step=1)
    resumed.finish()
    run = client.get_run(run_id)
    assert run.data.params == {"a": "1", "b": "2", "c": "4"}
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [0, 1]


def test_child_runs_nest_under_their_parent(store):
    _, client = store
    with _tracker(store, "sweep") as parent:
        children = []
        for i in range(2):
            with _tracker(store, f"trial-{i}", parent_run_id=parent.run_id) as child:
                child.log_metrics({"val/AP": 0.1 * i}, step=0)
                children.append(child.run_id)
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    found = client.search_runs([experiment_id],
                               filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'")
    assert sorted(r.info.run_id for r in found) == sorted(children)
    with pytest.raises(TrackingError, match="no-such-run"):
        _tracker(store, "orphan", parent_run_id="no-such-run").start()


def test_metrics_are_sent_in_batches(store, monkeypatch):
    tracker = _tracker(store, "batched", flush_every=50)
    tracker.start()
    calls = []
    real = tracker.client.log_batch
    monkeypatch.setattr(tracker.client, "log_batch",
                        lambda run_id, **kw: (calls.append(len(kw.get("metrics") or [])),
                                              real(run_id, **kw)))
    for step in range(24):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 1e-4}, step=step)
    assert calls == []  # 48 buffered, nothing sent yet
    tracker.log_metrics({"loss": 0.0, "lr": 0.0}, step=24)
    assert calls == [50]
    tracker.log_metrics({"loss": -1.0}, step=25)
    tracker.finish()
    assert calls == [50, 1]
    assert len(tracker.client.get_metric_history(tracker.run_id, "loss")) == 26


def test_failure_inside_the_context_marks_the_run_failed(store):
    _, client = store
    tracker = _tracker(store, "crashing")
    with pytest.raises(RuntimeError, match="boom"):
        with tracker:
            raise RuntimeError("boom")
    assert client.get_run(tracker.run_id).info.status == "FAILED"


def test_bad_inputs_fail_in_one_line(store):
    with pytest.raises(TrackingError, match="deadbeef"):
        _tracker(store, "x", run_id="deadbeef").start()
    with pytest.raises(RuntimeError, match="start"):
        _tracker(store, "x").log_metrics({"a": 1.0}, step=0)
    with pytest.raises(ValueError, match="status"):
        _tracker(store, "x").finish("DONE")


def test_non_zero_ranks_get_a_tracker_that_records_nothing(store):
    tracker = make_tracker(1, store[0], EXPERIMENT, "rank1")
    assert type(tracker) is Tracker
    with tracker:
        assert tracker.log_params({"a": "1"}) == []
        tracker.log_metrics({"a": 1.0}, step=0)
    assert tracker.run_id is None
    assert isinstance(make_tracker(0, store[0], EXPERIMENT, "rank0"), MlflowTracker)
    assert type(make_tracker(0, store[0], EXPERIMENT, "off", enabled=False)) is Tracker


def test_tracking_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_tracking_uri("sqlite:///arg.db") == "sqlite:///arg.db"
    assert resolve_tracking_uri(None) == "sqlite:///env.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


def _git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo,
                   check=True, capture_output=True)


def test_git_sha_marks_dirty_checkouts(tmp_path, monkeypatch):
    package = tmp_path / "repo" / "sdetr"
    package.mkdir(parents=True)
    monkeypatch.setattr(provenance, "PACKAGE_DIR", package)
    assert git_sha() == "unknown"  # not a checkout (tmp is outside any repository)
    _git(tmp_path / "repo", "init", "-q")
    assert git_sha() == "unknown"  # no commit yet
    (package / "a.py").write_text("x = 1\n")
    _git(tmp_path / "repo", "add", "sdetr/a.py")
    _git(tmp_path / "repo", "commit", "-q", "-m", "c")
    sha = git_sha()
    assert len(sha) == 40 and all(c in "0123456789abcdef" for c in sha)
    (package / "untracked.py").write_text("")
    assert git_sha() == sha
    (package / "a.py").write_text("x = 2\n")
    assert git_sha() == sha + "-dirty"


def test_processes_that_start_together_on_a_new_sqlite_store_all_track(tmp_path):
    """MLflow creates a new SQLite database's tables on first use; three trackers started at
    once (three `sdetr train` on a fresh mlflow.db) take turns at that, none fails."""
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    code = ("import sys; from sdetr.tracking import MlflowTracker; "
            "t = MlflowTracker(sys.argv[1], 'together', sys.argv[2]); t.start(); t.finish()")
    procs = [subprocess.Popen([sys.executable, "-c", code, uri, f"run{i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(3)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(o[-1500:] for o in outs)
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("together")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["run0", "run1", "run2"]
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_a_sqlite_store_in_a_missing_folder_fails_in_one_line(tmp_path):
    with pytest.raises(TrackingError, match="does not exist"):
        MlflowTracker(f"sqlite:///{tmp_path / 'nowhere' / 'm.db'}", EXPERIMENT, "x").start()
