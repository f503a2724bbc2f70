"""``sdetr report --format ...,figures``: ablation figures (PNG + PDF) drawn from a real SQLite
MLflow store with runs logged like the engine logs them; skipped figures listed with why."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("matplotlib")

from matplotlib.image import imread  # noqa: E402

from sdetr.cli import main  # noqa: E402
from sdetr.reports import build_report, load_runs  # noqa: E402
from sdetr.reports.build import parse_formats  # noqa: E402
from sdetr.reports.figures import (CORR_METRIC, FIGURES, FigureInputs,  # noqa: E402
                                   ap_vs_encoder_depth, ap_vs_gflops, ap_vs_rho,
                                   _families, corr_over_training, dynamic_rho)
from sdetr.reports.history import metric_history  # noqa: E402
from sdetr.reports.table1 import build_table, split_runs  # noqa: E402
from test_reports import COCO, log_run  # noqa: E402

ABLATION, CORR, SINGLE = "ablation", "corr", "single"
DRAWN = ("ap_vs_gflops", "ap_vs_rho", "dynamic_rho", "ap_vs_encoder_depth",
         "lite_configurations")
CORR_SKIP = f"Corr over training: no run logs a Corr metric ({CORR_METRIC})"
ALL_FORMATS = ("md", "tex", "csv", "figures")
SWEEP = ["eval.rho_sweep=[0.2, 0.3, 0.5]"]
DYNAMIC = {"sparse_s1": {0.2: .4570, 0.3: .4580, 0.5: .4550},
           "sparse_s2": {0.2: .4586, 0.3: .4602, 0.5: .4570}}
CORR_STEPS = (10, 20, 30, 40, 50)
CORR_VALUES = {"dam": (.41, .52, .58, .61, .63), "objectness": (.35, .40, .43, .45, .46)}


def spec(preset: str, ap: float, gflops: float, *overrides: str) -> dict[str, Any]:
    """A FINISHED run's spec for ``test_reports.log_run``: the six AP numbers from ``ap``."""
    return dict(preset=preset, set=[*COCO, *overrides],
                ap=dict(zip(("AP", "AP50", "AP75", "APs", "APm", "APl"),
                            (ap, ap + .2, ap + .04, ap - .17, ap + .03, ap + .15))),
                params=41_000_000, gflops=gflops, fps=20.0, status="RUNNING")


RUNS: dict[str, dict[str, Any]] = {
    "deformable": spec("deformable_detr_r50", .4362, 172.93),
    "efficient": spec("efficient_detr_r50", .4571, 177.33),
    "sparse_s1": spec("sparse_detr_r50", .4512, 111.19, "train.seed=1", *SWEEP),
    "sparse_s2": spec("sparse_detr_r50", .4548, 111.19, "train.seed=2", *SWEEP),
    "sparse_r20": spec("sparse_detr_r50", .4590, 115.6, "model.rho=0.2"),
    "sparse_r30": spec("sparse_detr_r50", .4605, 120.1, "model.rho=0.3"),
    "sparse_r50": spec("sparse_detr_r50", .4621, 129.0, "model.rho=0.5"),
    "sparse_enc3": spec("sparse_detr_r50", .4420, 95.0, "model.enc_layers=3"),
    "sparse_enc3_noaux": spec("sparse_detr_r50", .4350, 95.0, "model.enc_layers=3",
                              "model.enc_aux_loss=false"),
    "sparse_noaux": spec("sparse_detr_r50", .4480, 111.19, "model.enc_aux_loss=false"),
    "swin_r10": spec("sparse_detr_swint", .4860, 113.0),
    "swin_r30": spec("sparse_detr_swint", .4920, 122.0, "model.rho=0.3"),
    "lite": spec("lite_detr_r50_h3l1_6x1", .4904, 159.61),
    "lite_h2l2": spec("lite_detr_r50_h2l2_2x3", .4850, 151.0),
    "sparse_lite": spec("sparse_lite_detr_r50", .4760, 120.5),
}
CORR_RUNS = {"dam": spec("sparse_detr_r50", .4512, 111.19),
             "objectness": spec("sparse_detr_r50", .4400, 111.19,
                                "model.token_selection=objectness")}


def log_finished(client: Any, exp: str, name: str, run: dict[str, Any],
                 extra: dict[tuple[str, int], float]) -> str:
    """``log_run`` (left RUNNING), then ``extra`` metrics ((key, step) -> value), FINISHED."""
    run_id = log_run(client, exp, name, run, None)
    client.log_batch(run_id, metrics=[mlflow.entities.Metric(key, value, 0, step)
                                      for (key, step), value in extra.items()])
    client.set_terminated(run_id, "FINISHED")
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict[str, Any]:
    """ABLATION (figures 1, 2, 3, 5, 6 but no Corr), CORR (two runs logging Corr at every
    evaluation) and SINGLE (one run: every figure skipped)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exps = {name: client.create_experiment(name, artifact_location=(root / name).as_uri())
            for name in (ABLATION, CORR, SINGLE)}
    for name, run in RUNS.items():
        extra = {(f"eval_rho{rho:g}/AP", 50): v for rho, v in DYNAMIC.get(name, {}).items()}
        log_finished(client, exps[ABLATION], name, run, extra)
    for name, run in CORR_RUNS.items():
        log_finished(client, exps[CORR], name, run,
                     {(CORR_METRIC, s): v for s, v in zip(CORR_STEPS, CORR_VALUES[name])})
    log_finished(client, exps[SINGLE], "deformable", RUNS["deformable"], {})
    return {"uri": uri, "root": root}


def inputs_of(experiment: str, uri: str) -> FigureInputs:
    placed, _ = split_runs(load_runs(experiment, uri))
    history = metric_history(uri, placed["run_id"], CORR_METRIC)
    return FigureInputs(build_table(placed), placed, history)


@pytest.fixture(scope="module")
def report(store, tmp_path_factory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("reports") / ABLATION
    assert main(["report", "--experiment", ABLATION, "--tracking-uri", store["uri"],
                 "--out", str(out), "--format", "md,tex,csv,figures"]) == 0
    return {"out": out, "index": (out / "index.md").read_text()}


def lines_of(ax: Any) -> dict[str, tuple[list[float], list[float]]]:
    """Legend label -> (x, y) of each labelled line of ``ax``."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
            for line in ax.get_lines() if not line.get_label().startswith("_")}


def containers_of(ax: Any) -> dict[str, tuple[list[float], list[float]]]:
    """Legend label -> (x, y) of each errorbar series of ``ax``."""
    out = {}
    for container in ax.containers:
        line = container.lines[0] if hasattr(container, "lines") else None
        if line is not None and not container.get_label().startswith("_"):
            out[container.get_label()] = (list(line.get_xdata()), list(line.get_ydata()))
    return out


# ------------------------------------------------------------------------- files and index
def test_figures_are_written_linked_and_the_missing_one_skipped_with_why(report):
    out, index = report["out"], report["index"]
    for name in DRAWN:
        png, pdf = out / "figures" / f"{name}.png", out / "figures" / f"{name}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert pdf.read_bytes()[:5] == b"%PDF-"
        assert f"]({f'figures/{name}.png'})" in index and "![" in index
        assert f"[{name}.pdf](figures/{name}.pdf)" in index
    assert sorted(p.name for p in (out / "figures").iterdir()) == sorted(
        f"{n}.{k}" for n in DRAWN for k in ("png", "pdf"))
    for name in ("table1.md", "table1.tex", "table1.csv"):
        assert (out / name).is_file()
    skipped = index.split("## Figures skipped (1)")[1].split("##")[0]
    assert skipped.strip() == f"- {CORR_SKIP}"
    assert index.index("## Figures") < index.index("## Runs")


def test_the_skip_is_one_info_line(store, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="sdetr.reports.figures"):
        result = build_report(ABLATION, store["uri"], tmp_path / "r", ALL_FORMATS)
    assert result.figures_skipped == (CORR_SKIP,)
    lines = [r.getMessage() for r in caplog.records if r.name == "sdetr.reports.figures"]
    assert lines == [CORR_SKIP]


def test_pngs_are_not_blank(report):
    for name in DRAWN:
        pixels = imread(report["out"] / "figures" / f"{name}.png")
        assert pixels.ndim == 3 and pixels.shape[0] > 400 and pixels.shape[1] > 600
        colours = np.unique(pixels[..., :3].reshape(-1, 3), axis=0)
        assert pixels[..., :3].std() > 0.05, name
        assert len(colours) > 100, name


def test_figures_are_a_default_format_and_can_be_left_out(store, tmp_path):
    assert parse_formats("md, figures") == ("md", "figures")
    build_report(ABLATION, store["uri"], tmp_path / "all")
    assert (tmp_path / "all" / "figures" / "ap_vs_gflops.png").is_file()
    out = tmp_path / "tables"
    build_report(ABLATION, store["uri"], out, formats=("md", "tex", "csv"))
    assert not (out / "figures").exists() and "## Figures" not in (out / "index.md").read_text()


def test_a_family_of_one_run_keeps_its_params(store):
    """pandas groups by a one-element list with tuple keys: a lone Sparse DETR run (the smoke
    sweep with one rho finished) must still come out as one family with its params."""
    placed = inputs_of(ABLATION, store["uri"]).placed
    sparse = placed[placed["params.model.encoder"] == "sparse"].iloc[:1]
    ((params, group),) = _families(sparse, ["model.rho"])
    assert isinstance(params, dict) and params["model.encoder"] == "sparse" and len(group) == 1


# ------------------------------------------------------------------------- what is drawn
def test_ap_vs_gflops_has_every_row_and_the_pareto_front(store):
    inputs = inputs_of(ABLATION, store["uri"])
    ax = ap_vs_gflops(inputs).axes[0]
    points = containers_of(ax)
    assert set(points) == {"R50", "Swin-T"}
    assert sum(len(x) for x, _ in points.values()) == len(inputs.table) == 14
    (label, (xs, ys)), = lines_of(ax).items()
    assert label.startswith("Pareto front (COCO rows")
    # min GFLOPs first; then only points with more AP: 95 (44.2), 111.19 (45.3 mean of two
    # seeds), 115.6, 120.1, 129.0, then Lite H2L2 151.0 (48.5), Lite 159.61 (49.04); the
    # Swin-T rows are better still: 113.0 (48.6) and 122.0 (49.2) beat the R50 ones.
    front = [round(x, 2) for x in xs]
    assert front[:3] == [95.0, 111.19, 113.0] and front[3] == 122.0
    assert ys[-1] == pytest.approx(49.2) and xs[-1] == pytest.approx(177.33)


def test_ap_vs_rho_is_a_line_per_backbone_with_seed_error_bars(store):
    ax = ap_vs_rho(inputs_of(ABLATION, store["uri"])).axes[0]
    series = containers_of(ax)
    assert set(series) == {"R50 Sparse DETR", "Swin-T Sparse DETR"}
    xs, ys = series["R50 Sparse DETR"]
    assert xs == [10, 20, 30, 50]
    assert ys == pytest.approx([(45.12 + 45.48) / 2, 45.90, 46.05, 46.21])
    assert series["Swin-T Sparse DETR"] == ([10, 30], pytest.approx([48.6, 49.2]))
    r50 = next(c for c in ax.containers if c.get_label() == "R50 Sparse DETR")
    (bars,) = r50.lines[2]
    lengths = [abs(s[1][1] - s[0][1]) if len(s) else None for s in bars.get_segments()]
    assert lengths[0] == pytest.approx(2 * np.std([45.12, 45.48], ddof=1))
    assert lengths[1:] == [None, None, None]  # one run each: no error bar


def test_dynamic_rho_line_and_the_train_rho_marked(store):
    ax = dynamic_rho(inputs_of(ABLATION, store["uri"])).axes[0]
    series = containers_of(ax)
    (label,) = series
    assert label == "R50 Sparse DETR, trained at ρ 10%"
    xs, ys = series[label]
    mean = {r: (DYNAMIC["sparse_s1"][r] + DYNAMIC["sparse_s2"][r]) * 50 for r in (.2, .3, .5)}
    assert xs == [10, 20, 30, 50]
    assert ys == pytest.approx([(45.12 + 45.48) / 2, mean[.2], mean[.3], mean[.5]])
    star = next(line for line in ax.get_lines() if line.get_marker() == "*")
    assert list(star.get_xdata()) == [10] and star.get_ydata()[0] == pytest.approx(45.3)


def test_encoder_depth_with_and_without_aux_loss(store):
    ax = ap_vs_encoder_depth(inputs_of(ABLATION, store["uri"])).axes[0]
    series = containers_of(ax)
    assert set(series) == {"R50 Sparse DETR ρ 10%, enc. aux loss on",
                           "R50 Sparse DETR ρ 10%, enc. aux loss off"}
    on = series["R50 Sparse DETR ρ 10%, enc. aux loss on"]
    off = series["R50 Sparse DETR ρ 10%, enc. aux loss off"]
    assert on[0] == pytest.approx([3.06, 6.06]) and off[0] == pytest.approx([2.94, 5.94])
    assert on[1] == pytest.approx([44.2, 45.3]) and off[1] == pytest.approx([43.5, 44.8])


def test_corr_over_training_per_selection(store, tmp_path):
    ax = corr_over_training(inputs_of(CORR, store["uri"])).axes[0]
    series = containers_of(ax)
    assert set(series) == {"R50 Sparse DETR ρ 10%, dam selection",
                           "R50 Sparse DETR ρ 10%, objectness selection"}
    for kind in ("dam", "objectness"):
        xs, ys = series[f"R50 Sparse DETR ρ 10%, {kind} selection"]
        assert xs == list(CORR_STEPS)
        assert ys == pytest.approx([v * 100 for v in CORR_VALUES[kind]])
    result = build_report(CORR, store["uri"], tmp_path / "c", ALL_FORMATS)
    assert (tmp_path / "c" / "figures" / "corr_over_training.png").is_file()
    assert not any(line.startswith("Corr") for line in result.figures_skipped)


# ------------------------------------------------------------------------- nothing to draw
def test_single_run_skips_every_figure_with_its_reason(store, tmp_path, caplog):
    out = tmp_path / "single"
    with caplog.at_level(logging.INFO, logger="sdetr.reports.figures"):
        result = build_report(SINGLE, store["uri"], out, ALL_FORMATS)
    assert result.rows == 1 and len(result.figures_skipped) == len(FIGURES)
    index = (out / "index.md").read_text()
    expected = [
        "AP vs GFLOPs: needs >= 2 Table 1 rows with AP and GFLOPs (found 1)",
        "AP vs rho: needs one configuration trained at >= 2 keeping ratios ρ "
        "(0 token-selecting run(s) in Table 1)",
        "Dynamic rho: needs a run evaluated at >= 2 other keeping ratios (eval_rho<r>/AP "
        "metrics from eval.rho_sweep; most found in one run: 0)",
        CORR_SKIP,
        "AP vs encoder depth: needs one Sparse DETR configuration at >= 2 encoder depths or "
        "with and without the encoder auxiliary loss (0 Sparse DETR run(s))",
        "Lite configurations: needs >= 2 Lite-DETR rows (interleaved / sparse_interleaved "
        "encoder) with AP in Table 1 (found 0)"]
    assert list(result.figures_skipped) == expected
    assert [r.getMessage() for r in caplog.records if r.name == "sdetr.reports.figures"] \
        == expected
    for line in expected:
        assert f"- {line}\n" in index
    assert "None: no figure has the runs it needs." in index
    assert sorted(p.name for p in out.iterdir()) == ["index.md", "table1.csv", "table1.md",
                                                     "table1.tex"]


# ------------------------------------------------------------------------- atomic output
def test_a_failing_figure_leaves_the_previous_report_intact(store, tmp_path, monkeypatch):
    out = tmp_path / "rep"
    build_report(ABLATION, store["uri"], out, ALL_FORMATS)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert len(before) == 4 + 2 * len(DRAWN)
    real = __import__("sdetr.reports.figures", fromlist=["encode"]).encode

    def broken(fig: Any, kind: str) -> bytes:
        if kind == "pdf":
            raise RuntimeError("PDF backend failed")
        return real(fig, kind)

    monkeypatch.setattr("sdetr.reports.figures.encode", broken)
    with pytest.raises(RuntimeError, match="PDF backend"):
        build_report(ABLATION, store["uri"], out, ALL_FORMATS)
    monkeypatch.undo()
    calls = {"n": 0}
    write_bytes = Path.write_bytes

    def full_disk(self: Path, data: bytes) -> int:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(OSError, match="disk full"):
        build_report(ABLATION, store["uri"], out, ALL_FORMATS)
    monkeypatch.undo()
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]  # no temporary folders left
