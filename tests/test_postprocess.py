"""Evaluation postprocessor (REFERENCE §7.4)."""

from __future__ import annotations

import pytest
import torch

from sdetr.models.postprocess import PostProcess

F64 = torch.float64


def test_boxes_are_scaled_to_original_size_per_image() -> None:
    logits = torch.full((2, 1, 3), -3.0, dtype=F64)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4]], [[0.25, 0.75, 0.5, 0.5]]], dtype=F64)
    sizes = torch.tensor([[100, 200], [40, 80]])  # (h, w)
    out = PostProcess(num_select=1)(logits, boxes, sizes)
    torch.testing.assert_close(out[0]["boxes"], torch.tensor([[80.0, 30.0, 120.0, 70.0]], dtype=F64))
    torch.testing.assert_close(out[1]["boxes"], torch.tensor([[0.0, 20.0, 40.0, 40.0]], dtype=F64))


def test_topk_is_sorted_and_equals_the_best_sigmoid_scores() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 30, 11, generator=gen, dtype=F64)
    boxes = torch.rand(2, 30, 4, generator=gen, dtype=F64) * 0.5 + 0.2
    out = PostProcess(num_select=100)(logits, boxes, torch.tensor([[480, 640], [600, 800]]))
    for b, det in enumerate(out):
        assert det["scores"].shape == (100,) and det["labels"].shape == (100,) and det["boxes"].shape == (100, 4)
        assert torch.all(det["scores"][:-1] >= det["scores"][1:])
        best = logits[b].sigmoid().flatten().sort(descending=True).values[:100]
        torch.testing.assert_close(det["scores"], best)


def test_labels_and_queries_are_decoded_from_flat_index() -> None:
    num_classes = 5
    logits = torch.full((1, 4, num_classes), -6.0, dtype=F64)
    logits[0, 3, 2] = 4.0  # best: query 3, class 2
    logits[0, 1, 4] = 3.0  # second: query 1, class 4
    logits[0, 3, 0] = 2.0  # third: query 3 again, class 0
    boxes = torch.tensor([[[0.1, 0.1, 0.1, 0.1], [0.3, 0.3, 0.2, 0.2],
                           [0.5, 0.5, 0.1, 0.1], [0.6, 0.4, 0.4, 0.2]]], dtype=F64)
    det = PostProcess(num_select=3)(logits, boxes, torch.tensor([[10, 20]]))[0]
    assert det["labels"].tolist() == [2, 4, 0]
    assert det["labels"].dtype == torch.int64
    torch.testing.assert_close(det["scores"], torch.tensor([4.0, 3.0, 2.0], dtype=F64).sigmoid())
    expected = torch.tensor([[8.0, 3.0, 16.0, 5.0], [4.0, 2.0, 8.0, 4.0], [8.0, 3.0, 16.0, 5.0]], dtype=F64)
    torch.testing.assert_close(det["boxes"], expected)


def test_fewer_pairs_than_num_select_takes_all() -> None:
    logits = torch.randn(1, 3, 4)
    boxes = torch.full((1, 3, 4), 0.5)
    det = PostProcess(num_select=100)(logits, boxes, torch.tensor([[10, 10]]))[0]
    assert det["scores"].shape == (12,)
    assert sorted(zip(det["labels"].tolist(), det["scores"].tolist())) == sorted(
        (c, logits[0, q, c].sigmoid().item()) for q in range(3) for c in range(4)
    )


def test_bad_target_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match="target_sizes"):
        PostProcess()(torch.zeros(2, 3, 4), torch.full((2, 3, 4), 0.5), torch.tensor([[10, 10]]))
