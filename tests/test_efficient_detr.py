"""Efficient DETR (as released with Sparse DETR): dense encoder + top-k encoder tokens as decoder
queries (class-specific token head, content = memory rows) + iterative box refinement."""

from __future__ import annotations

import pytest
import torch

from sdetr.config import ConfigError, load_config
from sdetr.models import DeformableDETR, build, build_model
from sdetr.models.encoders import DenseEncoder
from sdetr.models.sparse import SparseDETR
from sdetr.profiling import count_parameters


def _batch() -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 96, generator=gen)
    masks = torch.zeros(2, 64, 96, dtype=torch.bool)
    masks[1, 40:] = True
    masks[1, :, 72:] = True
    targets = [{"labels": torch.tensor([3, 8]), "boxes": torch.tensor([[.3, .3, .2, .2], [.6, .7, .3, .2]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[.5, .5, .5, .4]])}]
    return images, masks, targets


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    return build(load_config("efficient_detr_tiny", ["model.num_queries=25"]).model)


def test_presets_are_efficient_detr():
    for name in ("efficient_detr_r50", "efficient_detr_swint", "efficient_detr_tiny"):
        m = load_config(name).model
        assert (m.encoder, m.queries, m.box_refine, m.enc_aux_loss) == ("dense", "topk", True, False)
    assert load_config("efficient_detr_swint").model.backbone.name == "swin_t"
    assert load_config("efficient_detr_tiny").model.backbone.name == "resnet18"
    for name in ("sparse_detr_r50", "sparse_detr_swint", "sparse_detr_tiny"):
        m = load_config(name).model
        assert (m.encoder, m.queries, m.box_refine, m.rho, m.enc_aux_loss, m.token_selection) == \
            ("sparse", "topk", True, 0.1, True, "dam")


def test_parameter_counts_match_the_paper():
    r50 = count_parameters(build_model(load_config("efficient_detr_r50").model))
    assert round(r50.params_trainable / 1e6, 2) == 40.83 and r50.params_training_only == 0
    swin = count_parameters(build_model(load_config("efficient_detr_swint").model))
    assert round(swin.params_trainable / 1e6, 2) == 41.29


def test_builds_a_plain_detector_with_unshared_heads(tiny):
    model = tiny.model
    assert type(model) is DeformableDETR and not isinstance(model, SparseDETR)
    assert isinstance(model.encoder, DenseEncoder)
    assert model.heads.class_embed[0] is not model.heads.class_embed[1]
    for box in model.heads.bbox_embed:  # two-stage: every box head starts at its reference
        assert torch.equal(box.layers[-1].bias, torch.zeros(4))
    keys = model.state_dict()
    c = 128
    assert keys["query_selector.pos_trans.weight"].shape == (c, 2 * c)
    assert not any(k.startswith(("query_selector.query_embed", "encoder.scorer")) for k in keys)


def test_queries_are_top_k_memory_rows_by_max_class_logit(tiny):
    model = tiny.model.eval()
    images, masks, _ = _batch()
    with torch.no_grad():
        feats = model.extract(images, masks)
        encoded = model.encode(feats)
        queries = model.select_queries(encoded, feats)
    topk = queries.extras["topk_indices"]
    assert topk.shape == (2, 25)
    gathered = torch.gather(encoded.memory, 1, topk.unsqueeze(-1).expand(-1, -1, 128))
    assert torch.equal(queries.tgt, gathered)
    enc = queries.enc_outputs
    assert enc["class_specific"] is True and enc["pred_logits"].shape == (2, feats.num_tokens, 24)
    best = enc["pred_logits"].max(-1).values.topk(25, dim=1).indices
    assert torch.equal(topk.sort(1).values, best.sort(1).values)
    assert queries.reference.shape == (2, 25, 4)
    torch.testing.assert_close(queries.reference, torch.gather(enc["pred_boxes"], 1,
                                                               topk.unsqueeze(-1).expand(-1, -1, 4)))


def test_references_are_refined_per_layer(tiny):
    model = tiny.model.eval()
    images, masks, _ = _batch()
    with torch.no_grad():
        feats = model.extract(images, masks)
        encoded = model.encode(feats)
        queries = model.select_queries(encoded, feats)
        # make the first box head move the boxes, then refinement must change layer 1's reference
        model.heads.bbox_embed[0].layers[-1].bias.fill_(0.3)
        decoded = model.decode(queries, encoded, feats)
    assert not torch.allclose(decoded.references[0], decoded.references[1])


def test_one_training_step(tiny):
    model, criterion = tiny.model.train(), tiny.criterion
    images, masks, targets = _batch()
    out = model(images, masks)
    assert "metrics" not in out and "extra_losses" not in out and "enc_aux_outputs" not in out
    losses = criterion(out, targets)
    assert {"loss_ce_enc", "loss_bbox_enc", "loss_giou_enc", "loss_ce_0"} <= set(losses)
    total = criterion.total_loss(losses)
    assert torch.isfinite(total)
    total.backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def test_encoder_aux_loss_needs_the_sparse_encoder():
    with pytest.raises(ConfigError, match="model.enc_aux_loss"):
        load_config("efficient_detr_tiny", ["model.enc_aux_loss=true"])
