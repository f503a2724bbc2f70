"""Where a training step's time goes: the stopwatch of ``run_epoch``, ``sdetr bench train``
in one process on a micro model, and ``train.precision: auto``."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from helpers import MICRO, micro_config
from sdetr.cli import main
from sdetr.config import ConfigError, load_config
from sdetr.data import synth_main
from sdetr.engine import precision as precision_mod
from sdetr.engine.bench_train import run_train_bench
from sdetr.engine.step_timing import PHASES, StepTimer


def test_step_timer_skips_the_warmup_and_averages_per_step():
    timer = StepTimer(warmup=1)
    for seconds in (0.03, 0.01, 0.02):
        timer.start_step()
        with timer.phase("forward"):
            time.sleep(seconds)
        timer.add("loss", 0.5)
        timer.add("loss", -0.25)  # a nested phase subtracts itself from its parent
        timer.end_step()
    per_step = timer.per_step()
    assert len(timer.steps) == 2  # the first step was warm-up
    assert per_step["forward"] == pytest.approx(0.015, abs=0.005)
    assert per_step["loss"] == pytest.approx(0.25)
    assert per_step["step"] == pytest.approx(sum(timer.steps) / 2)
    assert per_step["step"] >= per_step["forward"]
    summary = timer.summary()
    assert summary["steps"] == 2 and summary["first_quarter_step"] == timer.steps[0]
    assert StepTimer().per_step() == {}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synth"
    synth_main(str(root), 12, 4, 0)
    return root


def bench_overrides(data_root: Path) -> list[str]:
    """A micro Sparse DETR on 12 synthetic images at 128 px, batch 2 as 2 micro-batches of 1."""
    return [*MICRO, f"data.root={data_root}", "data.synth_train=12", "data.synth_val=4",
            "data.train_scales=[128]", "data.train_max_size=192", "data.num_workers=1",
            "train.batch_size=2", "train.micro_batch_size=1", "train.workers=1",
            "train.precision=fp32"]


def bench_config(data_root: Path):
    return load_config("sparse_detr_tiny", bench_overrides(data_root))


def test_bench_train_in_one_process_breaks_the_step_down(data_root):
    result = run_train_bench(bench_config(data_root), steps=3, warmup=1, use_ray=False,
                             progress=False)
    assert result["workers"] == 1 and result["accumulation"] == 2 and result["steps"] == 3
    assert result["precision"] == "fp32" and result["kernel_backend"] in ("reference",
                                                                         "compiled")
    (rank,) = result["ranks"]
    per_step = rank["summary"]["per_step"]
    assert rank["summary"]["steps"] == 3
    assert set(PHASES) <= set(per_step)
    for phase in ("forward", "backward", "matcher", "loss", "optimizer"):
        assert per_step[phase] > 0, phase
    assert per_step["wait"] == 0.0  # one rank
    assert sum(per_step[p] for p in PHASES) == pytest.approx(per_step["step"], rel=0.1)
    assert per_step["data_cpu"] > 0  # one loader process did the decoding


def test_bench_train_cli_prints_the_table_and_refuses_too_many_steps(data_root, capsys):
    args = ["bench", "train", "sparse_detr_tiny", "--no-ray", "--steps", "2", "--warmup", "0",
            "--no-progress", "--set", *bench_overrides(data_root)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "components / measured step" in out and "Hungarian matching" in out
    assert main(args[:5] + ["50"] + args[6:]) == 2  # 12 images / batch 2 = 6 steps
    assert "exceed the 6 steps" in capsys.readouterr().err


@pytest.mark.parametrize("flags, expected", [(["avx2"], "fp32"),
                                             (["amx_bf16"], "bf16-mixed")])
def test_precision_auto_follows_native_bf16(monkeypatch, flags, expected):
    def facts():
        return {"model": "test CPU", "bf16_flags": [f for f in flags if "bf16" in f]}

    monkeypatch.setattr("sdetr.bench.environment.cpu_facts", facts)
    cfg = micro_config("sparse_detr_tiny")
    assert cfg.train.precision == "auto"  # the _tiny presets' default
    assert precision_mod.resolve_precision(cfg, use_gpu=False).train.precision == expected
    fixed = micro_config("sparse_detr_tiny", "train.precision=fp32")
    assert precision_mod.resolve_precision(fixed, use_gpu=False) is fixed


def test_the_runs_cpus_are_split_over_its_workers():
    from sdetr.engine.launch import worker_resources

    cfg = micro_config("sparse_detr_tiny")
    assert cfg.train.cpus == 2 and cfg.train.workers == 1  # one worker, both cores
    assert worker_resources(cfg.train.cpus, 1) == {"CPU": 2.0}
    assert worker_resources(cfg.train.cpus, 2) == {"CPU": 1.0}  # --workers 2 still fits
    assert worker_resources(None, 2) is None  # Ray Train's default
    with pytest.raises(ConfigError, match="train.cpus"):
        micro_config("sparse_detr_tiny", "train.cpus=0")


def test_unresolved_auto_never_reaches_the_engine():
    from sdetr.engine.deepspeed_engine import autocast_dtype

    with pytest.raises(ValueError, match="must be resolved"):
        autocast_dtype(micro_config("sparse_detr_tiny").train)
    with pytest.raises(ConfigError):
        micro_config("sparse_detr_tiny", "train.precision=fp16")


def test_progress_rate_leaves_out_excluded_time(tmp_path):
    import io

    from tqdm import tqdm

    from sdetr.engine.progress_file import ProgressFile, read_progress
    from sdetr.engine.steps import LogProgress

    for inner in (LogProgress(10, "epoch 1/1"), tqdm(total=10, file=io.StringIO())):
        progress = ProgressFile(tmp_path, 1, 10, enabled=True).epoch_bar(1, inner)
        start = inner.start if isinstance(inner, LogProgress) else inner.start_t
        time.sleep(0.4)  # 0.3 s of it "evaluating"
        progress.update(2)
        progress.exclude(0.3)
        progress.phase("train")
        assert read_progress(tmp_path)["seconds_per_step"] == pytest.approx(0.05, abs=0.04)
        after = inner.start if isinstance(inner, LogProgress) else inner.start_t
        assert after == pytest.approx(start + 0.3)
