"""Training engine end to end on CPU: a micro model (width 64, 2+2 layers, 20 queries) on 8
synthetic images at ~128 px, through DeepSpeed, checkpoints, COCO eval and a SQLite MLflow store.

The plain-process run of the ``base_run`` fixture is shared by several tests. The Ray tests
(1 vs 2 workers, ``sdetr demo --quick``) are marked slow.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import micro_config, stop_with_sigterm
from sdetr.config import ExperimentConfig, to_yaml
from sdetr.data import synth_main
from sdetr.engine import checkpoints as ckpt
from sdetr.engine.launch import run_training
from sdetr.engine.step_timing import PHASES
from sdetr.engine.steps import NonFiniteLossError
from sdetr.models import CheckpointError, build_model

REPO = Path(__file__).resolve().parents[1]
PRESET = "deformable_detr_tiny"


def run_config(data_root: Path, out: Path, *extra: str,
               preset: str = PRESET) -> ExperimentConfig:
    return micro_config(
        preset, "model.num_classes=24", f"data.root={data_root}", "data.synth_train=8",
        "data.synth_val=4", "data.train_scales=[128]",
        "data.crop_scales=[]", "data.train_max_size=192", "data.eval_size=128",
        "data.eval_max_size=192", "data.num_workers=0", "train.epochs=2",
        "train.batch_size=4", "train.micro_batch_size=2", "train.workers=1",
        "train.keep_checkpoints=1", "eval.batch_size=4", f"train.output_dir={out}",
        # fp32 pinned: the presets' precision auto is bf16-mixed on a CPU with native bf16,
        # and the reference losses these tests compare against are fp32's
        "train.precision=fp32", "profile.image_size=[64,80]", *extra)


def mlflow_client(uri: str):
    from mlflow import MlflowClient
    return MlflowClient(tracking_uri=uri)


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in mlflow_client(uri).get_metric_history(run_id, key))


def train_in(cwd: Path, cfg: ExperimentConfig, uri: str, **kwargs):
    """run_training with cwd (where MLflow puts artifacts) set to ``cwd``."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        return run_training(cfg, use_ray=False, tracking_uri=uri, progress=False, **kwargs)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synth"
    synth_main(str(root), 8, 4, 0)
    return root


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("base")
    cfg = run_config(data_root, out / "runs", "name=base")
    uri = f"sqlite:///{out}/mlflow.db"
    result = train_in(out, cfg, uri)
    return SimpleNamespace(cfg=cfg, uri=uri, out=out, result=result,
                           run_dir=out / "runs" / "base")


# --------------------------------------------------------------------------- plain runs
def test_plain_run_trains_checkpoints_evaluates_and_tracks(base_run):
    result, run_dir = base_run.result, base_run.run_dir
    assert result.status == "finished" and result.epochs == 2
    assert result.model_path == run_dir / "model_final.pth" and result.model_path.is_file()
    assert set(result.metrics) >= {"AP", "AP50", "AR100"}
    ckpt_dir = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["epoch_0002", "latest"]  # keep 1
    info = ckpt.find_latest(ckpt_dir)
    assert info.state.epoch == 2 and info.state.global_step == 4  # 8 images / batch 4
    assert info.state.mlflow_run_id == result.mlflow_run_id
    assert (run_dir / "eval" / "detections_final.json").is_file()
    assert "batch_size: 4" in (run_dir / "config.yaml").read_text()
    profile = json.loads((run_dir / "profile.json").read_text())  # the profiling stage
    assert profile["flops"]["protocol"]["image_size"] == [64, 80]
    assert profile["flops"]["uncounted"] == {}

    client = mlflow_client(base_run.uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.batch_size"] == "4"
    assert run.data.params["model.hidden_dim"] == "64"
    assert run.data.tags["sdetr.world_size"] == "1" and run.data.tags["sdetr.device"] == "cpu"
    assert run.data.tags["sdetr.kernel_backend"] in ("reference", "compiled")
    assert run.data.tags["sdetr.preset"] == PRESET
    assert run.data.tags["sdetr.eval.fold_bn"] == "true"  # eval ran on a BN-folded copy
    losses = history(base_run.uri, result.mlflow_run_id, "train/loss")
    assert [s for s, _ in losses] == [1, 2] and all(v > 0 for _, v in losses)
    assert [s for s, _ in history(base_run.uri, result.mlflow_run_id, "eval/AP")] == [1, 2]
    breakdown = {k: v for k, v in run.data.metrics.items() if k.startswith("time/")}
    assert {f"time/{p}_s" for p in PHASES} <= set(breakdown)  # the step's breakdown
    parts = sum(breakdown[f"time/{p}_s"] for p in PHASES)
    assert breakdown["time/forward_s"] > 0 and breakdown["time/backward_s"] > 0
    assert parts == pytest.approx(breakdown["time/step_wall_s"], rel=0.1)
    assert breakdown["time/wait_s"] == 0.0  # one rank: nobody to wait for
    assert run.data.metrics["lr/default"] == pytest.approx(2e-4)
    assert run.data.metrics["lr/linear_proj"] == pytest.approx(2e-5)
    assert run.data.metrics["profile/gflops"] == pytest.approx(profile["flops"]["gflops"])
    assert run.data.metrics["profile/params_trainable"] == profile["params_trainable"]
    assert run.data.tags["sdetr.profile.flops.image_size"] == "64x80"
    assert [s for s, _ in history(base_run.uri, result.mlflow_run_id, "profile/gflops")] == [2]
    final = json.loads((run_dir / "result.json").read_text())
    assert final["profile"]["profile/gflops"] == pytest.approx(profile["flops"]["gflops"])
    artifacts = {a.path for a in client.list_artifacts(result.mlflow_run_id)}
    assert {"config.yaml", "result.json", "profile.json", "eval"} <= artifacts
    evals = {a.path for a in client.list_artifacts(result.mlflow_run_id, "eval")}
    assert "eval/metrics_epoch_0002.json" in evals


def test_finished_run_is_not_trained_again(base_run):
    again = train_in(base_run.out, base_run.cfg, base_run.uri)
    assert again.status == "already_finished"
    assert again.mlflow_run_id == base_run.result.mlflow_run_id
    assert again.metrics == base_run.result.metrics
    runs = mlflow_client(base_run.uri).search_runs(
        [mlflow_client(base_run.uri).get_experiment_by_name("sdetr").experiment_id])
    assert len(runs) == 1


def test_run_dir_of_another_config_is_refused(base_run, data_root):
    from sdetr.config import ConfigError
    changed = run_config(data_root, base_run.out / "runs", "name=base", "train.lr=0.001")
    with pytest.raises(ConfigError, match=r"another config \(train.lr: 0.0002 -> 0.001\)"):
        train_in(base_run.out, changed, base_run.uri)
    more = run_config(data_root, base_run.out / "runs", "name=base", "train.keep_checkpoints=3",
                      "train.eval_every=2", "profile.what=[params]")  # allowed: still finished
    assert train_in(base_run.out, more, base_run.uri).status == "already_finished"


def test_load_model_from_run_dir_and_checkpoint(base_run):
    model = build_model(base_run.cfg.model)
    used = ckpt.load_model_from_run_checkpoint(base_run.run_dir, model, base_run.cfg)
    assert used == base_run.run_dir / "model_final.pth"
    other = build_model(base_run.cfg.model)
    folder = base_run.run_dir / "checkpoints" / "epoch_0002"
    assert ckpt.load_model_from_run_checkpoint(folder, other, base_run.cfg.model) == \
        folder / "model.pth"
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    wider = micro_config(PRESET, "model.num_classes=24", "model.hidden_dim=96")
    with pytest.raises(CheckpointError, match="hidden_dim"):
        ckpt.load_model_from_run_checkpoint(base_run.run_dir, build_model(wider.model), wider)
    with pytest.raises(CheckpointError, match="no such file"):
        ckpt.resolve_weights_file(base_run.out / "nowhere")


def test_zero_stage2_reaches_the_same_losses_as_stage0(base_run, tmp_path, data_root):
    cfg = run_config(data_root, tmp_path / "runs", "name=zero2", "train.zero_stage=2")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = train_in(tmp_path, cfg, uri)
    ours = history(uri, result.mlflow_run_id, "train/loss")
    ref = history(base_run.uri, base_run.result.mlflow_run_id, "train/loss")
    assert [s for s, _ in ours] == [s for s, _ in ref] == [1, 2]
    assert [v for _, v in ours] == pytest.approx([v for _, v in ref], rel=1e-4)


def test_eval_every_steps_adds_a_finer_curve_and_leaves_training_alone(base_run, tmp_path,
                                                                      data_root):
    cfg = run_config(data_root, tmp_path / "runs", "name=steps", "train.eval_every_steps=1")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = train_in(tmp_path, cfg, uri)
    run_id = result.mlflow_run_id
    # 2 steps per epoch: steps 2 and 4 end an epoch (eval/*), 1 and 3 are evaluated inside.
    assert [s for s, _ in history(uri, run_id, "eval_steps/AP50")] == [1, 3]
    assert [s for s, _ in history(uri, run_id, "eval/AP50")] == [1, 2]
    minutes = [v for _, v in history(uri, run_id, "eval_steps/train_min")]
    epoch_s = [v for _, v in history(uri, run_id, "time/epoch_s")]
    assert 0 < minutes[0] * 60 < epoch_s[0]  # one step of the first epoch, no eval in it
    assert epoch_s[0] < minutes[1] * 60 < sum(epoch_s)
    ours = history(uri, run_id, "train/loss")
    ref = history(base_run.uri, base_run.result.mlflow_run_id, "train/loss")
    assert [v for _, v in ours] == pytest.approx([v for _, v in ref], rel=1e-6)


def test_ema_is_evaluated_and_saved_and_survives_a_resume(base_run, tmp_path, data_root):
    """train.ema_decay: training is unchanged, the saved and evaluated weights are the
    average (not the raw weights), and a run resumed from its epoch-1 checkpoint ends with
    the same average as the uninterrupted run."""
    cfg = run_config(data_root, tmp_path / "runs", "name=ema", "train.ema_decay=0.5",
                     "train.keep_checkpoints=2")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = train_in(tmp_path, cfg, uri)
    ours = history(uri, result.mlflow_run_id, "train/loss")
    ref = history(base_run.uri, base_run.result.mlflow_run_id, "train/loss")
    assert [v for _, v in ours] == pytest.approx([v for _, v in ref], rel=1e-6)
    run_dir = tmp_path / "runs" / "ema"
    final = torch.load(result.model_path, map_location="cpu", weights_only=True)["model"]
    raw = torch.load(base_run.result.model_path, map_location="cpu", weights_only=True)["model"]
    assert not all(torch.equal(final[k], raw[k]) for k in raw)  # the average, not the weights
    first = torch.load(run_dir / "checkpoints" / "epoch_0001" / ckpt.MODEL_FILE,
                       map_location="cpu", weights_only=True)["model"]
    assert not all(torch.equal(final[k], first[k]) for k in first)
    # undo epoch 2, then the same command resumes from epoch 1 with its saved average
    import shutil
    shutil.rmtree(run_dir / "checkpoints" / "epoch_0002")
    (run_dir / "checkpoints" / "latest").write_text("epoch_0001\n")
    for name in ("result.json", "model_final.pth"):
        (run_dir / name).unlink()
    again = train_in(tmp_path, cfg, uri)
    assert again.status == "finished"
    resumed = torch.load(again.model_path, map_location="cpu", weights_only=True)["model"]
    for key, value in final.items():
        assert torch.equal(resumed[key], value), key
    assert again.metrics == result.metrics


def test_cosine_schedule_is_stepped_after_every_optimizer_step(tmp_path, data_root):
    cfg = run_config(data_root, tmp_path / "runs", "name=cos", "train.lr_schedule=cosine")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = train_in(tmp_path, cfg, uri)
    # lr/* is logged as each epoch starts: after 0 and 2 of the run's 4 steps.
    lrs = history(uri, result.mlflow_run_id, "lr/default")
    assert lrs == [(1, pytest.approx(2e-4)), (2, pytest.approx(1e-4))]
    lin = history(uri, result.mlflow_run_id, "lr/linear_proj")
    assert [v for _, v in lin] == pytest.approx([2e-5, 1e-5])


def test_bf16_mixed_keeps_fp32_weights_and_follows_the_fp32_losses(base_run, tmp_path,
                                                                  data_root):
    cfg = run_config(data_root, tmp_path / "runs", "name=mixed", "train.precision=bf16-mixed")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = train_in(tmp_path, cfg, uri)
    assert result.status == "finished"
    ours = history(uri, result.mlflow_run_id, "train/loss")
    ref = history(base_run.uri, base_run.result.mlflow_run_id, "train/loss")
    assert [s for s, _ in ours] == [s for s, _ in ref] == [1, 2]
    # bf16 rounding (8-bit mantissa) moves the losses a little, never far.
    assert [v for _, v in ours] == pytest.approx([v for _, v in ref], rel=0.05)
    assert [v for _, v in ours] != [v for _, v in ref]  # the forward did run in bf16
    saved = result.model_path.parent / "checkpoints" / "epoch_0002" / ckpt.MODEL_FILE
    weights = torch.load(saved, map_location="cpu", weights_only=True)["model"]
    floats = [v for v in weights.values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float32 for v in floats)


def test_nan_loss_stops_with_last_checkpoint_intact(tmp_path, data_root, monkeypatch):
    from sdetr.models.criterion import SetCriterion
    original, calls = SetCriterion.forward, []

    def poisoned(self, outputs, targets):
        losses = original(self, outputs, targets)
        calls.append(1)
        if len(calls) == 6:  # epoch 2 (2 steps x 2 micro-batches per epoch), step 3
            losses["loss_ce"] = losses["loss_ce"] * float("nan")
        return losses

    monkeypatch.setattr(SetCriterion, "forward", poisoned)
    cfg = run_config(data_root, tmp_path / "runs", "name=nan", "train.epochs=3",
                     preset="sparse_detr_tiny")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 3: .*loss_ce=nan"):
        train_in(tmp_path, cfg, uri)
    ckpt_dir = tmp_path / "runs" / "nan" / "checkpoints"
    info = ckpt.find_latest(ckpt_dir)
    assert info.path.name == "epoch_0001" and info.state.epoch == 1
    assert (info.path / "model.pth").is_file() and (info.path / "ds").is_dir()
    assert not [p for p in ckpt_dir.iterdir() if p.name.startswith(".partial")]
    assert not (tmp_path / "runs" / "nan" / "result.json").exists()
    run = mlflow_client(uri).get_run(info.state.mlflow_run_id)
    assert run.info.status == "FAILED"
    assert "non-finite loss at epoch 2" in run.data.tags["sdetr.error"]


def test_diverging_weights_stop_at_the_first_non_finite_output(tmp_path, data_root):
    cfg = run_config(data_root, tmp_path / "runs", "name=diverge", "train.epochs=1",
                     "train.lr=1e30", "train.lr_backbone=1e30")
    with pytest.raises(NonFiniteLossError,
                       match=r"non-finite model outputs at epoch 1, step 2: pred_logits"):
        train_in(tmp_path, cfg, f"sqlite:///{tmp_path}/mlflow.db")
    assert ckpt.find_latest(tmp_path / "runs" / "diverge" / "checkpoints") is None


def test_cli_train_reports_a_training_failure_in_one_line(monkeypatch, capsys):
    import sdetr.engine.launch as launch
    from sdetr.cli import main

    def boom(cfg, **kwargs):
        raise NonFiniteLossError("non-finite loss at epoch 2, step 3: loss=nan")

    monkeypatch.setattr(launch, "run_training", boom)
    assert main(["train", PRESET, "--no-ray"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sdetr: error: non-finite loss at epoch 2, step 3: loss=nan"]
    monkeypatch.undo()
    assert main(["train", PRESET, "--no-ray", "--workers", "2"]) == 2  # bad input: needs Ray
    assert "--workers 2 needs Ray" in capsys.readouterr().err


# --------------------------------------------------------------------------- kill -9 + resume
def _train_cmd(config: Path, run_dir: Path, uri: str) -> list[str]:
    return [sys.executable, "-m", "sdetr", "train", str(config), "--no-ray", "--run-dir",
            str(run_dir), "--tracking-uri", uri, "--no-progress"]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(torch.get_num_threads()))


def test_kill9_mid_epoch_then_same_command_resumes_same_mlflow_run(base_run, tmp_path,
                                                                   data_root):
    """Also checks repeatability: this run (another process, the base run's config) must
    reproduce the base run's epoch-1 and epoch-2 losses, across the kill and the resume."""
    cfg = run_config(data_root, tmp_path / "runs", "name=killed")
    config = tmp_path / "killed.yaml"
    config.write_text(to_yaml(cfg))
    run_dir, uri = tmp_path / "run", f"sqlite:///{tmp_path}/mlflow.db"
    first_meta = run_dir / "checkpoints" / "epoch_0001" / "meta.json"
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(_train_cmd(config, run_dir, uri), cwd=tmp_path, env=_env(),
                                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not first_meta.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert first_meta.exists(), (tmp_path / "first.log").read_text()[-3000:]
    assert not (run_dir / "result.json").exists() and not (run_dir / "model_final.pth").exists()
    run_id = json.loads(first_meta.read_text())["state"]["mlflow_run_id"]
    junk = run_dir / "checkpoints" / ".partial-epoch_0002" / "ds"  # as left by a kill
    junk.mkdir(parents=True, exist_ok=True)
    (junk / "half.pt").write_bytes(b"\0" * 10)

    again = subprocess.run(_train_cmd(config, run_dir, uri), cwd=tmp_path, env=_env(),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and "finished: 2 epochs" in again.stdout
    result = json.loads((run_dir / "result.json").read_text())
    assert result["epochs"] == 2 and result["mlflow_run_id"] == run_id
    assert not (run_dir / "checkpoints" / ".partial-epoch_0002").exists()
    client = mlflow_client(uri)
    runs = client.search_runs([client.get_experiment_by_name("sdetr").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id] and runs[0].info.status == "FINISHED"
    losses = dict(history(uri, run_id, "train/loss"))
    assert sorted(losses) == [1, 2]
    base = dict(history(base_run.uri, base_run.result.mlflow_run_id, "train/loss"))
    assert losses[1] == pytest.approx(base[1], rel=1e-6)
    assert losses[2] == pytest.approx(base[2], rel=1e-6)


@pytest.mark.parametrize("ray", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_sigterm_ends_the_mlflow_run_killed_and_exits_143(tmp_path, data_root, ray):
    """In-process the engine ends its run KILLED; on Ray the driver does, once Ray has
    stopped the workers (the run id from the run's progress.json)."""
    cfg = run_config(data_root, tmp_path / "runs", "name=stopped", "train.epochs=50")
    config = tmp_path / "stopped.yaml"
    config.write_text(to_yaml(cfg))
    run_dir, uri = tmp_path / "run", f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [c for c in _train_cmd(config, run_dir, uri) if not (ray and c == "--no-ray")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            progress = run_dir / "progress.json"
            if progress.exists() and json.loads(progress.read_text()).get("step", 0) >= 1:
                break
            time.sleep(0.1)
    finally:
        out = stop_with_sigterm(proc)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "interrupted" in out and "same command again to resume" in out
    assert "Traceback" not in out
    client = mlflow_client(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("sdetr").experiment_id])
    assert run.info.status == "KILLED"


# --------------------------------------------------------------------------- checkpoint files
def _fake_checkpoint(ckpt_dir: Path, epoch: int) -> Path:
    path = ckpt_dir / ckpt.checkpoint_tag(epoch)
    path.mkdir(parents=True)
    state = {"epoch": epoch, "global_step": 2 * epoch, "mlflow_run_id": "r"}
    (path / "meta.json").write_text(json.dumps({"format": ckpt.FORMAT, "state": state}))
    return path


def test_find_latest_ignores_partial_and_stale_pointer(tmp_path):
    assert ckpt.find_latest(tmp_path / "missing") is None
    for epoch in (1, 2, 3):
        _fake_checkpoint(tmp_path, epoch)
    (tmp_path / ".partial-epoch_0004").mkdir()
    (tmp_path / "epoch_0005").mkdir()  # no meta.json: incomplete
    (tmp_path / "latest").write_text("epoch_0002\n")  # killed before the pointer moved
    assert ckpt.find_latest(tmp_path).path.name == "epoch_0003"
    assert ckpt.remove_partial(tmp_path) == [tmp_path / ".partial-epoch_0004"]
    assert [p.name for p in ckpt.prune(tmp_path, keep=2)] == ["epoch_0001"]
    assert [i.state.epoch for i in ckpt.complete_checkpoints(tmp_path)] == [2, 3]
    with pytest.raises(CheckpointError, match="not a complete training checkpoint"):
        ckpt.read_checkpoint(tmp_path / "epoch_0005")


# --------------------------------------------------------------------------- Ray (slow)
def test_ray_setup_hook_imports_no_torch_and_drops_only_the_cleaner_noise(caplog):
    # The hook runs before Ray sets OMP_NUM_THREADS: a torch imported there would oversubscribe.
    code = ("import sys; from sdetr.utils import ray_hooks; ray_hooks.quiet_ray_internals(); "
            "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True,
                          text=True, timeout=60, check=True)
    assert proc.stdout.strip() == "False"
    import logging
    from sdetr.utils import ray_hooks
    ray_hooks.quiet_ray_internals()
    cleaner = logging.getLogger(ray_hooks.PG_CLEANER_LOGGER)
    with caplog.at_level(logging.WARNING, logger=ray_hooks.PG_CLEANER_LOGGER):
        cleaner.warning(ray_hooks.PG_CLEANER_NOISE + ". State API may be unavailable.")
        cleaner.warning("Detected that the Ray Train controller actor is dead.")
    assert [r.getMessage() for r in caplog.records] == [
        "Detected that the Ray Train controller actor is dead."]


@pytest.mark.slow
def test_two_ray_workers_match_one_worker_at_the_same_total_batch(base_run, tmp_path,
                                                                  data_root):
    """2 workers × 1 micro-batch vs 1 worker × 2 accumulated micro-batches (total batch 4).
    Differences are expected only from per-rank augmentation (random flips), BatchNorm over
    other micro-batch pairs and the per-micro-batch box normaliser."""
    cfg = run_config(data_root, tmp_path / "runs", "name=two", "train.workers=2")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        result = run_training(cfg, workers=2, use_ray=True, tracking_uri=uri, progress=False)
    run = mlflow_client(uri).get_run(result.mlflow_run_id)
    assert run.data.tags["sdetr.world_size"] == "2"
    assert run.data.tags["sdetr.accumulation_steps"] == "1"
    # Ray gives each 1-CPU worker one intra-op thread (2 workers never oversubscribe 2 cores)
    assert run.data.tags["sdetr.torch_threads"] == os.environ.get("OMP_NUM_THREADS", "1")
    # the _tiny presets' train.malloc_retain, applied inside the Ray workers (glibc)
    assert run.data.tags["sdetr.malloc_retain"] == "applied"
    assert ckpt.find_latest(result.run_dir / "checkpoints").state.global_step == 4
    ours = [v for _, v in history(uri, result.mlflow_run_id, "train/loss")]
    ref = [v for _, v in history(base_run.uri, base_run.result.mlflow_run_id, "train/loss")]
    assert ours == pytest.approx(ref, rel=0.05)


@pytest.mark.slow
def test_demo_quick(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sdetr", "demo", "--quick", "--no-progress"],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "AP50" in proc.stdout and "mlflow ui --backend-store-uri" in proc.stdout
    result = json.loads((tmp_path / "runs" / "demo_quick" / "result.json").read_text())
    assert result["world_size"] == 2 and result["status"] == "FINISHED"
    client = mlflow_client(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("sdetr")
    # artifacts next to mlflow.db, not in the Ray worker's working directory
    assert experiment.artifact_location == str(tmp_path / "mlruns" / experiment.experiment_id)
    paths = {a.path for a in client.list_artifacts(result["mlflow_run_id"])}
    assert {"config.yaml", "result.json", "eval"} <= paths
