"""``sdetr data`` and ``sdetr eval`` end to end on a tiny synthetic split."""

from __future__ import annotations

import json

import pytest
import torch

from sdetr.cli import main
from sdetr.config import load_config, unflatten
from sdetr.engine import METRIC_KEYS
from sdetr.models import build_model, save_model_weights

TINY = ["model.hidden_dim=64", "model.nheads=4", "model.dim_feedforward=128",
        "model.enc_layers=1", "model.dec_layers=1", "model.num_queries=20",
        "model.num_classes=24", "data.eval_size=128", "data.eval_max_size=160",
        "data.synth_train=2", "data.synth_val=6", "data.num_workers=0", "eval.batch_size=3"]


def _one_error_line(err: str, culprit: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.startswith("sdetr: error:")]
    assert len(lines) == 1 and culprit in lines[0], err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """(weights file, overrides) of a random tiny Deformable DETR on a synthetic root."""
    root = tmp_path_factory.mktemp("eval")
    overrides = [*TINY, f"data.root={root / 'synth'}"]
    cfg = load_config("deformable_detr_tiny", overrides)
    torch.manual_seed(0)
    path = save_model_weights(root / "w.pth", build_model(cfg.model), cfg.model)
    return path, overrides


def test_data_synth_then_check(tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["data", "synth", "--out", str(out), "--train", "3", "--val", "4"]) == 0
    printed = capsys.readouterr().out
    assert "train2017" in printed and "val2017" in printed and "per area" in printed
    assert main(["data", "check", str(out), "--split", "val2017"]) == 0
    report = capsys.readouterr().out
    assert "images                         4" in report
    assert "errors                         0" in report
    (out / "val2017" / "000000000002.jpg").unlink()
    assert main(["data", "check", str(out)]) == 2
    captured = capsys.readouterr()
    assert "missing image" in captured.out
    _one_error_line(captured.err, "1 errors")


def test_data_synth_refuses_a_foreign_folder(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep me")
    assert main(["data", "synth", "--out", str(tmp_path), "--train", "1", "--val", "1"]) == 2
    _one_error_line(capsys.readouterr().err, "refusing to overwrite")
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_eval_weights_file_writes_metrics_and_an_mlflow_run(weights, tmp_path, monkeypatch,
                                                            capsys):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)  # MLflow's SQLite store puts artifacts under ./mlruns
    path, overrides = weights
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    args = ["eval", "deformable_detr_tiny", "--checkpoint", str(path), "--out", str(out),
            "--tracking-uri", uri, "--experiment", "cli-tests", "--device", "cpu",
            "--no-progress", "--set", *overrides]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split() == ["rho", "AP", "AP50", "AP75", "APs", "APm", "APl",
                                               "AR100", "corr"]
    summary = json.loads((out / "metrics.json").read_text())
    (result,) = summary["results"]
    assert set(result["metrics"]) == set(METRIC_KEYS) and result["num_images"] == 6
    assert summary["checkpoint_format"] == "sdetr-weights"
    assert len(json.loads((out / result["detections"]).read_text())) == 6 * 100
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert unflatten(run.data.params) == load_config("deformable_detr_tiny", overrides)
    assert run.data.tags["sdetr.checkpoint_format"] == "sdetr-weights"
    assert run.data.metrics["eval/AP"] == result["metrics"]["AP"]
    assert run.data.tags["sdetr.run_type"] == "eval"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.json", "detections.json"} <= artifacts


def test_eval_refuses_rho_for_a_dense_model(weights, tmp_path, capsys):
    path, overrides = weights
    args = ["eval", "deformable_detr_tiny", "--checkpoint", str(path), "--rho", "0.1,0.2",
            "--no-track", "--out", str(tmp_path), "--set", *overrides]
    assert main(args) == 2
    _one_error_line(capsys.readouterr().err, "--rho")
    assert not (tmp_path / "metrics.json").exists()


def test_eval_missing_checkpoint_is_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.pth"
    args = ["eval", "deformable_detr_tiny", "--checkpoint", str(missing), "--no-track",
            "--out", str(tmp_path / "out"), "--set", *TINY]
    assert main(args) == 2
    _one_error_line(capsys.readouterr().err, str(missing))
    assert not (tmp_path / "out").exists()


def test_eval_loads_a_training_run_folder(weights, tmp_path):
    from sdetr.engine import checkpoints
    from sdetr.engine.eval_run import load_weights
    path, overrides = weights
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / checkpoints.FINAL_MODEL).write_bytes(path.read_bytes())
    cfg = load_config("deformable_detr_tiny", overrides)
    model = build_model(cfg.model)
    assert load_weights(model, cfg, run_dir, official=False) == "sdetr-run"
    saved = torch.load(path, weights_only=True)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert load_weights(model, cfg, path, official=False) == "sdetr-weights"


def test_eval_with_folded_bn_matches_the_unfolded_model(weights, tmp_path):
    """``eval.fold_bn`` (the default) changes nothing but float rounding: per image, the sorted
    detection scores of the folded and the unfolded model agree within 1e-4."""
    path, overrides = weights
    scores = {}
    for fold in ("true", "false"):
        out = tmp_path / fold
        args = ["eval", "deformable_detr_tiny", "--checkpoint", str(path), "--no-track",
                "--out", str(out), "--no-progress", "--set", *overrides, f"eval.fold_bn={fold}"]
        assert main(args) == 0
        per_image: dict[int, list[float]] = {}
        for det in json.loads((out / "detections.json").read_text()):
            per_image.setdefault(det["image_id"], []).append(det["score"])
        scores[fold] = {k: sorted(v) for k, v in per_image.items()}
    assert scores["true"].keys() == scores["false"].keys()
    for image, folded in scores["true"].items():
        assert folded == pytest.approx(scores["false"][image], abs=1e-4), image
