"""``sdetr report``: a real SQLite MLflow store with runs logged like the engine logs them ->
Table 1 in Markdown / LaTeX / CSV, published numbers beside ours, footnotes from the tags."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import pytest

mlflow = pytest.importorskip("mlflow")

from sdetr.cli import main  # noqa: E402
from sdetr.config import flatten, load_config  # noqa: E402
from sdetr.profiling.protocol import FLOPS_CONVENTION  # noqa: E402
from sdetr.profiling.run import profile_metrics, profile_tags  # noqa: E402
from sdetr.reports import ReportError, build_report, load_published, load_runs  # noqa: E402
from sdetr.reports.render import latex_escape  # noqa: E402
from sdetr.reports.table1 import build_table, split_runs  # noqa: E402

EXPERIMENT = "table1"
AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
HARDWARE = "8x NVIDIA A100_SXM4 80GB (CUDA 12.4)"
GIT_SHA = "0123abc_dirty"
COCO = ["data.root=/datasets/coco", "data.synthetic=false"]


def ap(*values: float) -> dict[str, float]:
    """eval/AP ... eval/APl fractions from the six numbers."""
    return dict(zip(AP_KEYS, values))


# Every run of the store: key -> spec. ``parent``: "live" / "old" (superseded) / None.
RUNS: dict[str, dict[str, Any]] = {
    "sparse_s1": dict(preset="sparse_detr_r50", set=COCO + ["train.seed=1"], parent="live",
                      ap=ap(.4512, .6575, .4910, .2830, .4815, .6003), params=41_670_000,
                      gflops=111.19, published=105.4, fps=25.62),
    "sparse_s2": dict(preset="sparse_detr_r50", set=COCO + ["train.seed=2"], parent="live",
                      ap=ap(.4548, .6611, .4958, .2872, .4851, .6041), params=41_670_000,
                      gflops=111.19, published=105.4, fps=25.18),
    "deformable": dict(preset="deformable_detr_r50", set=COCO, parent="live",
                       ap=ap(.4362, .6244, .4757, .2583, .4711, .5774), params=39_830_000,
                       gflops=172.93, fps=None),
    "efficient": dict(preset="efficient_detr_r50", set=COCO, parent="live",
                      ap=ap(.4571, .6497, .4962, .2807, .4893, .6072), params=40_830_000,
                      gflops=177.33, fps=18.04, threads=4),
    "lite": dict(preset="lite_detr_r50_h3l1_6x1", set=COCO, parent="live",
                 ap=ap(.4904, .6812, .5334, .3066, .5208, .6411), params=41_230_000,
                 gflops=159.61, fps=16.22),
    "synthetic": dict(preset="sparse_detr_r50", set=["data.root=data/synth",
                                                     "data.synthetic=true"], parent="live",
                      ap=ap(.1234, .2345, .1111, -1.0, .1012, .1543), params=41_670_000,
                      gflops=111.19, published=105.4, fps=25.40),
    "failed": dict(preset="sparse_detr_r50", set=COCO + ["model.rho=0.3"], parent="live",
                   status="FAILED", ap=None),
    "no_encoder": dict(preset="deformable_detr_r50", set=COCO, parent="live", drop="model.encoder",
                       ap=ap(.40, .60, .45, .25, .45, .55), params=39_830_000, gflops=172.93),
    "running": dict(preset="deformable_detr_swint", set=COCO, parent="live", status="RUNNING",
                    ap=None),
    "swint_plain": dict(preset="deformable_detr_swint", set=COCO, parent=None,
                        ap=ap(.4588, .6541, .5003, .2702, .4957, .6130), params=40_310_000,
                        gflops=180.40, fps=15.73),
    "superseded": dict(preset="sparse_detr_r50", set=COCO + ["train.seed=1"], parent="old",
                       ap=ap(.0101, .0202, .0303, .0404, .0505, .0606), params=41_670_000,
                       gflops=111.19, fps=25.0),
}


def profile_result(spec: dict[str, Any]) -> dict[str, Any]:
    """A profile like ``sdetr.profiling.profile_model`` returns (the fields the logging reads)."""
    def protocol(measurement: str, size: list[int], convention: str, **extra: Any) -> dict:
        return {"measurement": measurement, "input": "random", "image_size": size,
                "batch_size": 1, "mode": "eval", "modules": "full", "device": "cuda",
                "hardware": "NVIDIA H100 80GB HBM3", "precision": "fp32",
                "kernel_backend": {"ms_deform_attn": "compiled"}, "convention": convention,
                "torch_version": "2.14.0", "threads": spec.get("threads", 8), "notes": [],
                **extra}

    params = spec["params"]
    result: dict[str, Any] = {"params_total": params + 10_000_000, "params_trainable": params,
                              "params_inference": params - 780_000,
                              "params_inference_all": params + 9_000_000}
    flops = {"gflops": spec["gflops"], "groups": {"backbone": 72.99},
             "gflops_inference_only": spec["gflops"] - 1.4,
             "protocol": protocol("flops", [850, 1040], FLOPS_CONVENTION)}
    if spec.get("published"):
        flops["published_protocol"] = {"gflops": spec["published"] + 0.02}
    result["flops"] = flops
    if spec.get("fps"):
        result["fps"] = {"b1": {"fps": spec["fps"], "fps_mean": spec["fps"] - 0.1,
                                "median_ms": 1000 / spec["fps"], "protocol": protocol(
            "fps", [800, 1201], "timed forwards", iterations=300, warmup=5)}}
    return result


def log_run(client: Any, experiment_id: str, name: str, spec: dict[str, Any],
            parent_id: Optional[str]) -> str:
    """One run with the params, metrics and tags the engine (and a sweep) log for it."""
    cfg = load_config(spec["preset"], spec["set"])
    tags = {"sdetr.sweep.run": name, "sdetr.config_hash": f"hash-{name}"} if parent_id else {}
    if parent_id:
        tags.update({"mlflow.parentRunId": parent_id, "sdetr.sweep.name": EXPERIMENT,
                     "sdetr.sweep.axis.preset": spec["preset"]})
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    run_id = run.info.run_id
    params = flatten(cfg)
    params.pop(spec.get("drop", ""), None)
    for chunk in range(0, len(params), 100):
        items = list(params.items())[chunk:chunk + 100]
        client.log_batch(run_id, params=[mlflow.entities.Param(k, v) for k, v in items])
    client.log_batch(run_id, tags=[mlflow.entities.RunTag(k, v) for k, v in {
        "sdetr.git_sha": GIT_SHA, "sdetr.preset": cfg.preset, "sdetr.config_name": cfg.name,
        "sdetr.kernel_backend": "compiled", "sdetr.world_size": "8", "sdetr.device": "cuda",
        "sdetr.hardware": HARDWARE, "sdetr.torch_version": "2.14.0"}.items()])
    if spec["ap"] is not None:
        epochs = cfg.train.epochs
        metrics = [mlflow.entities.Metric(f"eval/{k}", v / 2, 0, epochs - 1)
                   for k, v in spec["ap"].items()]  # an earlier epoch: not the reported one
        metrics += [mlflow.entities.Metric(f"eval/{k}", v, 0, epochs)
                    for k, v in spec["ap"].items()]
        metrics.append(mlflow.entities.Metric("eval/seconds", 321.0, 0, epochs))
        result = profile_result(spec)
        metrics += [mlflow.entities.Metric(f"profile/{k}", v, 0, epochs)
                    for k, v in profile_metrics(result).items()]
        client.log_batch(run_id, metrics=metrics, tags=[
            mlflow.entities.RunTag(k, v) for k, v in profile_tags(result).items()])
    status = spec.get("status", "FINISHED")
    if status == "RUNNING":
        return run_id
    client.set_terminated(run_id, status)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict[str, Any]:
    """URI, run ids and a client of a store with EXPERIMENT (the RUNS) and two experiments
    that have no finished run."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment(EXPERIMENT, artifact_location=(root / "a").as_uri())
    parents = {}
    for key in ("old", "live"):  # the old parent first: --force superseded it
        parent = client.create_run(exp, run_name=EXPERIMENT, tags={
            "sdetr.sweep.role": "parent", "sdetr.sweep.name": EXPERIMENT})
        parents[key] = parent.info.run_id
    client.set_tag(parents["old"], "sdetr.sweep.superseded_by", parents["live"])
    ids = {name: log_run(client, exp, name, spec, parents.get(spec["parent"]))
           for name, spec in RUNS.items()}
    for key in ("old", "live"):
        client.set_terminated(parents[key], "FINISHED")
    empty = client.create_experiment("no_finished", artifact_location=(root / "b").as_uri())
    client.create_run(empty, run_name="still-running")
    client.create_experiment("no_runs", artifact_location=(root / "c").as_uri())
    return {"uri": uri, "ids": ids, "parents": parents, "root": root}


@pytest.fixture(scope="module")
def report(store, tmp_path_factory) -> dict[str, Any]:
    """The report of EXPERIMENT, written once through the CLI."""
    out = tmp_path_factory.mktemp("reports") / "table1"
    code = main(["report", "--experiment", EXPERIMENT, "--tracking-uri", store["uri"],
                 "--out", str(out)])
    assert code == 0
    return {"out": out, "md": (out / "table1.md").read_text(),
            "tex": (out / "table1.tex").read_text(), "index": (out / "index.md").read_text(),
            "csv": pd.read_csv(out / "table1.csv")}


# ------------------------------------------------------------------------- parsing helpers
def md_sections(text: str) -> dict[str, list[dict[str, str]]]:
    """``## title`` -> rows of the Markdown table under it (header -> cell)."""
    out: dict[str, list[dict[str, str]]] = {}
    title, header = None, None
    for line in text.splitlines():
        if line.startswith("## "):
            title, header = line[3:], None
            out[title] = []
        elif line.startswith("|") and title is not None:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            elif not set(line) <= set("|-: "):
                out[title].append(dict(zip(header, cells)))
    return out


def rows_after(rows: list[dict[str, str]], method: str) -> list[dict[str, str]]:
    """The row of ``method`` and the paper / Δ rows under it."""
    start = next(i for i, r in enumerate(rows) if r["Method"] == method)
    block = [rows[start]]
    for row in rows[start + 1:]:
        if row["Method"]:
            break
        block.append(row)
    return block


def csv_row(frame: pd.DataFrame, section: str, method: str) -> pd.Series:
    (index,) = frame.index[(frame["section"] == section) & (frame["method"] == method)]
    return frame.loc[index]


def pct(spec_name: str, key: str) -> float:
    return RUNS[spec_name]["ap"][key] * 100


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values)


# ------------------------------------------------------------------------- runs
def test_load_runs_uses_the_live_sweep_and_plain_runs(store):
    runs = load_runs(EXPERIMENT, store["uri"])
    ids = set(runs["run_id"])
    assert store["ids"]["superseded"] not in ids
    assert not set(store["parents"].values()) & ids
    assert {store["ids"][k] for k in RUNS if k != "superseded"} == ids
    row = runs.set_index("run_id").loc[store["ids"]["sparse_s1"]]
    assert row["metrics.eval/AP"] == RUNS["sparse_s1"]["ap"]["AP"]  # the last epoch's value
    assert row["params.model.encoder"] == "sparse"


def test_load_runs_errors_are_one_line_report_errors(store, tmp_path):
    with pytest.raises(ReportError, match="no experiment named 'nope'"):
        load_runs("nope", store["uri"])
    with pytest.raises(ReportError, match="no finished runs"):
        load_runs("no_finished", store["uri"])
    missing = tmp_path / "absent.db"
    with pytest.raises(ReportError, match="does not exist"):
        load_runs(EXPERIMENT, f"sqlite:///{missing}")
    assert not missing.exists()  # MLflow would have created an empty store


# ------------------------------------------------------------------------- the numbers
def test_seed_repeats_are_mean_and_sample_std_in_md_tex_csv(report):
    names = ("sparse_s1", "sparse_s2")
    row = csv_row(report["csv"], "R50", "Sparse DETR")
    assert row["n"] == 2 and row["seeds"] == "1,2" and row["rho"] == pytest.approx(0.1)
    md = rows_after(md_sections(report["md"])["R50"], "Sparse DETR")[0]
    assert md["ρ"] == "10%" and md["Top-k & BBR"] == "✓" and md["n"] == "2"
    tex = next(line for line in report["tex"].splitlines() if line.startswith("Sparse DETR &"))
    tex_cells = [c.strip() for c in tex.removesuffix(r"\\").split(" & ")]
    for i, key in enumerate(AP_KEYS):
        mean, std = mean_std([pct(n, key) for n in names])
        assert row[key] == pytest.approx(mean) and row[f"{key}_std"] == pytest.approx(std)
        assert md[key] == f"{mean:.1f} ± {std:.1f}"
        assert tex_cells[6 + i].replace(r"\textbf{", "").replace("}", "") == \
            rf"{mean:.1f} $\pm$ {std:.1f}"
    fps_mean, fps_std = mean_std([RUNS[n]["fps"] for n in names])
    assert row["fps"] == pytest.approx(fps_mean) and row["fps_std"] == pytest.approx(fps_std)
    assert md["FPS"] == f"{fps_mean:.1f} ± {fps_std:.1f}"
    assert row["params_M_std"] == 0.0
    assert row["params_M"] == pytest.approx(41.67) and md["Params (M)"] == "41.7 ± 0.0"
    assert row["gflops_published_protocol"] == pytest.approx(105.42)


def logged(spec: dict[str, Any], key: str) -> Optional[float]:
    """The value a run logged for the table column ``key``, in the table's unit."""
    if key in AP_KEYS:
        value = spec["ap"][key]
        return None if value < 0 else value * 100
    return {"params_M": spec["params"] / 1e6, "gflops": spec["gflops"],
            "fps": spec.get("fps")}[key]


def test_every_number_matches_the_logged_values(report, store):
    frame = report["csv"]
    md_ours = [row for rows in md_sections(report["md"]).values() for row in rows
               if row["Source"] == "ours"]
    tex_ours = [[c.strip() for c in line.removesuffix(r"\\").split(" & ")][6:]
                for line in report["tex"].splitlines() if " & ours & " in line]
    assert len(md_ours) == len(tex_ours) == len(frame) == 6
    by_id = {run_id: name for name, run_id in store["ids"].items()}
    keys = [*AP_KEYS, "params_M", "gflops", "fps"]
    labels = [*AP_KEYS, "Params (M)", "GFLOPs", "FPS"]
    for (_, row), md, tex in zip(frame.iterrows(), md_ours, tex_ours):
        specs = [RUNS[by_id[run_id]] for run_id in row["run_ids"].split(",")]
        assert row["n"] == len(specs) and md["n"] == str(len(specs))
        for key, label, tex_cell in zip(keys, labels, tex):
            values = [v for v in (logged(s, key) for s in specs) if v is not None]
            tex_cell = tex_cell.replace(r"\textbf{", "").replace("}", "", 1) \
                if tex_cell.startswith(r"\textbf{") else tex_cell
            if not values:
                assert math.isnan(row[key]) and md[label] == "–" and tex_cell == "--"
                continue
            mean = statistics.mean(values)
            std = statistics.stdev(values) if len(values) > 1 else None
            assert row[key] == pytest.approx(mean)
            assert md[label] == f"{mean:.1f}" + (f" ± {std:.1f}" if std is not None else "")
            assert tex_cell == f"{mean:.1f}" + (rf" $\pm$ {std:.1f}" if std is not None else "")


def test_labels_of_lite_variants_and_rows_differing_in_other_params():
    def run(run_id: str, preset: str, *overrides: str) -> dict[str, Any]:
        params = flatten(load_config(preset, [*COCO, *overrides]))
        return {"run_id": run_id, "status": "FINISHED", "run_name": run_id,
                "metrics.eval/AP": 0.5, **{f"params.{k}": v for k, v in params.items()}}

    runs = pd.DataFrame([run("a", "lite_detr_r50_h3l1_6x1_code"),
                         run("b", "sparse_lite_detr_r50"),
                         run("c", "deformable_detr_r50", "train.lr=0.0001"),
                         run("d", "deformable_detr_r50"),
                         run("e", "deformable_detr_r50_two_stage"),
                         run("f", "deformable_detr_r50_refine")])
    placed, rejected = split_runs(runs)
    assert not rejected
    table = build_table(placed).set_index("run_ids")
    assert table.loc["a", "method"] == "Lite-DETR H3L1-(6)×1 (code)"
    assert table.loc["b", "method"].startswith("Sparse Lite-DETR H")
    assert table.loc["b", "rho"] == pytest.approx(0.1)
    assert table.loc["c", "variant"] == "train.lr=0.0001"
    assert table.loc["d", "variant"] == "train.lr=0.0002"
    assert table.loc["e", "method"] == "Deformable DETR (two-stage)"
    assert table.loc["f", "method"] == "Deformable DETR (+ refine)"
    assert list(table.index) == ["c", "d", "f", "e", "a", "b"]  # the paper's order


def test_single_runs_and_missing_fps(report):
    frame = report["csv"]
    rows = md_sections(report["md"])["R50"]
    deformable = rows_after(rows, "Deformable DETR")
    ours = deformable[0]
    assert ours["Top-k & BBR"] == "" and ours["n"] == "1" and ours["ρ"] == ""
    assert ours["FPS"] == "–"
    assert deformable[1]["FPS"] == "19.1" and deformable[2]["FPS"] == "–"  # paper, Δ
    for key in AP_KEYS:
        assert ours[key] == f"{pct('deformable', key):.1f}"
    row = frame[(frame["method"] == "Deformable DETR") & ~frame["topk_bbr"]
                & (frame["section"] == "R50")].iloc[0]
    assert math.isnan(row["fps"]) and row["gflops"] == pytest.approx(172.93)
    lite = rows_after(rows, "Lite-DETR H3L1-(6+1)×1")
    assert len(lite) == 1  # no published row for it: no paper / Δ rows
    assert lite[0]["AP"] == f"{pct('lite', 'AP'):.1f}"
    swin = rows_after(md_sections(report["md"])["Swin-T"], "Deformable DETR")
    assert swin[0]["AP"] == f"{pct('swint_plain', 'AP'):.1f}"  # a run without a sweep parent


def test_published_values_and_differences(report):
    published = load_published().set_index(["backbone", "method", "epochs", "topk_bbr"])
    frame = report["csv"]
    rows = md_sections(report["md"])["R50"]
    for name, method, topk in (("efficient", "Deformable DETR", True),
                               ("deformable", "Deformable DETR", False)):
        paper = published.loc[("R50", method, 50, topk)]
        row = frame[(frame["section"] == "R50") & (frame["method"] == method)
                    & (frame["topk_bbr"] == topk)].iloc[0]
        block = next(b for b in (rows_after(rows[i:], method) for i in range(len(rows))
                                 if rows[i]["Method"] == method)
                     if (b[0]["Top-k & BBR"] == "✓") == topk)
        assert [r["Source"] for r in block] == ["ours", "paper", "Δ"]
        assert bool(row["paper_match"])
        for key in AP_KEYS:
            ours = pct(name, key)
            assert row[f"{key}_paper"] == pytest.approx(paper[key])
            assert row[f"{key}_delta"] == pytest.approx(ours - paper[key])
            assert block[1][key] == f"{paper[key]:.1f}"
            assert float(block[2][key]) == pytest.approx(ours - paper[key], abs=0.051)
        assert row["params_M_delta"] == pytest.approx(RUNS[name]["params"] / 1e6
                                                      - paper["params_M"])
        assert float(block[2]["GFLOPs"]) == pytest.approx(RUNS[name]["gflops"]
                                                          - paper["gflops"], abs=0.051)
    sparse = csv_row(frame, "R50", "Sparse DETR")
    assert sparse["AP_paper"] == 45.3 and sparse["fps_paper"] == 26.5
    assert "Sparse DETR Table 1 + README" in sparse["paper_source"]


def test_synthetic_run_has_no_published_comparison_and_is_footnoted(report):
    sections = md_sections(report["md"])
    title = next(t for t in sections if t.startswith("R50 (synthetic data)"))
    assert title.endswith("†")
    block = rows_after(sections[title], "Sparse DETR")
    assert len(block) == 1  # matches a published key, but synthetic: no paper / Δ rows
    assert block[0]["APs"] == "–"  # pycocotools' -1: nothing to average
    assert block[0]["AP"] == f"{pct('synthetic', 'AP'):.1f}"
    row = report["csv"][report["csv"]["synthetic"]].iloc[0]
    assert not row["paper_match"] and math.isnan(row["AP_paper"]) and math.isnan(row["AP_delta"])
    assert "synthetic" in row["no_comparison"]
    notes = report["md"].split("## Notes")[1]
    assert "- † trained and evaluated on synthetic data" in notes
    assert "synthetic (data.root=data/synth, evaluated on val2017) (1 run)" in notes


def test_footnotes_come_from_the_tags(report):
    notes = report["md"].split("## Notes")[1]
    assert FLOPS_CONVENTION in notes and "850x1040" in notes and "800x1201" in notes
    assert "300 timed forwards after 5 warm-up" in notes
    assert "device cuda (NVIDIA H100 80GB HBM3), precision fp32" in notes
    assert "4 (1 run); 8 (5 runs) thread(s)" in notes  # runs disagree: every value listed
    assert "kernels ms_deform_attn=compiled" in notes
    assert f"Training hardware: {HARDWARE}" in notes and GIT_SHA in notes
    assert "800×1066" in notes and "inference-only" in notes
    assert "R50 ρ 10%: 105.4 (paper 105.4)" in notes
    assert "COCO (data.root=/datasets/coco, evaluated on val2017) (6 runs)" in notes


def test_latex_booktabs_escaping_and_bold_best(report):
    tex = report["tex"]
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}"):
        assert rule in tex
    assert r"Top-k \& BBR" in tex and r"10\%" in tex and r"\checkmark" in tex
    assert r"Lite-DETR H3L1-(6+1)$\times$1" in tex
    assert latex_escape(HARDWARE) in tex and r"A100\_SXM4" in tex
    assert r"ms\_deform\_attn=compiled" in tex and r"0123abc\_dirty" in tex
    assert "_" not in tex.replace(r"\_", "").replace("$_{", "").replace("$_S", "") \
        .replace("$_M", "").replace("$_L", "")
    lines = tex.splitlines()
    r50 = lines[lines.index(r"\multicolumn{15}{l}{\textit{R50}} \\"):
                lines.index(r"\multicolumn{15}{l}{\textit{R50 (synthetic data) $^\dagger$}} \\")]
    rows = [[c.strip() for c in line.removesuffix(r"\\").split(" & ")]
            for line in r50 if " & ours & " in line]
    ours = {(cells[0], bool(cells[3])): cells for cells in rows}
    assert len(ours) == len(rows) == 4
    ap_col, params_col, fps_col = 6, 12, 14
    lite = ours[(r"Lite-DETR H3L1-(6+1)$\times$1", True)]
    assert lite[ap_col] == rf"\textbf{{{pct('lite', 'AP'):.1f}}}"  # the best AP of R50
    assert ours[("Sparse DETR", True)][fps_col].startswith(r"\textbf{25.4}")  # highest FPS
    assert ours[("Deformable DETR", False)][params_col] == r"\textbf{39.8}"  # fewest params
    assert sum(r"\textbf" in cells[ap_col] for cells in ours.values()) == 1
    assert ours[("Deformable DETR", False)][fps_col] == "--"


def test_index_lists_runs_not_placed(report, store):
    index = report["index"]
    for link in ("table1.md", "table1.tex", "table1.csv"):
        assert f"]({link})" in index
    assert f"Experiment: `{EXPERIMENT}`" in index and store["uri"] in index
    assert "Generated: " in index and store["parents"]["live"] in index
    assert "left out: 1 run(s) of older or superseded sweep parents" in index
    not_placed = index.split("## Runs not placed (3)")[1]
    assert "FAILED" in not_placed and "RUNNING" in not_placed
    assert "missing param(s) model.encoder" in not_placed
    for name in ("failed", "running", "no_encoder"):
        assert store["ids"][name] in not_placed
    everything = index + report["md"] + report["csv"].to_csv()
    assert store["ids"]["superseded"] not in everything


# ------------------------------------------------------------------------- the CLI
def test_cli_writes_the_asked_formats_and_replaces_a_previous_report(store, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", "--experiment", EXPERIMENT, "--tracking-uri", store["uri"],
                 "--out", str(out), "--format", "md"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["index.md", "table1.md"]
    assert str(out / "table1.md") in capsys.readouterr().out
    assert main(["report", "--experiment", EXPERIMENT, "--tracking-uri", store["uri"],
                 "--out", str(out), "--format", "csv,tex"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["index.md", "table1.csv", "table1.tex"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]  # no temporary folders left


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative POSIX path -> content)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_failing_report_leaves_the_previous_one_intact(store, tmp_path, monkeypatch):
    out = tmp_path / "rep"
    build_report(EXPERIMENT, store["uri"], out)
    before = _folder_bytes(out)
    assert "figures/ap_vs_gflops.png" in before  # the default formats include the figures

    def broken(table: pd.DataFrame) -> str:
        raise RuntimeError("disk full")

    monkeypatch.setattr("sdetr.reports.build.render_csv", broken)
    with pytest.raises(RuntimeError):
        build_report(EXPERIMENT, store["uri"], out)
    assert _folder_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ReportError, match="not an sdetr report folder"):
        build_report(EXPERIMENT, store["uri"], tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("experiment, uri, expected", [
    ("nope", None, "no experiment named 'nope'"),
    ("no_finished", None, "no finished runs (1 RUNNING)"),
    ("no_runs", None, "no finished runs (no runs)"),
    (EXPERIMENT, "http://127.0.0.1:9", "http://127.0.0.1:9"),
])
def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(store, tmp_path, capsys,
                                                             experiment, uri, expected):
    out = tmp_path / "out"
    code = main(["report", "--experiment", experiment, "--tracking-uri", uri or store["uri"],
                 "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("sdetr: error: ") and expected in err[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_unknown_format_and_default_tracking_uri(store, tmp_path, monkeypatch, capsys):
    assert main(["report", "--experiment", EXPERIMENT, "--tracking-uri", store["uri"],
                 "--format", "md,pdf", "--out", str(tmp_path / "x")]) == 2
    assert "unknown format pdf" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    assert main(["report", "--experiment", EXPERIMENT]) == 0
    assert (tmp_path / "reports" / EXPERIMENT / "index.md").is_file()
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert main(["report", "--experiment", EXPERIMENT]) == 2  # sqlite:///mlflow.db: absent
    assert "mlflow.db does not exist" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()
