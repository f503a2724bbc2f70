"""COCO reader, validation, §1.2 transforms and padded collation."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdetr.data import (
    CocoDetection,
    DatasetError,
    coco_paper_defaults,
    collate_detection,
    generate_synthetic_coco,
    make_eval_transforms,
    make_train_transforms,
    resized_size,
    validate_dataset,
)
from sdetr.data.transforms import RandomSizeCrop, crop, hflip

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("coco") / "ds"
    generate_synthetic_coco(out, num_train=8, num_val=6, seed=2)
    return out


def _val(root: Path, transforms) -> CocoDetection:  # type: ignore[no-untyped-def]
    return CocoDetection(root / "val2017", root / "annotations/instances_val2017.json",
                         transforms)


def _write_coco(root: Path, images: list[dict], anns: list[dict]) -> Path:
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns,
                                    "categories": [{"id": 5, "name": "a"},
                                                   {"id": 9, "name": "b"}]}))
    return ann_file


@pytest.fixture()
def handmade(tmp_path: Path) -> tuple[Path, Path]:
    """Image 1 (40x30): a normal box, a crowd box, a zero-width box, a box past the right
    edge. Image 2 (20x20): no annotations."""
    Image.new("RGB", (40, 30), (10, 20, 30)).save(tmp_path / "a.png")
    Image.new("RGB", (20, 20), (200, 0, 0)).save(tmp_path / "b.png")
    images = [{"id": 2, "file_name": "b.png", "width": 20, "height": 20},
              {"id": 1, "file_name": "a.png", "width": 40, "height": 30}]
    anns = [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [2, 3, 10, 8], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 9, "bbox": [0, 0, 30, 30], "iscrowd": 1},
            {"id": 3, "image_id": 1, "category_id": 9, "bbox": [5, 5, 0, 4], "iscrowd": 0},
            {"id": 4, "image_id": 1, "category_id": 9, "bbox": [30, 10, 20, 5]}]
    return tmp_path, _write_coco(tmp_path, images, anns)


def test_eval_items_match_the_json(synth_root: Path) -> None:
    ds = _val(synth_root, make_eval_transforms(200, 333))
    assert ds.ids == sorted(ds.ids) and len(ds) == 6 and ds.num_classes == 24
    for index in range(len(ds)):
        image, target = ds[index]
        info = ds.coco.imgs[ds.ids[index]]
        h, w = target["size"].tolist()
        assert image.shape == (3, h, w) and image.dtype == torch.float32
        assert (w, h) == resized_size(info["width"], info["height"], 200, 333)
        assert target["orig_size"].tolist() == [info["height"], info["width"]]
        assert int(target["image_id"]) == info["id"]
        anns = ds.coco.imgToAnns[info["id"]]
        assert target["labels"].tolist() == [a["category_id"] for a in anns]
        cx, cy, bw, bh = target["boxes"].double().unbind(-1)
        back = torch.stack([(cx - bw / 2) * info["width"], (cy - bh / 2) * info["height"],
                            bw * info["width"], bh * info["height"]], dim=-1)
        expected = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64)
        torch.testing.assert_close(back, expected, atol=1e-3, rtol=0)


def test_image_is_imagenet_normalised(handmade: tuple[Path, Path]) -> None:
    root, ann_file = handmade
    ds = CocoDetection(root, ann_file, make_eval_transforms(20, 100))
    assert ds.ids == [1, 2]  # sorted, although the JSON lists image 2 first
    image, target = ds[1]
    assert image.shape == (3, 20, 20)  # already at size: no resize
    expected = (torch.tensor([200.0, 0.0, 0.0]).view(3, 1, 1) / 255 - MEAN) / STD
    torch.testing.assert_close(image, expected.expand(3, 20, 20))
    assert target["boxes"].shape == (0, 4) and target["labels"].dtype == torch.int64


def test_reader_removes_crowd_and_degenerate_and_clips(handmade: tuple[Path, Path]) -> None:
    root, ann_file = handmade
    ds = CocoDetection(root, ann_file, make_eval_transforms(30, 1000))
    raw_image, raw = ds.load_raw(0)
    assert raw_image.size == (40, 30)
    assert raw["labels"].tolist() == [5, 9]
    torch.testing.assert_close(raw["boxes"], torch.tensor([[2.0, 3, 12, 11], [30, 10, 40, 15]]))
    _, target = ds[0]
    torch.testing.assert_close(target["boxes"], torch.tensor(
        [[7 / 40, 7 / 30, 10 / 40, 8 / 30], [35 / 40, 12.5 / 30, 10 / 40, 5 / 30]]))


def test_validate_dataset_counts(handmade: tuple[Path, Path]) -> None:
    root, ann_file = handmade
    report = validate_dataset(root, ann_file)
    assert (report.images, report.annotations, report.categories) == (2, 4, 2)
    assert report.images_without_annotations == 1 and report.images_without_boxes == 1
    assert (report.crowd_annotations, report.degenerate_boxes, report.clipped_boxes) == (1, 1, 1)
    assert report.ok and report.errors == []
    (root / "a.png").write_bytes(b"not an image at all")
    (root / "b.png").unlink()
    for decode in (False, True):
        bad = validate_dataset(root, ann_file, decode=decode)
        assert bad.missing_images == [str(root / "b.png")]
        assert len(bad.corrupt_images) == 1 and str(root / "a.png") in bad.corrupt_images[0]
        assert not bad.ok and len(bad.errors) == 2


def test_corrupt_and_missing_images_raise_on_load(handmade: tuple[Path, Path]) -> None:
    root, ann_file = handmade
    (root / "a.png").write_bytes(b"\xff\xd8garbage bytes, not a jpeg")
    ds = CocoDetection(root, ann_file, make_eval_transforms(30, 1000))  # does not raise yet
    with pytest.raises(DatasetError, match=re.escape(f"cannot read image {root / 'a.png'}")):
        ds[0]
    (root / "b.png").unlink()
    with pytest.raises(DatasetError, match=re.escape(f"image file not found: {root / 'b.png'}")):
        ds[1]
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (90, 10, 10)).save(buffer, format="JPEG")
    (root / "a.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # truncated
    with pytest.raises(DatasetError, match="cannot read image .*a.png"):
        ds[0]
    for decode in (False, True):
        assert len(validate_dataset(root, ann_file, decode=decode).corrupt_images) == 1


def test_image_size_mismatch_is_an_error(handmade: tuple[Path, Path]) -> None:
    root, ann_file = handmade
    Image.new("RGB", (41, 30)).save(root / "a.png")
    with pytest.raises(DatasetError, match="a.png is 41x30 but the annotation file says 40x30"):
        CocoDetection(root, ann_file, make_eval_transforms(30, 1000))[0]


@pytest.mark.parametrize("content, message", [
    (None, "annotation file not found"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "top level is not an object"),
    ('{"images": [], "annotations": []}', "missing categories"),
    ('{"images": [{"id": 1}], "annotations": [], "categories": []}', r"images\[0\] lacks"),
    ('{"images": [], "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2]}],'
     ' "categories": []}', r"annotations\[0\].bbox is not 4 numbers"),
])
def test_bad_annotation_file_is_named(tmp_path: Path, content: str | None, message: str) -> None:
    ann_file = tmp_path / "instances.json"
    if content is not None:
        ann_file.write_text(content)
    with pytest.raises(DatasetError, match=message) as info:
        CocoDetection(tmp_path, ann_file, make_eval_transforms(30, 1000))
    assert str(ann_file) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DatasetError):
        validate_dataset(tmp_path, ann_file)


@pytest.mark.parametrize("wh, size, max_size, expected", [
    ((640, 426), 800, 1333, (1201, 800)),   # COCO val image 139
    ((426, 640), 800, 1333, (800, 1201)),
    ((1000, 200), 800, 1333, (1335, 267)),  # max_size adjustment; the rounding overshoots
    ((2000, 1000), 800, 1333, (1332, 666)),  # round(666.5) == 666 (Python rounds half-even)
    ((800, 600), 600, 1000, (800, 600)),    # already at size: unchanged
    ((500, 400), 800, None, (1000, 800)),   # no max size
])
def test_resize_rule(wh: tuple[int, int], size: int, max_size: int | None,
                     expected: tuple[int, int]) -> None:
    assert resized_size(wh[0], wh[1], size, max_size) == expected


def test_paper_defaults() -> None:
    p = coco_paper_defaults()
    assert p.scales == [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800]
    assert (p.max_size, p.crop_scales, p.crop_min, p.crop_max) == (1333, [400, 500, 600], 384, 600)
    assert (p.eval_size, p.eval_max_size) == (800, 1333)


def test_hflip_mirrors_image_and_boxes() -> None:
    pixels = np.zeros((6, 10, 3), dtype=np.uint8)
    pixels[2:5, 1:4] = 255  # the object covers columns 1..3, rows 2..4
    target = {"boxes": torch.tensor([[1.0, 2.0, 4.0, 5.0]]), "labels": torch.tensor([3])}
    image, flipped = hflip(Image.fromarray(pixels), target)
    torch.testing.assert_close(flipped["boxes"], torch.tensor([[6.0, 2.0, 9.0, 5.0]]))
    cols = np.flatnonzero(np.asarray(image)[..., 0].any(axis=0))
    assert (cols[0], cols[-1] + 1) == (6, 9)
    image2, twice = hflip(image, flipped)
    assert np.array_equal(np.asarray(image2), pixels)
    torch.testing.assert_close(twice["boxes"], target["boxes"])


def test_crop_clamps_and_drops_empty_boxes() -> None:
    boxes = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [5, 5, 25, 25], [12, 0, 18, 4]])
    target = {"boxes": boxes, "labels": torch.tensor([1, 2, 3, 4])}
    image, out = crop(Image.new("RGB", (40, 40)), target, (0, 2, 15, 14))  # x 2..16, y 0..15
    assert image.size == (14, 15)
    torch.testing.assert_close(out["boxes"], torch.tensor(
        [[0.0, 0, 8, 10], [3, 5, 14, 15], [10, 0, 14, 4]]))
    assert out["labels"].tolist() == [1, 3, 4]


def test_random_size_crop_respects_bounds() -> None:
    torch.manual_seed(0)
    t = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64)}
    for _ in range(50):
        image, _ = RandomSizeCrop(30, 50)(Image.new("RGB", (45, 80)), t)
        assert 30 <= image.width <= 45 and 30 <= image.height <= 50
    image, _ = RandomSizeCrop(30, 50)(Image.new("RGB", (20, 25)), t)  # smaller than min
    assert image.size == (20, 25)


def test_train_transforms_keep_boxes_valid(synth_root: Path) -> None:
    scales = [224, 256, 288, 320]
    ds = CocoDetection(synth_root / "train2017",
                       synth_root / "annotations/instances_train2017.json",
                       make_train_transforms(scales, 512, [200, 250, 300], 160, 300))
    torch.manual_seed(0)
    seen_sizes = set()
    for _ in range(3):
        for index in range(len(ds)):
            image, target = ds[index]
            h, w = target["size"].tolist()
            assert image.shape == (3, h, w) and max(h, w) <= 512 + 2
            assert min(h, w) in scales or max(h, w) >= 510  # else the max_size rule applied
            cx, cy, bw, bh = target["boxes"].unbind(-1)
            assert bool((bw > 0).all() and (bh > 0).all())
            assert bool(((cx - bw / 2) >= -1e-6).all() and ((cx + bw / 2) <= 1 + 1e-6).all())
            assert bool(((cy - bh / 2) >= -1e-6).all() and ((cy + bh / 2) <= 1 + 1e-6).all())
            assert len(target["labels"]) == len(target["boxes"])
            seen_sizes.add((h, w))
    assert len(seen_sizes) > 5


def test_train_transforms_are_reproducible_under_seed(synth_root: Path) -> None:
    ds = CocoDetection(synth_root / "train2017",
                       synth_root / "annotations/instances_train2017.json",
                       coco_paper_defaults().train_transforms())
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append([ds[i] for i in range(3)])
    for (im_a, t_a), (im_b, t_b) in zip(*runs):
        assert torch.equal(im_a, im_b) and torch.equal(t_a["boxes"], t_b["boxes"])


def test_collate_pads_bottom_right_with_mask() -> None:
    a, b = torch.rand(3, 4, 5) + 1, torch.rand(3, 6, 3) + 1
    batch = collate_detection([(a, {"id": torch.tensor(0)}), (b, {"id": torch.tensor(1)})])
    assert batch.images.shape == (2, 3, 6, 5) and batch.masks.shape == (2, 6, 5)
    assert torch.equal(batch.images[0, :, :4, :5], a) and torch.equal(batch.images[1, :, :, :3], b)
    assert batch.images[0, :, 4:].abs().sum() == 0 and batch.images[1, :, :, 3:].abs().sum() == 0
    expected = torch.ones(2, 6, 5, dtype=torch.bool)
    expected[0, :4, :5] = False
    expected[1, :6, :3] = False
    assert torch.equal(batch.masks, expected)
    assert [int(t["id"]) for t in batch.targets] == [0, 1]
    images, masks, _ = collate_detection([(a, {}), (b, {})], size_divisibility=4)
    assert images.shape == (2, 3, 8, 8) and masks[:, 6:, :].all() and masks[:, :, 5:].all()
    with pytest.raises(ValueError, match="empty batch"):
        collate_detection([])
