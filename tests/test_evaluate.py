"""COCO evaluation: metrics against hand-made detections of known AP, evaluate() end to end,
the Sparse DETR keeping-ratio sweep, and the dataset/loader builders."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DistributedSampler, Subset

from sdetr.config import load_config
from sdetr.data import DatasetError, DetectionBatch, generate_synthetic_coco, load_coco_api
from sdetr.engine import (METRIC_KEYS, build_dataset, build_loader, coco_metrics,
                          ensure_dataset, evaluate, evaluate_rho_sweep, set_loader_epoch,
                          to_coco_detections)
from sdetr.engine.data import ASPECT_BINS, AspectBatchSampler, aspect_ratios
from sdetr.models import build

SYNTH_IDS = [3, 7, 12, 18, 23]
TINY = ["model.hidden_dim=64", "model.nheads=4", "model.dim_feedforward=128",
        "model.enc_layers=1", "model.dec_layers=1", "model.num_queries=20",
        "data.eval_size=128", "data.eval_max_size=160", "eval.batch_size=6"]


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "ds"
    generate_synthetic_coco(root, num_train=0, num_val=12, seed=0)
    return root


@pytest.fixture(scope="module")
def coco_gt(synth_root):
    return load_coco_api(synth_root / "annotations" / "instances_val2017.json")


def _gt_detections(coco_gt, shift_fraction: float = 0.0, category_map=None) -> list[dict]:
    """One detection per ground-truth box, moved right by ``shift_fraction`` of its width."""
    dets = []
    for i, ann in enumerate(sorted(coco_gt.anns.values(), key=lambda a: a["id"])):
        x, y, w, h = ann["bbox"]
        cat = ann["category_id"] if category_map is None else category_map[ann["category_id"]]
        dets.append({"image_id": ann["image_id"], "category_id": cat,
                     "bbox": [x + shift_fraction * w, y, w, h], "score": 1.0 - i * 1e-4})
    return dets


def test_perfect_detections_score_one(coco_gt):
    metrics = coco_metrics(coco_gt, _gt_detections(coco_gt))
    assert set(metrics) == set(METRIC_KEYS)
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR10", "AR100"):
        assert metrics[key] == pytest.approx(1.0), key
    assert 0.0 < metrics["AR1"] < 1.0  # images hold several objects: 1 det/image misses some


def test_shifted_boxes_pass_three_of_ten_iou_thresholds(coco_gt):
    # A horizontal shift by d of a w-wide box gives IoU (w - d) / (w + d); d = 3w/13 -> 0.625,
    # which passes the thresholds 0.50, 0.55, 0.60 and fails 0.65 ... 0.95: AP = 3/10.
    metrics = coco_metrics(coco_gt, _gt_detections(coco_gt, shift_fraction=3 / 13))
    assert metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AP75"] == pytest.approx(0.0)
    assert metrics["AP"] == pytest.approx(0.3)
    assert metrics["AR100"] == pytest.approx(0.3)


def test_wrong_categories_score_zero(coco_gt):
    rotate = {c: SYNTH_IDS[(i + 1) % len(SYNTH_IDS)] for i, c in enumerate(SYNTH_IDS)}
    metrics = coco_metrics(coco_gt, _gt_detections(coco_gt, category_map=rotate))
    assert all(metrics[k] == 0.0 for k in ("AP", "AP50", "AR100"))


def test_images_without_detections_count_as_misses(coco_gt):
    dets = [d for d in _gt_detections(coco_gt) if d["image_id"] <= 6]
    per_cat = {c: [a["image_id"] <= 6 for a in coco_gt.anns.values() if a["category_id"] == c]
               for c in SYNTH_IDS}
    expected_recall = sum(sum(v) / len(v) for v in per_cat.values()) / len(per_cat)
    assert expected_recall < 0.9
    assert coco_metrics(coco_gt, dets)["AR100"] == pytest.approx(expected_recall)


def test_empty_detections_give_zeros_and_unknown_images_are_refused(coco_gt):
    assert coco_metrics(coco_gt, []) == {k: 0.0 for k in METRIC_KEYS}
    with pytest.raises(ValueError, match="999"):
        coco_metrics(coco_gt, [{"image_id": 999, "category_id": 3, "bbox": [0, 0, 1, 1],
                                "score": 0.5}])


def test_to_coco_detections_converts_xyxy_to_xywh():
    result = {"scores": torch.tensor([0.9, 0.2]), "labels": torch.tensor([7, 3]),
              "boxes": torch.tensor([[10.0, 20.0, 40.0, 30.0], [0.0, 0.0, 5.5, 2.0]])}
    dets = to_coco_detections([result], [42])
    assert dets[0] == {"image_id": 42, "category_id": 7, "bbox": [10.0, 20.0, 30.0, 10.0],
                       "score": pytest.approx(0.9)}
    assert dets[1]["bbox"] == [0.0, 0.0, 5.5, 2.0] and dets[1]["category_id"] == 3
    with pytest.raises(ValueError, match="image ids"):
        to_coco_detections([result], [1, 2])


def _tiny_cfg(synth_root, preset: str = "deformable_detr_tiny", *extra: str):
    return load_config(preset, [*TINY, f"data.root={synth_root}", "data.synthetic=false",
                                *extra])


def test_evaluate_end_to_end_writes_loadable_detections(synth_root, tmp_path):
    cfg = _tiny_cfg(synth_root)
    torch.manual_seed(0)
    built = build(cfg.model)
    dataset = build_dataset(cfg.data, "val")
    loader = build_loader(dataset, cfg.eval.batch_size, shuffle=False, seed=0, num_workers=0)
    built.model.train()
    result = evaluate(built.model, built.postprocess, loader, dataset.coco,
                      detections_path=tmp_path / "out" / "dets.json", progress=False)
    assert built.model.training  # mode restored
    assert set(result.metrics) == set(METRIC_KEYS) and result.num_images == 12
    assert all(-1.0 <= v <= 1.0 for v in result.metrics.values())
    assert result.extra == {} and result.seconds > 0
    detections = json.loads(result.detections_path.read_text())
    assert len(detections) == 12 * 100  # top-100 per image, no threshold (§7.4)
    loaded = dataset.coco.loadRes(result.detections_path.as_posix())
    assert len(loaded.anns) == 12 * 100
    assert coco_metrics(dataset.coco, detections) == result.metrics


class _FakeDetector(nn.Module):
    """Predicts nothing useful; reports metric m = batch size and n = NaN on 2-image batches."""

    def forward(self, images, masks):
        b = images.shape[0]
        out = {"pred_logits": torch.zeros(b, 3, 24), "pred_boxes": torch.full((b, 3, 4), 0.5),
               "metrics": {"m": torch.tensor(float(b)),
                           "n": torch.tensor(float("nan") if b == 2 else 1.0)}}
        return out


def test_model_metrics_are_image_weighted_means_without_nan(synth_root):
    cfg = _tiny_cfg(synth_root)
    dataset = build_dataset(cfg.data, "val")
    loader = build_loader(dataset, 5, shuffle=False, seed=0, num_workers=0)  # 5, 5, 2
    built = build(cfg.model)
    result = evaluate(_FakeDetector(), built.postprocess, loader, dataset.coco, progress=False)
    assert result.extra["m"] == pytest.approx((5 * 5 + 5 * 5 + 2 * 2) / 12)
    assert result.extra["n"] == pytest.approx(1.0)


def test_rho_sweep_sets_and_restores_the_keeping_ratio(synth_root):
    cfg = _tiny_cfg(synth_root, "sparse_detr_tiny", "model.enc_layers=2", "model.rho=0.3",
                    "data.eval_size=96", "data.eval_max_size=128")
    torch.manual_seed(0)
    built = build(cfg.model)
    dataset = build_dataset(cfg.data, "val")
    # batches of one image: no padding, so rho = 1 selects every token of the image
    loader = build_loader(Subset(dataset, range(3)), 1, shuffle=False, seed=0, num_workers=0)
    results = evaluate_rho_sweep(built.model, built.postprocess, loader, dataset.coco,
                                 rhos=[0.1, 1.0], progress=False)
    assert list(results) == [0.1, 1.0]
    assert built.model.encoder.rho == pytest.approx(0.3)
    corr = {rho: r.extra["corr_mask_attn_map_dec_all"] for rho, r in results.items()}
    assert corr[1.0] == pytest.approx(1.0)  # all tokens kept: all decoder attention on them
    assert corr[0.1] < corr[1.0]
    dense = build(_tiny_cfg(synth_root).model)
    with pytest.raises(ValueError, match="rho sweep needs a sparse encoder"):
        evaluate_rho_sweep(dense.model, dense.postprocess, loader, dataset.coco, rhos=[0.5])


def test_ensure_dataset_names_the_missing_path(synth_root, tmp_path):
    cfg = _tiny_cfg(synth_root)
    assert ensure_dataset(cfg.data, splits=("val",)) == synth_root
    with pytest.raises(DatasetError, match="nope2017"):
        ensure_dataset(_tiny_cfg(synth_root, "deformable_detr_tiny",
                                 "data.train_split=nope2017").data)
    missing = _tiny_cfg(tmp_path / "nothing").data
    with pytest.raises(DatasetError, match="nothing"):
        ensure_dataset(missing)


def test_ensure_dataset_generates_the_synthetic_set_once(tmp_path):
    cfg = load_config("deformable_detr_tiny", [f"data.root={tmp_path / 'gen'}",
                                               "data.synth_train=2", "data.synth_val=3"])
    root = ensure_dataset(cfg.data)
    stamp = (root / "annotations" / "instances_val2017.json").stat().st_mtime_ns
    assert ensure_dataset(cfg.data) == root  # reused, not regenerated
    assert (root / "annotations" / "instances_val2017.json").stat().st_mtime_ns == stamp
    assert len(build_dataset(cfg.data, "train")) == 2
    other = load_config("deformable_detr_tiny", [f"data.root={root}", "data.synth_seed=5"])
    with pytest.raises(DatasetError, match="refusing to overwrite"):
        ensure_dataset(other.data)


def test_loader_batches_and_shards_deterministically(synth_root):
    cfg = _tiny_cfg(synth_root)
    dataset = build_dataset(cfg.data, "val")

    def ids(loader, epoch):
        set_loader_epoch(loader, epoch)
        return [int(t["image_id"]) for batch in loader for t in batch.targets]

    ranks = [build_loader(dataset, 2, shuffle=True, seed=3, num_workers=0, rank=r,
                          world_size=2) for r in (0, 1)]
    assert isinstance(ranks[0].sampler, DistributedSampler)
    epoch0 = [ids(loader, 0) for loader in ranks]
    assert sorted(epoch0[0] + epoch0[1]) == list(range(1, 13))  # disjoint shards, all images
    assert ids(ranks[0], 0) == epoch0[0]  # same seed and epoch: same order
    assert ids(ranks[0], 1) != epoch0[0]  # next epoch reshuffles
    batch = next(iter(build_loader(dataset, 3, shuffle=False, seed=0, num_workers=0)))
    assert isinstance(batch, DetectionBatch) and batch.images.shape[0] == 3
    assert [int(t["image_id"]) for t in batch.targets] == [1, 2, 3]


def test_aspect_batches_share_a_bin_across_ranks_and_keep_the_batch_count(synth_root):
    dataset = build_dataset(_tiny_cfg(synth_root).data, "val")  # 12 images
    ratios = aspect_ratios(dataset)
    assert min(ratios) < 1 < max(ratios)  # the synthetic set has both orientations
    for world_size, drop_last in ((1, False), (1, True), (2, True), (2, False)):
        loaders = [build_loader(dataset, 2, shuffle=True, seed=1, num_workers=0, rank=rank,
                                world_size=world_size, drop_last=drop_last,
                                aspect_ratios=ratios) for rank in range(world_size)]
        plain = build_loader(dataset, 2, shuffle=True, seed=1, num_workers=0,
                             world_size=world_size, drop_last=drop_last)
        for loader in loaders:
            set_loader_epoch(loader, 2)
        per_rank = [list(loader.batch_sampler) for loader in loaders]
        for batches, loader in zip(per_rank, loaders):
            assert len(batches) == len(loader) == len(plain)  # same steps on every rank
        steps = [sum(parts, []) for parts in zip(*per_rank)]  # all ranks' images of a step
        seen = sum(steps, [])
        if drop_last:
            assert len(seen) == len(set(seen))  # each image at most once
        else:
            assert set(seen) == set(range(len(dataset)))  # every image, a few repeated
        sampler = loaders[0].batch_sampler
        bins = [{sampler.bin_of[i] for i in step} for step in steps]
        full = [b for b, step in zip(bins, steps) if len(step) == 2 * world_size]
        mixed = [b for b in full if len(b) > 1]
        assert len(mixed) <= ASPECT_BINS - 1 and all(len(b) == 1 for b in full[:len(full) - len(mixed)])
    set_loader_epoch(loaders[0], 3)
    assert list(loaders[0].batch_sampler) != per_rank[0]  # the next epoch reshuffles
    with pytest.raises(ValueError, match="3 values for 12 items"):
        build_loader(dataset, 2, shuffle=False, seed=0, num_workers=0, aspect_ratios=ratios[:3])


def test_aspect_batch_sampler_on_a_known_layout():
    # two bins split at the median: tall images 0, 2, 4, 6, 8 and wide images 1, 3, 5, 7, 9
    ratios = [0.5, 2.0, 0.6, 1.8, 0.7, 1.9, 0.8, 1.7, 0.9, 1.6]
    kwargs = dict(shuffle=False, seed=0, bins=2)

    def batches(batch_size, world_size, drop_last=False):
        return [list(AspectBatchSampler(ratios, batch_size, rank=r, world_size=world_size,
                                        drop_last=drop_last, **kwargs))
                for r in range(world_size)]

    assert batches(2, 1) == [[[0, 2], [1, 3], [4, 6], [5, 7], [8, 9]]]  # leftovers last
    assert batches(2, 2) == [[[0, 2], [1, 3], [8]], [[4, 6], [5, 7], [9]]]
    assert batches(2, 2, drop_last=True) == [[[0, 2], [1, 3]], [[4, 6], [5, 7]]]
    # 10 images over 3 ranks: the last global batch [9] is padded from the start of the order
    assert batches(1, 3) == [[[0], [1], [6], [9]], [[2], [3], [7], [0]], [[4], [5], [8], [1]]]
    assert [len(b) for b in batches(1, 3, drop_last=True)] == [3, 3, 3]
    with pytest.raises(ValueError, match="positive"):
        AspectBatchSampler([1.0, 0.0], 1, rank=0, world_size=1, drop_last=False, **kwargs)
