"""The ``sdetr`` command line: help, zoo listing, profile JSON, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from helpers import MICRO
from sdetr.cli import main
from sdetr.config import load_config, preset_names
from sdetr.models import build_model
from sdetr.models.official import export_official_state_dict


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdetr", *args], capture_output=True, text=True,
                          timeout=300)


def test_help_lists_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("models", "config", "profile", "checkpoint"):
        assert command in result.stdout


def test_models_lists_every_preset(capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == preset_names()
    by_name = {r["name"]: r for r in rows}
    assert by_name["deformable_detr_r50_two_stage"]["queries"] == "two_stage"
    assert by_name["deformable_detr_swint"]["backbone"] == "swin_t"


def test_profile_params_json(capsys):
    assert main(["profile", "deformable_detr_r50", "--what", "params", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert round(result["params_trainable"] / 1e6, 2) == 39.85
    assert result["params_total"] - result["params_trainable"] == result["params_frozen"]
    assert result["preset"] == "deformable_detr_r50"


@pytest.mark.parametrize("args, culprit", [
    (["profile", "deformable_detr_tiny", "--set", "model.rho=1.5"], "model.rho"),
    (["profile", "deformable_detr_tiny", "--set", "model.nope=1"], "model.nope"),
    (["profile", "no_such_preset"], "no_such_preset"),
    (["profile", "deformable_detr_tiny", "--what", "gflops"], "gflops"),
    (["config", "missing/file.yaml"], "missing/file.yaml"),
])
def test_bad_input_is_one_line_and_exit_2(args, culprit):
    result = run_cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdetr: error:") and culprit in lines[0]
    assert "Traceback" not in result.stderr


def test_config_show_round_trips(tmp_path, capsys):
    assert main(["config", "deformable_detr_tiny", "--set", "model.num_queries=42"]) == 0
    path = tmp_path / "resolved.yaml"
    path.write_text(capsys.readouterr().out)
    assert load_config(path).model.num_queries == 42


def test_checkpoint_command_official_round_trip(tmp_path, capsys):
    cfg = load_config("deformable_detr_two_stage_tiny", MICRO)
    path = tmp_path / "official.pth"
    torch.save({"model": export_official_state_dict(build_model(cfg.model))}, path)
    out = tmp_path / "converted.pth"
    args = ["checkpoint", "deformable_detr_two_stage_tiny", str(path), "--official",
            "--out", str(out), "--set", *MICRO]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["missing"] == [] and summary["unexpected"] == [] and out.is_file()
    assert main(["checkpoint", "deformable_detr_two_stage_tiny", str(out), "--set", *MICRO]) == 0
    plain = ["checkpoint", "deformable_detr_tiny", str(path), "--official", "--set", *MICRO]
    assert main(plain) == 2
    assert "does not fit this model" in capsys.readouterr().err
