"""The sweep files under experiments/: each one loads, expands into the runs it is meant to hold
(checked from the resolved configs, not from the file's own axes), and passes the real
``sdetr sweep FILE --dry-run``.

Table 1's expectation is derived from the published table (paper_table1.csv): every row whose
method this suite implements must be a run of experiments/table1.yaml, and nothing else.
"""

from __future__ import annotations

import csv
import itertools
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from sdetr.cli import main
from sdetr.orchestration import RunPlan, expand, load_sweep

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = REPO / "experiments"
ZERO2 = REPO / "orchestration" / "deepspeed" / "zero2.json"
PAPER_TABLE1 = (REPO / "sdetr" / "reports" / "data" / "paper_table1.csv",
                REPO.parent / "shared" / "design" / "paper_table1.csv")
RHOS = [0.1, 0.2, 0.3, 0.4, 0.5]
BACKBONES = {"resnet50": "R50", "swin_t": "Swin-T"}


def _plans(name: str, overrides: Optional[dict[str, Any]] = None) -> list[RunPlan]:
    return expand(load_sweep(EXPERIMENTS / f"{name}.yaml", overrides))


def _paper_csv() -> Optional[Path]:
    return next((p for p in PAPER_TABLE1 if p.is_file()), None)


def _table1_row(plan: RunPlan) -> tuple[str, str, Optional[float], bool]:
    """(backbone, method, rho, Top-k & BBR) of a run, read from its resolved model config in the
    vocabulary of the published table."""
    m = plan.cfg.model
    backbone = BACKBONES[m.backbone.name]
    if m.encoder == "dense" and m.queries == "learned" and not m.box_refine:
        return backbone, "Deformable DETR", None, False
    if m.encoder == "dense" and m.queries == "two_stage" and m.box_refine:
        return backbone, "Deformable DETR two-stage", None, True  # extra: not in Table 1
    if m.encoder == "dense" and m.queries == "topk" and m.box_refine:
        return backbone, "Deformable DETR", None, True  # Efficient DETR as released with SD
    if m.encoder == "sparse" and m.queries == "topk" and m.box_refine and m.enc_aux_loss:
        return backbone, "Sparse DETR", round(m.rho, 3), True
    raise AssertionError(f"{plan.name}: not a Table 1 method ({m.encoder}, {m.queries})")


# ----------------------------------------------------------------------------- every file


def _check_paper_scale(plans: list[RunPlan]) -> None:
    """The official schedule and resources: 50 epochs (drop at 40), total batch 16 = 8 GPU
    workers x 2 images, ZeRO-2 with the repository's zero2.json, COCO, full profiling."""
    for plan in plans:
        t, d = plan.cfg.train, plan.cfg.data
        assert (t.workers, t.epochs, t.lr_drop) == (8, 50, 40), plan.name
        assert (t.batch_size, t.micro_batch_size, t.accumulation_steps) == (16, 2, 1), plan.name
        assert t.use_gpu and t.zero_stage == 2, plan.name
        assert Path(t.deepspeed_config) == ZERO2.resolve(), plan.name
        assert not d.synthetic and Path(d.root).parts[-2:] == ("data", "coco"), plan.name
        assert plan.cfg.profile.what == ["params", "flops", "fps"], plan.name


def _check_smoke(plans: list[RunPlan]) -> None:
    encoders = {p.cfg.model.encoder for p in plans}
    queries = {p.cfg.model.queries for p in plans}
    assert encoders == {"dense", "sparse", "interleaved", "sparse_interleaved"}
    assert {"learned", "topk"} <= queries
    for plan in plans:
        assert plan.cfg.train.workers == 2 and not plan.cfg.train.use_gpu, plan.name
        assert plan.cfg.data.synthetic, plan.name


def _check_table1(plans: list[RunPlan]) -> None:
    _check_paper_scale(plans)
    rows = [_table1_row(p) for p in plans]
    assert len(set(rows)) == len(rows), "a Table 1 row appears twice"
    for backbone in BACKBONES.values():
        assert {r[2] for r in rows if r[0] == backbone and r[1] == "Sparse DETR"} == set(RHOS)
    by_name = {p.name: p for p in plans}
    assert by_name["efficient_detr_swint"].cfg.model.backbone.name == "swin_t"
    assert by_name["sparse_detr_r50-rho0.3"].cfg.model.rho == pytest.approx(0.3)


def _check_selection_criteria(plans: list[RunPlan]) -> None:
    _check_paper_scale(plans)
    got = {(p.cfg.model.token_selection, round(p.cfg.model.rho, 3)) for p in plans}
    assert got == set(itertools.product(["dam", "objectness", "random"], RHOS))
    for plan in plans:
        m = plan.cfg.model
        assert (m.backbone.name, m.encoder, m.queries, m.enc_aux_loss) == \
            ("resnet50", "sparse", "topk", True), plan.name


def _check_enc_aux_loss(plans: list[RunPlan]) -> None:
    _check_paper_scale(plans)
    got = {(p.cfg.model.enc_layers, p.cfg.model.enc_aux_loss) for p in plans}
    assert got == set(itertools.product([6, 12], [True, False]))
    for plan in plans:
        m = plan.cfg.model
        assert m.encoder == "sparse" and m.backbone.name == "resnet50", plan.name
        assert m.num_encoder_layers == m.enc_layers, plan.name


def _check_dynamic_rho(plans: list[RunPlan]) -> None:
    _check_paper_scale(plans)
    assert {p.cfg.model.backbone.name for p in plans} == {"swin_t", "resnet50"}
    for plan in plans:
        assert plan.cfg.model.selects_tokens and plan.cfg.model.rho == pytest.approx(0.3)
        assert plan.cfg.eval.rho_sweep == pytest.approx([i / 10 for i in range(1, 11)])


def _check_lite(plans: list[RunPlan]) -> None:
    _check_paper_scale(plans)
    lite = [p.cfg.model for p in plans if p.cfg.model.encoder == "interleaved"]
    layouts = {(m.lite_high_levels, m.lite_high_updates, m.lite_blocks, m.lite_variant)
               for m in lite}
    # H3L1-(6+1)x1, (3+1)x2, (2+1)x3, H2L2-(2+1)x3, each in the paper's and the code's layout
    assert layouts == {(h, a, b, v) for (h, a, b) in [(3, 6, 1), (3, 3, 2), (3, 2, 3), (2, 2, 3)]
                       for v in ("paper", "code")}
    assert len(lite) == 8
    sparse_lite = [p for p in plans if p.cfg.model.encoder == "sparse_interleaved"]
    assert [p.name for p in sparse_lite] == ["sparse_lite_detr_r50"]
    for plan in plans:
        m = plan.cfg.model
        assert m.backbone.name == "resnet50" and m.attention == "key_aware", plan.name
        assert m.queries == "topk" and m.box_refine, plan.name


EXPECTED: dict[str, tuple[int, Callable[[list[RunPlan]], None]]] = {
    "smoke": (6, _check_smoke),
    "table1": (16, _check_table1),
    "selection_criteria": (15, _check_selection_criteria),
    "enc_aux_loss": (4, _check_enc_aux_loss),
    "dynamic_rho": (2, _check_dynamic_rho),
    "lite": (9, _check_lite),
}
SWEEP_FILES = sorted(p.stem for p in EXPERIMENTS.glob("*.yaml"))


def test_every_sweep_file_has_an_expectation():
    assert SWEEP_FILES == sorted(EXPECTED), "add the new experiments/*.yaml to EXPECTED"


@pytest.mark.parametrize("name", SWEEP_FILES)
def test_sweep_expands_to_the_intended_runs(name):
    count, check = EXPECTED[name]
    plans = _plans(name)
    assert len(plans) == count, [p.name for p in plans]
    assert len({p.name for p in plans}) == count
    assert len({p.config_hash for p in plans}) == count
    check(plans)


@pytest.mark.parametrize("name", sorted(set(SWEEP_FILES) - {"smoke"}))
def test_data_root_is_set_from_the_command_line(name):
    plans = _plans(name, {"data.root": "/datasets/coco"})
    assert {p.cfg.data.root for p in plans} == {"/datasets/coco"}


# ----------------------------------------------------------------------------- Table 1


def _published_rows(path: Path) -> set[tuple[str, str, Optional[float], bool]]:
    """Rows of the published Table 1 that this suite implements (50-epoch Deformable DETR with
    and without Top-k & BBR, and Sparse DETR), as (backbone, method, rho, topk_bbr)."""
    implemented = {"Deformable DETR", "Sparse DETR"}
    rows = set()
    with path.open(newline="") as f:
        for rec in csv.DictReader(f):
            if rec["method"] not in implemented:
                continue
            assert rec["epochs"] == "50", rec
            rho = round(float(rec["rho"]), 3) if rec["rho"] else None
            rows.add((rec["backbone"], rec["method"], rho, rec["topk_bbr"] == "true"))
    return rows


def test_table1_runs_are_the_published_rows():
    path = _paper_csv()
    if path is None:
        pytest.skip("paper_table1.csv not found at "
                    + " or ".join(str(p) for p in PAPER_TABLE1))
    published = _published_rows(path)
    assert len(published) == 14  # 7 implemented rows per backbone
    got = [_table1_row(p) for p in _plans("table1")]
    extras = [r for r in got if r[1] == "Deformable DETR two-stage"]
    assert sorted(r[0] for r in extras) == ["R50", "Swin-T"]
    assert sorted(set(got) - set(extras), key=str) == sorted(published, key=str)


# ----------------------------------------------------------------------------- the real CLI


@pytest.mark.parametrize("name", SWEEP_FILES)
def test_cli_dry_run(name, capsys, monkeypatch, tmp_path):
    names = [p.name for p in _plans(name)]
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)  # relative data.root / output_dir land here, not in the repo
    rc = main(["sweep", str(EXPERIMENTS / f"{name}.yaml"), "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"{len(names)} run(s)" in out
    for run in names:
        assert f"| {run} " in out, run
    if name != "smoke":
        assert "missing" in out  # no COCO under tmp_path: marked, not an error
    assert not any(tmp_path.iterdir()), "a dry run wrote files"
