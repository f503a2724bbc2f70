"""``sdetr sweep`` for real: a local Ray (and a two-node Ray on loopback), DeepSpeed workers, a
SQLite MLflow store; faults injected with SIGKILL. Micro runs: width 64, 8 images at ~128 px,
3 epochs, 2 workers (a run takes ~25 s, most of it Ray Train start-up)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import stop_with_sigterm

pytestmark = pytest.mark.slow

MICRO_SWEEP = """\
name: micro
base:
  preset: deformable_detr_tiny
  set:
    model: {{hidden_dim: 64, nheads: 4, dim_feedforward: 128, num_queries: 20, dropout: 0.0}}
    data: {{root: data/micro, synth_train: 8, synth_val: 4, train_scales: [128],
           train_max_size: 192, eval_size: 128, eval_max_size: 192, num_workers: 0}}
    train: {{epochs: 3, batch_size: 4, micro_batch_size: 2, keep_checkpoints: 1}}
    eval.batch_size: 4
    profile.image_size: [64, 80]
grid:
  preset: {presets}
resources: {{workers: {workers}}}
limits: {{max_concurrent: {concurrent}, retries: 1}}
tracking: {{uri: "sqlite:///{db}", experiment: micro}}
output_dir: runs
"""
PRESETS = ["deformable_detr_tiny", "sparse_detr_tiny"]


def make_sweep(root: Path, presets=PRESETS, workers: int = 2, concurrent: int = 1,
               extra: str = "") -> SimpleNamespace:
    root.mkdir(parents=True, exist_ok=True)
    db = root / "mlflow.db"
    path = root / "micro.yaml"
    path.write_text(MICRO_SWEEP.format(presets=json.dumps(presets), workers=workers,
                                       concurrent=concurrent, db=db) + extra)
    return SimpleNamespace(root=root, path=path, uri=f"sqlite:///{db}",
                           run_dirs=lambda: sorted((root / "runs" / "micro").glob("*_tiny-*")))


def sweep_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env.update(extra)
    return env


def sweep_cmd(sweep: SimpleNamespace, *args: str) -> list[str]:
    return [sys.executable, "-m", "sdetr", "sweep", str(sweep.path), "--no-progress", *args]


def run_sweep(sweep: SimpleNamespace, *args: str, env=None, timeout: int = 400
              ) -> subprocess.CompletedProcess:
    proc = subprocess.run(sweep_cmd(sweep, *args), cwd=sweep.root, env=env or sweep_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def runs_of(uri: str) -> tuple[object, list]:
    """(client, every run of the 'micro' experiment)."""
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("micro")
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def children(uri: str) -> dict[str, object]:
    """Child runs of the sweep's current parent by run name; asserts exactly one current
    parent and one child per name."""
    _, runs = runs_of(uri)
    parents = [r for r in runs if r.data.tags.get("sdetr.sweep.role") == "parent"
               and "sdetr.sweep.superseded_by" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    names = [r.info.run_name for r in kids]
    assert len(set(names)) == len(names), names
    return {r.info.run_name: r for r in kids}


def losses(uri: str, run_id: str) -> dict[int, float]:
    """train/loss per epoch; the last value logged at a step counts (a resumed run may log an
    epoch twice)."""
    client, _ = runs_of(uri)
    history = sorted(client.get_metric_history(run_id, "train/loss"),
                     key=lambda m: (m.step, m.timestamp))
    return {m.step: m.value for m in history}


def wait_for(predicate, timeout: float, what: str, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process ended (rc {proc.returncode}) before {what}")
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def progress_at_epoch(sweep: SimpleNamespace, epoch: int):
    """The first run's progress record once it trains ``epoch`` (a checkpoint exists)."""
    def check():
        for run_dir in sweep.run_dirs():
            try:
                rec = json.loads((run_dir / "progress.json").read_text())
            except (OSError, ValueError):
                continue
            if rec["phase"] == "train" and rec["epoch"] >= epoch:
                return rec
        return None
    return check


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The 2-run micro sweep, run to the end once by the real CLI."""
    sweep = make_sweep(tmp_path_factory.mktemp("sweep"))
    start = time.time()
    proc = run_sweep(sweep)
    return SimpleNamespace(sweep=sweep, proc=proc, seconds=time.time() - start)


def test_micro_sweep_finishes_every_run_under_one_parent(finished):
    sweep = finished.sweep
    kids = children(sweep.uri)
    assert sorted(kids) == PRESETS
    client, runs = runs_of(sweep.uri)
    assert len(runs) == 3  # the parent and its two children, nothing else
    (parent,) = [r for r in runs if r.data.tags.get("sdetr.sweep.role") == "parent"]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["sdetr.sweep.grid_size"] == "2"
    assert "sweep.yaml" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    hashes = set()
    for name, run in kids.items():
        tags, metrics = run.data.tags, run.data.metrics
        assert run.info.status == "FINISHED"
        assert tags["sdetr.sweep.axis.preset"] == name
        assert tags["sdetr.world_size"] == "2" and tags["sdetr.kernel_backend"]
        assert tags["sdetr.git_sha"] and tags["sdetr.hardware"] and tags["sdetr.node_id"]
        assert run.data.params["train.epochs"] == "3" and run.data.params["preset"] == name
        assert "eval/AP" in metrics and metrics["profile/gflops"] > 0
        assert sorted(losses(sweep.uri, run.info.run_id)) == [1, 2, 3]
        hashes.add(tags["sdetr.config_hash"])
        run_dir = Path(tags["sdetr.run_dir"])
        assert run_dir.name.endswith(tags["sdetr.config_hash"][:8])
        result = json.loads((run_dir / "result.json").read_text())
        assert result["mlflow_run_id"] == run.info.run_id
        assert set(result["seconds"]) == {"train", "eval", "profile"}
        assert (run_dir / "logs" / "rank0.log").stat().st_size > 0
    assert len(hashes) == 2
    out = finished.proc.stdout
    assert "sweep micro: 2 run(s)" in out and "overhead" in out
    # the sweep ends with its report, also stored on the parent run
    table = (sweep.root / "reports" / "micro" / "table1.md").read_text()
    assert "Deformable DETR" in table and "Sparse DETR" in table
    artifacts = [a.path for a in client.list_artifacts(parent.info.run_id, "report")]
    assert "report/table1.md" in artifacts and "report/index.md" in artifacts


def test_rerun_skips_finished_runs_and_creates_no_mlflow_run(finished):
    sweep = finished.sweep
    before = {r.info.run_id for r in runs_of(sweep.uri)[1]}
    proc = run_sweep(sweep, timeout=120)
    assert proc.stdout.count("skipped") == 2
    assert {r.info.run_id for r in runs_of(sweep.uri)[1]} == before
    assert "Ray local cluster started" not in proc.stderr  # nothing to train


def test_driver_killed_mid_sweep_then_same_command_completes_the_rest(finished, tmp_path):
    sweep = make_sweep(tmp_path / "kill_driver")
    proc = subprocess.Popen(sweep_cmd(sweep), cwd=sweep.root, env=sweep_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        record = wait_for(progress_at_epoch(sweep, 2), 240, "the first run's epoch 2", proc)
        proc.send_signal(signal.SIGKILL)
        # and its rank 0 worker: an orphan that outlives the dead cluster for a few seconds
        # could otherwise finish the micro run, leaving nothing to resume
        with contextlib.suppress(ProcessLookupError):
            os.kill(record["pid"], signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    statuses = {n: r.info.status for n, r in children(sweep.uri).items()}
    assert statuses[PRESETS[0]] == "RUNNING"  # what a SIGKILLed driver leaves behind
    time.sleep(5)  # let the dead cluster's workers notice
    run_sweep(sweep)
    kids = children(sweep.uri)
    assert sorted(kids) == PRESETS
    assert all(r.info.status == "FINISHED" for r in kids.values())
    first = kids[PRESETS[0]]
    assert int(first.data.tags["sdetr.resumed_at_epoch"]) >= 1
    reference = children(finished.sweep.uri)
    for name in PRESETS:  # resumed from its checkpoint: the uninterrupted run's losses
        assert losses(sweep.uri, kids[name].info.run_id) == pytest.approx(
            losses(finished.sweep.uri, reference[name].info.run_id), rel=1e-6)


def test_worker_killed_mid_run_is_retried_from_its_checkpoint(finished, tmp_path):
    sweep = make_sweep(tmp_path / "kill_worker", presets=PRESETS[:1])
    proc = subprocess.Popen(sweep_cmd(sweep), cwd=sweep.root, env=sweep_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        record = wait_for(progress_at_epoch(sweep, 2), 240, "epoch 2", proc)
        os.kill(record["pid"], signal.SIGKILL)  # rank 0's training worker
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    run = children(sweep.uri)[PRESETS[0]]
    assert run.info.status == "FINISHED"
    assert run.data.tags["sdetr.resumed_at_epoch"] == "1"
    reference = children(finished.sweep.uri)[PRESETS[0]]
    assert losses(sweep.uri, run.info.run_id) == pytest.approx(
        losses(finished.sweep.uri, reference.info.run_id), rel=1e-6)


def test_a_failing_run_fails_alone_and_the_sweep_says_so(tmp_path):
    diverging = "include:\n  - {preset: deformable_detr_tiny, train.lr: 1.0e+30}\n"
    sweep = make_sweep(tmp_path / "failing", presets=PRESETS[:1], extra=diverging)
    proc = subprocess.run(sweep_cmd(sweep), cwd=sweep.root, env=sweep_env(),
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 1, proc.stderr[-3000:]
    kids = children(sweep.uri)
    ok, bad = kids[PRESETS[0]], kids[f"{PRESETS[0]}-lr1e+30"]
    assert ok.info.status == "FINISHED" and bad.info.status == "FAILED"
    assert "non-finite" in bad.data.tags["sdetr.error"]  # the engine ended it FAILED itself
    _, runs = runs_of(sweep.uri)
    (parent,) = [r for r in runs if r.data.tags.get("sdetr.sweep.role") == "parent"]
    assert parent.info.status == "FAILED"
    assert "failed" in proc.stdout and "non-finite" in proc.stdout


def test_sigterm_closes_every_mlflow_run_and_stops_ray(tmp_path):
    sweep = make_sweep(tmp_path / "sigterm")
    proc = subprocess.Popen(sweep_cmd(sweep), cwd=sweep.root, env=sweep_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(progress_at_epoch(sweep, 1), 240, "the first run's training", proc)
    finally:
        out = stop_with_sigterm(proc)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "Run the same command again to resume" in out
    kids = children(sweep.uri)
    statuses = {n: r.info.status for n, r in kids.items()}
    assert statuses == {PRESETS[0]: "KILLED", PRESETS[1]: "SCHEDULED"}, \
        {n: r.data.tags.get("sdetr.error") for n, r in kids.items()}
    _, runs = runs_of(sweep.uri)
    assert {r.info.status for r in runs if r.data.tags.get("sdetr.sweep.role")} == {"KILLED"}
    assert "Traceback" not in out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def two_node_cluster(tmp_path):
    """A Ray head and a second node on one machine (loopback 127.0.0.2), one CPU each."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    env = sweep_env(RAY_AUTH_MODE="disabled")
    ip, port = "127.0.0.2", free_port()
    address = f"{ip}:{port}"
    common = ["--num-cpus=1", f"--node-ip-address={ip}", "--disable-usage-stats"]
    try:
        subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--include-dashboard=false",
                        *common], env=env, check=True, capture_output=True, timeout=120)
        subprocess.run([ray_bin, "start", f"--address={address}", *common], env=env,
                       check=True, capture_output=True, timeout=120)
        yield SimpleNamespace(address=address, env=env)
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_two_node_cluster_runs_land_on_both_nodes(two_node_cluster, tmp_path):
    import ray
    sweep = make_sweep(tmp_path / "two_node", workers=1, concurrent=2)
    run_sweep(sweep, "--address", two_node_cluster.address, env=two_node_cluster.env)
    kids = children(sweep.uri)
    assert all(r.info.status == "FINISHED" for r in kids.values())
    nodes = {r.data.tags["sdetr.node_id"] for r in kids.values()}
    assert len(nodes) == 2, nodes
    assert all(r.data.tags["sdetr.world_size"] == "1" for r in kids.values())
    assert not ray.is_initialized()


def test_force_trains_everything_again_under_a_new_parent(finished):
    """Last in this file: it adds a parent run to the shared sweep's store."""
    sweep = finished.sweep
    old = children(sweep.uri)
    _, runs = runs_of(sweep.uri)
    (old_parent,) = [r for r in runs if r.data.tags.get("sdetr.sweep.role") == "parent"]
    run_sweep(sweep, "--force")
    new = children(sweep.uri)
    assert sorted(new) == sorted(old)
    assert not {r.info.run_id for r in new.values()} & {r.info.run_id for r in old.values()}
    assert all(r.info.status == "FINISHED" for r in new.values())
    client, _ = runs_of(sweep.uri)
    superseded = client.get_run(old_parent.info.run_id).data.tags["sdetr.sweep.superseded_by"]
    assert superseded == new[PRESETS[0]].data.tags["mlflow.parentRunId"]
    for name in PRESETS:  # trained from scratch again: the same (deterministic) losses
        assert losses(sweep.uri, new[name].info.run_id) == pytest.approx(
            losses(sweep.uri, old[name].info.run_id), rel=1e-6)
