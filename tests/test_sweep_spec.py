"""Sweep files: loading, validation, grid expansion, run identity, bad input (no Ray, no MLflow)."""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path

import pytest

from sdetr.cli import main
from sdetr.config import ConfigError
from sdetr.orchestration import config_hash, expand, load_sweep
from sdetr.orchestration.checks import check_runs

BASE = """\
name: t
base:
  preset: deformable_detr_tiny
  set:
    data.root: {root}
    train.epochs: 1
"""


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Relative paths (output_dir, data.root) resolve against the working directory."""
    monkeypatch.chdir(tmp_path)


def write(tmp_path: Path, body: str, name: str = "sweep.yaml", root: str = "data/s") -> Path:
    path = tmp_path / name
    path.write_text(BASE.format(root=root) + textwrap.dedent(body))
    return path


def test_grid_product_exclude_include_and_names(tmp_path):
    path = write(tmp_path, """\
        grid:
          preset: [efficient_detr_tiny, sparse_detr_tiny]
          model.rho: [0.1, 0.3]
        exclude:
          - {preset: efficient_detr_tiny, model.rho: 0.3}
        include:
          - {preset: deformable_detr_tiny, train.seed: 7}
        """)
    plans = expand(load_sweep(path))
    assert [p.name for p in plans] == ["efficient_detr_tiny-rho0.1", "sparse_detr_tiny-rho0.1",
                                       "sparse_detr_tiny-rho0.3", "deformable_detr_tiny-seed7"]
    assert [p.cfg.model.encoder for p in plans] == ["dense", "sparse", "sparse", "dense"]
    assert plans[2].cfg.model.rho == 0.3 and plans[3].cfg.train.seed == 7
    assert plans[0].axes == {"preset": "efficient_detr_tiny", "model.rho": 0.1}
    out = (tmp_path / "runs" / "sweeps" / "t").resolve()
    for plan in plans:  # <output_dir>/<sweep>/<run>-<hash8>, data.root absolute
        assert plan.run_dir == out / f"{plan.name}-{plan.config_hash[:8]}"
        assert Path(plan.cfg.data.root).is_absolute()
        assert plan.cfg.train.epochs == 1


def test_stages_and_resources_reach_every_run(tmp_path):
    path = write(tmp_path, """\
        grid:
          preset: [deformable_detr_tiny, sparse_detr_tiny]
        stages:
          eval_rho: [0.2, 0.5]
          profile: [params]
        resources: {workers: 1, zero_stage: 2}
        """)
    dense, sparse = expand(load_sweep(path))
    assert dense.cfg.eval.rho_sweep == [] and sparse.cfg.eval.rho_sweep == [0.2, 0.5]
    assert dense.cfg.profile.what == sparse.cfg.profile.what == ["params"]
    assert dense.cfg.train.workers == 1 and dense.cfg.train.zero_stage == 2
    assert dense.cfg.train.use_gpu is False  # gpus_per_worker 0


def test_config_hash_ignores_where_a_run_lives_but_not_what_it_computes(tmp_path):
    (plan,) = expand(load_sweep(write(tmp_path, "")))
    same = [("name", "other"), ("train.output_dir", "/elsewhere"), ("data.num_workers", 0),
            ("train.keep_checkpoints", 5)]
    for key, value in same:
        assert config_hash(changed(plan.cfg, key, value)) == plan.config_hash, key
    for key, value in [("train.lr", 1e-3), ("model.rho", 0.5), ("data.root", "/other")]:
        assert config_hash(changed(plan.cfg, key, value)) != plan.config_hash, key
    # a hash of the resolved values only: the same on every load
    assert expand(load_sweep(write(tmp_path, "")))[0].config_hash == plan.config_hash


def changed(cfg, key, value):
    out = copy.deepcopy(cfg)
    section, _, leaf = key.rpartition(".")
    setattr(getattr(out, section) if section else out, leaf, value)
    return out


def test_set_overrides_from_the_command_line(tmp_path):
    spec = load_sweep(write(tmp_path, ""), {"train.epochs": 3, "model.dropout": 0.0})
    (plan,) = expand(spec)
    assert plan.cfg.train.epochs == 3 and plan.cfg.model.dropout == 0.0


def test_two_runs_with_the_same_config_are_refused(tmp_path):
    path = write(tmp_path, """\
        grid:
          train.keep_checkpoints: [1, 2]
        """)
    with pytest.raises(ConfigError, match="resolve to the same config"):
        expand(load_sweep(path))


BAD_FILES = {
    "unknown top-level key": ("grdi:\n  model.rho: [0.1]\n", "grdi: unknown key"),
    "unknown config key in an axis": ("grid:\n  model.rhoo: [0.1]\n", "model.rhoo: unknown key"),
    "bad axis value": ("grid:\n  model.rho: [0.1, abc]\n", "model.rho: expected float"),
    "rho outside (0, 1]": ("grid:\n  preset: [sparse_detr_tiny]\n  model.rho: [0.3, 1.5]\n",
                           "model.rho: must be in (0, 1], got 1.5"),
    "empty axis": ("grid:\n  model.rho: []\n", "grid.model.rho: empty list"),
    "impossible combination": ("grid:\n  model.encoder: [sparse]\n",
                               "model.encoder: 'sparse' needs queries"),
    "unknown resources key": ("resources: {wrokers: 2}\n", "resources.wrokers: unknown key"),
    "eval rho outside (0, 1]": ("stages: {eval_rho: [0.5, 2.0]}\n", "stages.eval_rho: 2.0"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_sweep_file_is_one_line_error_naming_file_and_key(case, tmp_path, monkeypatch,
                                                              capsys):
    body, expected = BAD_FILES[case]
    path = write(tmp_path, body)
    assert_bad_input(["sweep", str(path)], [str(path), expected], tmp_path, monkeypatch, capsys)


def test_malformed_empty_and_missing_files(tmp_path, monkeypatch, capsys):
    malformed = tmp_path / "malformed.yaml"
    malformed.write_text("name: x\nbase: {preset: [unclosed\n")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    cases = [(malformed, "malformed YAML"), (empty, "empty"),
             (tmp_path / "nope.yaml", "not found")]
    for path, expected in cases:
        assert_bad_input(["sweep", str(path)], [str(path), expected], tmp_path, monkeypatch,
                         capsys)


def test_missing_coco_path_fails_before_anything_starts(tmp_path, monkeypatch, capsys):
    path = write(tmp_path, "", root=str(tmp_path / "no_coco"))
    path.write_text(path.read_text().replace("train.epochs: 1", "train.epochs: 1\n"
                                             "    data.synthetic: false"))
    (plan,) = expand(load_sweep(path))
    with pytest.raises(ConfigError, match="no_coco.*not found"):
        check_runs([plan])
    assert_bad_input(["sweep", str(path)], ["no_coco", "not found"], tmp_path, monkeypatch,
                     capsys)
    # --dry-run still lists the grid and marks the missing data
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", str(path), "--dry-run"]) == 0
    assert "missing" in capsys.readouterr().out


def assert_bad_input(argv, fragments, tmp_path, monkeypatch, capsys):
    """Exit 2, one stderr line naming every fragment, no MLflow store, no Ray."""
    import ray
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdetr: error: ") and "\n" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "runs").exists()
    assert not ray.is_initialized()


def test_dry_run_table_counts_params_and_cheap_gflops(tmp_path, monkeypatch, capsys):
    path = write(tmp_path, """\
        grid:
          preset: [deformable_detr_tiny, sparse_detr_tiny]
        """)
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 run(s)" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "_tiny" in line]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        params, gflops = float(cells[-3]), float(cells[-2])
        assert 10 < params < 20 and 0 < gflops < 100  # tiny presets: ~13M, 850×1040 FLOPs
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()
