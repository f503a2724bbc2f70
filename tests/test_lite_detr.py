"""Lite-DETR: KDA module, interleaved encoder (paper and released-code layouts), sparse + lite,
config rules, parameter counts, and every Lite tiny twin trains a step (CPU, micro sizes)."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import micro_config, two_images
from sdetr.config import ConfigError, load_config, preset_names
from sdetr.models import build, build_model
from sdetr.models.attention import MSDeformAttn
from sdetr.models.encoder import encoder_reference_points
from sdetr.models.lite import (FullLiteLayer, HighLevelLayer, InterleavedEncoder,
                               KeyAwareDeformAttn, LowLevelLayer, SparseLiteDETR,
                               interleaved_layers, num_low_tokens)
from sdetr.models.neck import FeatureSet
from sdetr.models.sparse import dam_loss, dam_target, decoder_attention_map
from sdetr.models.sparse.dam import CORR_PREFIX
from sdetr.ops import BackendUnavailableError, kda_pytorch
from sdetr.profiling import count_parameters

LITE_TINY = [n for n in preset_names() if "lite" in n and n.endswith("_tiny")]


@pytest.fixture(autouse=True)
def _leave_global_rng_as_found():
    """Seeded tests here must not shift the global RNG of later test files."""
    with torch.random.fork_rng(devices=[]):
        yield


def _model(preset: str, *extra: str, seed: int = 0):
    torch.manual_seed(seed)
    return build(micro_config(preset, *extra).model)


def _levels_of(feats) -> list[int]:
    return [h * w for h, w in feats.level_sizes()]


# ------------------------------------------------------------------------------ KDA module


def test_kda_module_keys_init_and_output_match_the_op():
    torch.manual_seed(0)
    c, m, lv, p = 16, 2, 2, 2
    attn = KeyAwareDeformAttn(c, lv, m, p, backend="reference").double()
    keys = set(attn.state_dict())
    assert not any(k.startswith("attention_weights") for k in keys)
    assert {"query_proj.weight", "value_proj.weight", "output_proj.weight"} <= keys
    assert "key_proj.weight" not in keys
    assert "key_proj.weight" in KeyAwareDeformAttn(c, lv, m, p, proj_key=True).state_dict()
    msda = MSDeformAttn(c, lv, m, p)
    assert torch.equal(attn.sampling_offsets.bias.float(), msda.sampling_offsets.bias)
    assert attn.sampling_offsets.weight.abs().sum() == 0
    shapes = torch.tensor([[3, 4], [2, 2]])
    starts = torch.tensor([0, 12])
    query = torch.randn(2, 5, c, dtype=torch.float64)
    value_in = torch.randn(2, 16, c, dtype=torch.float64)
    ref = torch.rand(2, 5, lv, 4, dtype=torch.float64)  # 4-d (decoder-style) references
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[1, 10:] = True
    out, loc, weights = attn(query, ref, value_in, shapes, starts, mask)
    value = attn.value_proj(value_in).masked_fill(mask[..., None], 0.0).view(2, 16, m, c // m)
    core, expected_w = kda_pytorch(attn.query_proj(query).view(2, 5, m, c // m), value, value,
                                   shapes, starts, loc)
    torch.testing.assert_close(out, attn.output_proj(core))
    torch.testing.assert_close(weights, expected_w)
    assert weights.shape == (2, 5, m, lv, p)
    torch.testing.assert_close(weights.sum((-2, -1)), torch.ones(2, 5, m, dtype=torch.float64))


def test_attention_setting_picks_kda_or_msda_everywhere_and_detector_keeps_grid_init():
    model = _model("lite_detr_h3l1_2x3_tiny").model
    attns = [layer.self_attn for layer in model.encoder.layers]
    attns += [layer.cross_attn for layer in model.decoder.layers]
    assert all(isinstance(a, KeyAwareDeformAttn) for a in attns)
    assert all(a.sampling_offsets.weight.abs().sum() == 0 for a in attns)  # grid init survives
    assert all(a.key_proj is None for a in attns)
    plain = _model("lite_detr_h3l1_2x3_tiny", "model.attention=deformable").model
    assert not any(isinstance(m, KeyAwareDeformAttn) for m in plain.modules())
    assert sum(isinstance(m, MSDeformAttn) for m in plain.modules()) == len(attns)
    keyed = _model("lite_detr_h3l1_2x3_tiny", "model.kda_proj_key=true").model
    assert all(layer.self_attn.key_proj is not None for layer in keyed.encoder.layers)


def test_key_aware_model_refuses_a_backend_kda_lacks():
    cfg = micro_config("lite_detr_h3l1_6x1_tiny").model
    with pytest.raises(BackendUnavailableError, match="'kda'"):
        build_model(cfg, kernel_backend="no_such_backend")


# ------------------------------------------------------------------------------ encoder layout


@pytest.mark.parametrize("preset, overrides, high_levels, schedule", [
    ("lite_detr_h3l1_6x1_tiny", [], 3, ["high"] * 6 + ["low"]),
    ("lite_detr_h3l1_3x2_tiny", [], 3, (["high"] * 3 + ["low"]) * 2),
    ("lite_detr_h2l2_2x3_tiny", [], 2, (["high"] * 2 + ["low"]) * 3),
    ("lite_detr_h3l1_2x3_code_tiny", [], 3, ["high", "full"] * 3),
    ("sparse_lite_detr_tiny", [], 3, (["high"] * 2 + ["low"]) * 3),
    ("sparse_lite_detr_tiny", ["model.lite_variant=code"], 3, ["high", "full"] * 3),
])
def test_attention_queries_per_layer_follow_the_configuration(preset, overrides, high_levels,
                                                              schedule):
    """Count the queries (and keys) of every encoder attention call with forward hooks."""
    model = _model(preset, *overrides).model.eval()
    assert model.encoder.schedule == schedule
    images, masks, _ = two_images()
    calls = []
    hooks = [layer.self_attn.register_forward_hook(
        lambda mod, args, out: calls.append((args[0].shape[1], args[2].shape[1])))
        for layer in model.encoder.layers]
    with torch.no_grad():
        feats = model.extract(images, masks)
        encoded = model.encode(feats)
    for h in hooks:
        h.remove()
    sizes = _levels_of(feats)
    n, n_high = sum(sizes), sum(sizes[len(sizes) - high_levels:])
    n_low = n - n_high
    low_queries = encoded.extras["selection"].k if "selection" in encoded.extras else n_low
    expected = {"high": n_high, "low": low_queries, "full": low_queries + n_high}
    assert calls == [(expected[role], n) for role in schedule]
    assert n_high < n_low


def test_code_variant_structure_and_small_ffn():
    enc = _model("lite_detr_h3l1_2x3_code_tiny").model.encoder
    c = enc.layers[0].linear1.in_features
    assert enc.num_layers == 6 and [type(x) for x in enc.layers] == [HighLevelLayer, FullLiteLayer] * 3
    for layer in enc.layers:
        small = [hasattr(layer, name) for name in ("linear12", "linear22", "norm22")]
        assert all(small) == isinstance(layer, FullLiteLayer) and any(small) == all(small)
    full = enc.layers[1]
    assert full.linear12.weight.shape == (c, c) and full.linear22.weight.shape == (c, c)
    paper = _model("lite_detr_h3l1_6x1_tiny").model.encoder
    assert paper.num_layers == 7 and not any(isinstance(x, FullLiteLayer) for x in paper.layers)
    ptrs = [p.data_ptr() for p in paper.parameters()]
    assert len(ptrs) == len(set(ptrs))  # every update is its own layer: nothing shared
    per_layer = sum(p.numel() for p in paper.layers[0].parameters())
    assert sum(p.numel() for p in paper.parameters()) == 7 * per_layer


def _tokens(seed=0, c=16, batch=2):
    """A 3-level FeatureSet (float64): shapes 4x5, 2x3, 1x2 (N = 28), a few pads in image 1."""
    gen = torch.Generator().manual_seed(seed)
    shapes = torch.tensor([[4, 5], [2, 3], [1, 2]])
    starts = torch.tensor([0, 20, 26])
    mask = torch.zeros(batch, 28, dtype=torch.bool)
    mask[1, [15, 16, 17, 18, 19, 25, 27]] = True
    ratios = torch.ones(batch, 3, 2, dtype=torch.float64)
    return FeatureSet(src=torch.randn(batch, 28, c, generator=gen, dtype=torch.float64),
                      pos=torch.randn(batch, 28, c, generator=gen, dtype=torch.float64),
                      mask=mask, spatial_shapes=shapes, level_start_index=starts,
                      valid_ratios=ratios)


def _manual_layer(layer, query, pos, ref, value, feats):
    return layer(query, pos, ref, value, feats.spatial_shapes, feats.level_start_index, feats.mask)


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_one_block_equals_manual_updates(variant):
    """H2L1-(2+1)x1 on 3 levels: high updates see all tokens, the low update sees the new high."""
    torch.manual_seed(0)
    attn = MSDeformAttn(16, 3, 2, 2)
    layers = interleaved_layers(variant, 2, 1, d_model=16, d_ffn=32, dropout=0.0, attn=attn)
    enc = InterleavedEncoder([x.double() for x in layers], high_levels=2).eval()
    feats = _tokens()
    n_low = num_low_tokens(feats.spatial_shapes, 2)
    assert n_low == 20
    ref = encoder_reference_points(feats.spatial_shapes, feats.valid_ratios, "cpu")
    lo, hi = slice(0, n_low), slice(n_low, None)
    x = feats.src
    high = _manual_layer(enc.layers[0], x[:, hi], feats.pos[:, hi], ref[:, hi], x, feats)
    x = torch.cat([x[:, lo], high], 1)
    if variant == "paper":
        high = _manual_layer(enc.layers[1], x[:, hi], feats.pos[:, hi], ref[:, hi], x, feats)
        x = torch.cat([x[:, lo], high], 1)
        low = _manual_layer(enc.layers[2], x[:, lo], feats.pos[:, lo], ref[:, lo], x, feats)
        expected = torch.cat([low, x[:, hi]], 1)
    else:
        full = enc.layers[1]
        a, _, _ = full.self_attn(x + feats.pos, ref, x, feats.spatial_shapes,
                                 feats.level_start_index, feats.mask)
        y = full.norm1(x + a)
        expected = torch.cat([full.forward_small_ffn(y[:, lo]), full.forward_ffn(y[:, hi])], 1)
    with torch.no_grad():
        got = enc.encode(feats, None).memory
        torch.testing.assert_close(got, expected.detach(), rtol=1e-12, atol=1e-12)


def test_high_only_and_low_only_layers_leave_the_other_tokens_bit_identical():
    torch.manual_seed(1)
    attn = MSDeformAttn(16, 3, 2, 2).double()
    feats = _tokens(seed=1)
    n_low = num_low_tokens(feats.spatial_shapes, 1)
    for cls, kept, changed in ((HighLevelLayer, slice(0, n_low), slice(n_low, None)),
                               (LowLevelLayer, slice(n_low, None), slice(0, n_low))):
        enc = InterleavedEncoder([cls(16, 32, 0.0, attn=attn).double()], high_levels=1)
        with torch.no_grad():
            out = enc.encode(feats, None).memory
        assert torch.equal(out[:, kept], feats.src[:, kept])
        assert not torch.isclose(out[:, changed], feats.src[:, changed]).all(-1).any()


# ------------------------------------------------------------------------------ sparse + lite


def _padded_batch():
    images, masks, _ = two_images(64, 96)
    masks[1, 48:] = True
    return images, masks


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_sparse_lite_updates_only_selected_low_level_tokens(variant):
    model = _model("sparse_lite_detr_tiny", "model.rho=0.3",
                   f"model.lite_variant={variant}").model.train()
    images, masks = _padded_batch()
    feats = model.extract(images, masks)
    encoded = model.encode(feats)
    sel = encoded.extras["selection"]
    sizes = _levels_of(feats)
    n_low = sizes[0]
    assert encoded.extras["scores"].shape == (2, n_low)
    valid_low = (~feats.mask[:, :n_low]).sum(1).tolist()
    assert valid_low[0] > valid_low[1]
    assert sel.counts.tolist() == [math.floor(0.3 * v) + 1 for v in valid_low]
    assert int(sel.indices.max()) < n_low
    written = torch.zeros_like(feats.mask)
    for i, n in enumerate(sel.counts.tolist()):
        written[i, sel.indices[i, :n]] = True
    untouched = ~written
    untouched[:, n_low:] = False
    assert untouched.any()
    assert torch.equal(encoded.memory[untouched], feats.src[untouched])
    assert not torch.isclose(encoded.memory[written], feats.src[written]).all(-1).any()
    high = encoded.memory[:, n_low:]
    assert not torch.isclose(high, feats.src[:, n_low:]).all(-1).any()


def test_sparse_lite_dam_loss_and_corr_are_restricted_to_low_level_tokens():
    built = _model("sparse_lite_detr_tiny", "model.rho=0.2")
    model = built.model.train()
    assert isinstance(model, SparseLiteDETR)
    images, masks = _padded_batch()
    torch.manual_seed(3)
    feats = model.extract(images, masks)
    encoded = model.encode(feats)
    queries = model.select_queries(encoded, feats)
    decoded = model.decode(queries, encoded, feats)
    out = model.assemble(decoded, queries, encoded, feats)
    n_low = _levels_of(feats)[0]
    dam = decoder_attention_map(decoded.sampling_locations, decoded.attention_weights,
                                feats.spatial_shapes, feats.level_start_index, feats.num_tokens)
    low_mask = feats.mask[:, :n_low]
    target = dam_target(dam[:, :n_low], low_mask, encoded.extras["selection"].counts)
    expected = dam_loss(encoded.extras["scores"], target, low_mask)
    torch.testing.assert_close(out["extra_losses"]["loss_dam"], expected)
    assert set(out["metrics"]) == {f"{CORR_PREFIX}all", f"{CORR_PREFIX}0"}
    losses = built.criterion(out, two_images()[2])
    assert "loss_dam" in losses and torch.isfinite(built.criterion.total_loss(losses))


# ------------------------------------------------------------------------------ training steps


@pytest.mark.parametrize("preset", LITE_TINY)
def test_every_lite_tiny_twin_trains_a_step(preset):
    """Forward + loss + backward; the backbone is frozen here to keep the file fast (its
    gradients are covered by test_models' step over every tiny preset)."""
    built = _model(preset)
    built.model.backbone.requires_grad_(False)
    images, masks, targets = two_images()
    out = built.model(images, masks)
    losses = built.criterion(out, targets)
    total = built.criterion.total_loss(losses)
    total.backward()
    assert torch.isfinite(total)
    missing = [n for n, p in built.model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert ("loss_dam" in losses) == preset.startswith("sparse_lite")


# ------------------------------------------------------------------------------ config


@pytest.mark.parametrize("overrides, key", [
    (["model.lite_high_levels=4"], "model.lite_high_levels"),
    (["model.lite_high_levels=0"], "model.lite_high_levels"),
    (["model.lite_blocks=0"], "model.lite_blocks"),
    (["model.lite_high_updates=0"], "model.lite_high_updates"),
    (["model.attention=deformable", "model.kda_proj_key=true"], "model.kda_proj_key"),
    (["model.token_selection=random"], "model.token_selection"),
    (["model.encoder=sparse_interleaved", "model.queries=learned", "model.box_refine=false"],
     "model.encoder"),
    (["eval.rho_sweep=[0.2]"], "eval.rho_sweep"),
])
def test_impossible_lite_settings_fail_at_load_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("lite_detr_h3l1_6x1_tiny", overrides)


def test_lite_keys_are_refused_on_other_encoders_and_layer_count_is_derived():
    with pytest.raises(ConfigError, match=r"model\.lite_blocks: only used by encoder=interleaved"):
        load_config("efficient_detr_tiny", ["model.lite_blocks=3"])
    kda_efficient = load_config("efficient_detr_tiny", ["model.attention=key_aware"]).model
    assert kda_efficient.attention == "key_aware"
    counts = {name: load_config(name).model.num_encoder_layers for name in (
        "lite_detr_r50_h3l1_6x1", "lite_detr_r50_h3l1_3x2", "lite_detr_r50_h3l1_2x3",
        "lite_detr_r50_h3l1_2x3_code", "deformable_detr_r50")}
    assert counts == {"lite_detr_r50_h3l1_6x1": 7, "lite_detr_r50_h3l1_3x2": 8,
                      "lite_detr_r50_h3l1_2x3": 9, "lite_detr_r50_h3l1_2x3_code": 6,
                      "deformable_detr_r50": 6}
    sweep = load_config("sparse_lite_detr_tiny", ["eval.rho_sweep=[0.2, 0.3]"])
    assert sweep.model.selects_tokens and sweep.eval.rho_sweep == [0.2, 0.3]


@pytest.mark.parametrize("preset, millions", [
    ("lite_detr_r50_h3l1_6x1", 42.012), ("lite_detr_r50_h3l1_6x1_code", 41.354),
])
def test_r50_parameter_counts(preset, millions):
    counts = count_parameters(build_model(load_config(preset).model))
    assert counts.params_trainable / 1e6 == pytest.approx(millions, abs=0.0005)
    assert counts.params_inference == counts.params_trainable

