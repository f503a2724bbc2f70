"""Synthetic COCO generator: determinism, format (pycocotools + COCOeval), layout rules, CLI."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import sdetr.data.synth as synth
from sdetr.data import DatasetError, generate_synthetic_coco, synth_main
from sdetr.data.synth_layout import MIN_VISIBLE, _Canvas, area_range


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def val40(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, synth.SynthSummary]:
    out = tmp_path_factory.mktemp("synth") / "ds"
    return out, generate_synthetic_coco(out, num_train=2, num_val=40, seed=5)


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path: Path) -> None:
    kwargs = dict(num_train=4, num_val=3, min_size=96, max_size=200)
    generate_synthetic_coco(tmp_path / "a", seed=11, **kwargs)
    generate_synthetic_coco(tmp_path / "b", seed=11, **kwargs)
    generate_synthetic_coco(tmp_path / "c", seed=12, **kwargs)
    a, b, c = _tree(tmp_path / "a"), _tree(tmp_path / "b"), _tree(tmp_path / "c")
    assert "annotations/instances_val2017.json" in a and "train2017/000000000004.jpg" in a
    assert a == b
    assert a.keys() == c.keys()
    assert a["annotations/instances_train2017.json"] != c["annotations/instances_train2017.json"]
    assert a["val2017/000000000001.jpg"] != c["val2017/000000000001.jpg"]


def test_categories_have_noncontiguous_ids(val40: tuple[Path, synth.SynthSummary]) -> None:
    data = json.loads((val40[0] / "annotations/instances_val2017.json").read_text())
    ids = sorted(c["id"] for c in data["categories"])
    names = [c["name"] for c in data["categories"]]
    assert len(ids) >= 4 and len(set(names)) == len(names)
    assert ids != list(range(ids[0], ids[0] + len(ids)))
    assert val40[1].categories == {c["id"]: c["name"] for c in data["categories"]}


def test_val_split_annotations_follow_the_rules(val40: tuple[Path, synth.SynthSummary]) -> None:
    out, summary = val40
    data = json.loads((out / "annotations/instances_val2017.json").read_text())
    images = {im["id"]: im for im in data["images"]}
    per_image = {i: 0 for i in images}
    for ann in data["annotations"]:
        im = images[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0
        assert x + w <= im["width"] and y + h <= im["height"]
        assert 0 < ann["area"] <= w * h and ann["iscrowd"] == 0
        per_image[ann["image_id"]] += 1
    assert all(1 <= n <= 6 for n in per_image.values())
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
    assert all(160 <= im["width"] <= 320 and 160 <= im["height"] <= 320 for im in images.values())
    assert len({im["width"] / im["height"] for im in images.values()}) > 10
    ranges = {area_range(a["area"]) for a in data["annotations"]}
    assert ranges == {"small", "medium", "large"}
    assert summary.val.images == 40 and summary.val.annotations == len(data["annotations"])
    assert sum(summary.val.per_area.values()) == sum(summary.val.per_category.values())
    for split in ("train2017", "val2017"):
        files = {im["file_name"] for im in json.loads(
            (out / f"annotations/instances_{split}.json").read_text())["images"]}
        assert files == {p.name for p in (out / split).iterdir()}


def test_cocoeval_on_ground_truth_gives_ap_one(val40: tuple[Path, synth.SynthSummary]) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(val40[0] / "annotations/instances_val2017.json"))
        dets = [{"image_id": a["image_id"], "category_id": a["category_id"],
                 "bbox": a["bbox"], "score": 1.0} for a in gt.dataset["annotations"]]
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # AP, AP50, AP75, AP_small, AP_medium, AP_large: -1 would mean "no GT in that range".
    np.testing.assert_allclose(ev.stats[:6], 1.0)


def test_bbox_and_area_are_the_visible_extent() -> None:
    canvas = _Canvas(np.zeros((20, 20, 3), dtype=np.float32))
    square = np.ones((10, 10), dtype=bool)
    assert canvas.try_place((0, 0, 10, 10), square)
    canvas.category_ids.append(7)
    # Covering half of the first square would leave it 50% visible (< 70%): rejected.
    assert not canvas.try_place((0, 5, 10, 10), square)
    assert canvas.try_place((0, 7, 10, 10), square)  # covers 3 rows: 70% stays visible
    canvas.category_ids.append(3)
    first, second = canvas.annotations()
    assert first.bbox == (0.0, 0.0, 10.0, 7.0) and first.area == 70 >= MIN_VISIBLE * 100
    assert second.bbox == (0.0, 7.0, 10.0, 10.0) and second.area == 100
    assert (first.category_id, second.category_id) == (7, 3)


def test_synth_main_is_atomic_and_reuses_same_parameters(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    first = synth_main(str(out), train=3, val=3, seed=1, min_size=64, max_size=128)
    assert first.out_dir == str(out) and first.train.images == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temp dir left
    stamp = (out / "annotations/instances_val2017.json").stat().st_mtime_ns
    again = synth_main(str(out), train=3, val=3, seed=1, min_size=64, max_size=128)
    assert again == first
    assert (out / "annotations/instances_val2017.json").stat().st_mtime_ns == stamp
    with pytest.raises(DatasetError, match="refusing to overwrite .*ds"):
        synth_main(str(out), train=3, val=3, seed=2, min_size=64, max_size=128)


def test_output_of_an_older_generator_is_replaced(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "ds"
    monkeypatch.setattr(synth, "GENERATOR_VERSION", synth.GENERATOR_VERSION - 1)
    synth_main(str(out), train=2, val=2, seed=1, min_size=64, max_size=128)
    (out / "extra.txt").write_text("from the old output")
    monkeypatch.undo()
    synth_main(str(out), train=2, val=2, seed=1, min_size=64, max_size=128)
    meta = synth.read_synth_meta(out)
    assert meta["params"]["generator_version"] == synth.GENERATOR_VERSION
    assert not (out / "extra.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temp dir left
    monkeypatch.setattr(synth, "GENERATOR_VERSION", synth.GENERATOR_VERSION - 1)
    with pytest.raises(DatasetError, match="refusing to overwrite"):  # newer: never downgraded
        synth_main(str(out), train=2, val=2, seed=1, min_size=64, max_size=128)


def test_synth_main_refuses_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(DatasetError, match=re.escape(f"refusing to overwrite {tmp_path}")):
        synth_main(str(tmp_path), train=2, val=2, seed=0)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_synth_main_crash_leaves_nothing_behind(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing_render(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    real = synth.render_image
    monkeypatch.setattr(synth, "render_image", failing_render)
    with pytest.raises(RuntimeError, match="simulated crash"):
        synth_main(str(tmp_path / "ds"), train=4, val=2, seed=0, min_size=64, max_size=96)
    assert list(tmp_path.iterdir()) == []


def test_bad_parameters_are_named() -> None:
    with pytest.raises(ValueError, match="num_val"):
        synth_main("/nonexistent/never", train=1, val=-1, seed=0)
    with pytest.raises(ValueError, match="min_size"):
        synth_main("/nonexistent/never", train=1, val=1, seed=0, min_size=300, max_size=200)
