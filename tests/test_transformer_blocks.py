"""Transformer building blocks: positional encodings, MSDA module, encoder, decoder (CPU, small sizes)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from sdetr.models.attention import MSDeformAttn
from sdetr.models.decoder import DeformableDecoder, DeformableDecoderLayer, scale_reference_points
from sdetr.models.encoder import DeformableEncoder, DeformableEncoderLayer, encoder_reference_points
from sdetr.models.layers import MLP, get_clones, inverse_sigmoid
from sdetr.models.position import box_sine_embedding, sine_position_encoding

KEYS_FILE = Path("/work/shared/design/official_keys/r50_deformable_detr_keys.txt")

C, M, L, P = 32, 4, 2, 2
SHAPES = [(6, 5), (3, 3)]


def _levels() -> tuple[torch.Tensor, torch.Tensor, int]:
    spatial_shapes = torch.tensor(SHAPES, dtype=torch.int64)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return spatial_shapes, level_start_index, int(sizes.sum())


def _padding_mask() -> tuple[torch.Tensor, torch.Tensor]:
    """Image 0 unpadded; image 1 valid 4x3 of 6x5 on level 0 and 2x2 of 3x3 on level 1."""
    masks = []
    for h, w in SHAPES:
        m = torch.zeros(2, h, w, dtype=torch.bool)
        masks.append(m)
    masks[0][1, 4:, :] = True
    masks[0][1, :, 3:] = True
    masks[1][1, 2:, :] = True
    masks[1][1, :, 2:] = True
    valid_ratios = torch.stack(
        [torch.stack([(~m[:, 0, :]).sum(1) / m.shape[2], (~m[:, :, 0]).sum(1) / m.shape[1]], -1) for m in masks], 1
    ).double()
    flat = torch.cat([m.flatten(1) for m in masks], 1)
    return flat, valid_ratios


def refine_box(head_out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Naive box: sigmoid(head + inverse_sigmoid(ref)); a 2-d ref only offsets cx, cy."""
    if ref.shape[-1] == 4:
        return (head_out + inverse_sigmoid(ref)).sigmoid()
    return torch.cat([head_out[..., :2] + inverse_sigmoid(ref), head_out[..., 2:]], -1).sigmoid()


# ----------------------------------------------------------------------------------------- layers


def test_mlp_keys_and_relu_between_layers():
    mlp = MLP(8, 16, 4, 3)
    assert [k for k in mlp.state_dict()] == [f"layers.{i}.{p}" for i in range(3) for p in ("weight", "bias")]
    x = torch.randn(5, 8)
    h = torch.relu(mlp.layers[1](torch.relu(mlp.layers[0](x))))
    torch.testing.assert_close(mlp(x), mlp.layers[2](h))


def test_inverse_sigmoid_clamps_and_inverts():
    x = torch.tensor([-0.5, 0.0, 0.3, 1.0, 2.0], dtype=torch.float64)
    y = inverse_sigmoid(x)
    big = math.log(1 / 1e-5)
    torch.testing.assert_close(y, torch.tensor([-big, -big, math.log(0.3 / 0.7), big, big], dtype=torch.float64))


def test_get_clones_are_independent():
    clones = get_clones(nn.Linear(2, 2), 3)
    with torch.no_grad():
        clones[0].weight.zero_()
    assert clones[1].weight.abs().sum() > 0 and clones[0].weight is not clones[1].weight


# ----------------------------------------------------------------------------------------- position


def _naive_sine(mask: torch.Tensor, f: int) -> torch.Tensor:
    b, h, w = mask.shape
    out = torch.zeros(b, 2 * f, h, w, dtype=torch.float64)
    for n in range(b):
        for i in range(h):
            for j in range(w):
                ye = sum(1 - int(mask[n, i2, j]) for i2 in range(i + 1))
                xe = sum(1 - int(mask[n, i, j2]) for j2 in range(j + 1))
                ylast = sum(1 - int(mask[n, i2, j]) for i2 in range(h))
                xlast = sum(1 - int(mask[n, i, j2]) for j2 in range(w))
                yn = (ye - 0.5) / (ylast + 1e-6) * 2 * math.pi
                xn = (xe - 0.5) / (xlast + 1e-6) * 2 * math.pi
                for k in range(f):
                    t = 10000.0 ** (2 * (k // 2) / f)
                    fn = math.sin if k % 2 == 0 else math.cos
                    out[n, k, i, j] = fn(yn / t)
                    out[n, f + k, i, j] = fn(xn / t)
    return out


def test_sine_position_encoding_matches_naive_and_ignores_padding():
    f = 8
    mask = torch.zeros(2, 4, 5, dtype=torch.bool)
    mask[1, 3:, :] = True
    mask[1, :, 3:] = True
    got = sine_position_encoding(mask, num_pos_feats=f, dtype=torch.float64)
    assert got.shape == (2, 2 * f, 4, 5)
    torch.testing.assert_close(got, _naive_sine(mask, f))
    # The valid 3x3 region of image 1 equals the encoding of an unpadded 3x3 image.
    alone = sine_position_encoding(torch.zeros(1, 3, 3, dtype=torch.bool), num_pos_feats=f, dtype=torch.float64)
    torch.testing.assert_close(got[1, :, :3, :3], alone[0])
    # y first: channel 0 varies along rows only, channel f along columns only.
    assert torch.allclose(got[0, 0], got[0, 0, :, :1].expand(4, 5))
    assert torch.allclose(got[0, f], got[0, f, :1, :].expand(4, 5))


def test_box_sine_embedding_shape_and_channel_order():
    f = 6
    coords = torch.rand(2, 3, 4, dtype=torch.float64)
    emb = box_sine_embedding(coords, num_pos_feats=f)
    assert emb.shape == (2, 3, 4 * f)
    for c in range(4):
        for k in range(f):
            t = 10000.0 ** (2 * (k // 2) / f)
            v = coords[..., c] * 2 * math.pi / t
            expected = v.sin() if k % 2 == 0 else v.cos()
            torch.testing.assert_close(emb[..., c * f + k], expected)
    assert box_sine_embedding(coords[..., :2], num_pos_feats=f).shape == (2, 3, 2 * f)
    with pytest.raises(ValueError, match="coords"):
        box_sine_embedding(torch.rand(2, 3, 3))


# ----------------------------------------------------------------------------------------- MSDA


def test_msda_grid_init():
    attn = MSDeformAttn(d_model=256, n_levels=4, n_heads=8, n_points=4)
    assert attn.sampling_offsets.weight.abs().sum() == 0
    assert attn.attention_weights.weight.abs().sum() == 0 and attn.attention_weights.bias.abs().sum() == 0
    bias = attn.sampling_offsets.bias.view(8, 4, 4, 2)
    head0 = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]])
    for lvl in range(4):
        torch.testing.assert_close(bias[0, lvl], head0)
    directions = torch.tensor([[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]]).float()
    expected = directions[:, None, None, :] * torch.arange(1, 5).float()[None, None, :, None]
    # float32 cos/sin noise: zero components ~1e-7, diagonal heads (e.g. head 7) ~1e-6 relative.
    torch.testing.assert_close(bias, expected.expand(8, 4, 4, 2), atol=1e-5, rtol=0)
    assert attn.value_proj.bias.abs().sum() == 0 and attn.output_proj.bias.abs().sum() == 0


def test_msda_rejects_bad_head_count():
    with pytest.raises(ValueError, match="n_heads"):
        MSDeformAttn(d_model=30, n_heads=4)


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_msda_shapes_weights_and_location_formula(ref_dim):
    torch.manual_seed(0)
    spatial_shapes, level_start_index, n = _levels()
    attn = MSDeformAttn(C, L, M, P).double()
    b, q = 2, 5
    query = torch.randn(b, q, C, dtype=torch.float64)
    value = torch.randn(b, n, C, dtype=torch.float64)
    ref = torch.rand(b, q, L, ref_dim, dtype=torch.float64)
    out, loc, w = attn(query, ref, value, spatial_shapes, level_start_index, None)
    assert out.shape == (b, q, C) and loc.shape == (b, q, M, L, P, 2) and w.shape == (b, q, M, L, P)
    torch.testing.assert_close(w, torch.full_like(w, 1.0 / (L * P)))  # zero weight + bias at init
    bias = attn.sampling_offsets.bias.view(M, L, P, 2).double()
    if ref_dim == 2:
        wh = torch.tensor([[w_, h_] for h_, w_ in SHAPES], dtype=torch.float64)  # (L, 2) as (W, H)
        expected = ref[:, :, None, :, None, :] + bias / wh[None, :, None, :]
    else:
        expected = ref[:, :, None, :, None, :2] + bias / P * ref[:, :, None, :, None, 2:] * 0.5
    torch.testing.assert_close(loc, expected)


def test_msda_output_ignores_values_at_padding():
    torch.manual_seed(1)
    spatial_shapes, level_start_index, n = _levels()
    mask, _ = _padding_mask()
    attn = MSDeformAttn(C, L, M, P).double()
    nn.init.normal_(attn.sampling_offsets.weight, std=0.5)  # spread samples over pads too
    nn.init.normal_(attn.attention_weights.weight)
    query = torch.randn(2, 7, C, dtype=torch.float64)
    ref = torch.rand(2, 7, L, 2, dtype=torch.float64)
    value = torch.randn(2, n, C, dtype=torch.float64)
    out1, _, _ = attn(query, ref, value, spatial_shapes, level_start_index, mask)
    changed = value.masked_fill(mask[..., None], 0.0) + 100.0 * torch.randn_like(value) * mask[..., None]
    out2, _, _ = attn(query, ref, changed, spatial_shapes, level_start_index, mask)
    torch.testing.assert_close(out1, out2)
    out3, _, _ = attn(query, ref, changed, spatial_shapes, level_start_index, None)
    assert not torch.allclose(out1[1], out3[1])  # without the mask the pads do matter


# ----------------------------------------------------------------------------------------- encoder


def test_encoder_reference_points_padded_batch():
    spatial_shapes, _, n = _levels()
    _, vr = _padding_mask()
    ref = encoder_reference_points(spatial_shapes, vr, "cpu")
    assert ref.shape == (2, n, L, 2) and ref.dtype == torch.float64
    # image 1, level 0 is 6x5 with a valid 4x3 region (vr_w = 3/5, vr_h = 4/6); level 1 is 3x3 with 2x2 valid.
    vr_w = [3 / 5, 2 / 3]
    vr_h = [4 / 6, 2 / 3]
    token = 2 * 5 + 4  # level 0, row 2, col 4 (a pad column)
    r = ((4 + 0.5) / 3, (2 + 0.5) / 4)
    assert r[0] > 1
    for lt in range(L):
        torch.testing.assert_close(ref[1, token, lt], torch.tensor([r[0] * vr_w[lt], r[1] * vr_h[lt]]).double())
    token = 30 + 1 * 3 + 0  # level 1, row 1, col 0
    r = (0.5 / 2, 1.5 / 2)
    for lt in range(L):
        torch.testing.assert_close(ref[1, token, lt], torch.tensor([r[0] * vr_w[lt], r[1] * vr_h[lt]]).double())
    # unpadded image: pixel centres of the own level
    torch.testing.assert_close(ref[0, 2 * 5 + 4, 0], torch.tensor([4.5 / 5, 2.5 / 6]).double())


def _encoder_layer(dropout: float = 0.0) -> DeformableEncoderLayer:
    layer = DeformableEncoderLayer(C, 64, dropout, L, M, P).double()
    nn.init.normal_(layer.self_attn.sampling_offsets.weight, std=0.1)
    nn.init.normal_(layer.self_attn.attention_weights.weight, std=0.1)
    return layer


def test_encoder_layer_subset_queries_equal_dense_rows():
    torch.manual_seed(2)
    spatial_shapes, level_start_index, n = _levels()
    mask, vr = _padding_mask()
    layer = _encoder_layer().eval()
    src = torch.randn(2, n, C, dtype=torch.float64)
    pos = torch.randn(2, n, C, dtype=torch.float64)
    ref = encoder_reference_points(spatial_shapes, vr, "cpu")
    dense = layer(src, pos, ref, src, spatial_shapes, level_start_index, mask)
    assert dense.shape == (2, n, C)
    idx = torch.tensor([[0, 7, 31, 38], [3, 4, 20, 35]])
    gather = lambda t: torch.gather(t, 1, idx.view(2, 4, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:]))
    sub = layer(gather(src), gather(pos), gather(ref), src, spatial_shapes, level_start_index, mask)
    assert sub.shape == (2, 4, C)
    torch.testing.assert_close(sub, gather(dense))
    torch.testing.assert_close(layer.forward_ffn(src), layer.norm2(src + layer.linear2(torch.relu(layer.linear1(src)))))


def test_dense_encoder_runs_layers_in_sequence():
    torch.manual_seed(3)
    spatial_shapes, level_start_index, n = _levels()
    mask, vr = _padding_mask()
    enc = DeformableEncoder(_encoder_layer(), 2).eval()
    src = torch.randn(2, n, C, dtype=torch.float64)
    pos = torch.randn(2, n, C, dtype=torch.float64)
    memory = enc(src, pos, spatial_shapes, level_start_index, vr, mask)
    ref = encoder_reference_points(spatial_shapes, vr, "cpu")
    x = src
    for layer in enc.layers:
        x = layer(x, pos, ref, x, spatial_shapes, level_start_index, mask)
    torch.testing.assert_close(memory, x)
    assert enc.layers[0] is not enc.layers[1]


# ----------------------------------------------------------------------------------------- decoder


def _decoder(num_layers: int = 2) -> DeformableDecoder:
    return DeformableDecoder(DeformableDecoderLayer(C, 64, 0.0, L, M, P), num_layers).double()


def _decoder_inputs(ref_dim: int):
    spatial_shapes, level_start_index, n = _levels()
    mask, vr = _padding_mask()
    q = 6
    tgt = torch.randn(2, q, C, dtype=torch.float64)
    qpos = torch.randn(2, q, C, dtype=torch.float64)
    ref = torch.rand(2, q, ref_dim, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(2, n, C, dtype=torch.float64)
    return tgt, qpos, ref, memory, spatial_shapes, level_start_index, vr, mask


def _heads(num_layers: int) -> nn.ModuleList:
    return nn.ModuleList(MLP(C, C, 4, 3) for _ in range(num_layers)).double()


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_decoder_without_refinement(ref_dim):
    torch.manual_seed(4)
    dec = _decoder(3)
    args = _decoder_inputs(ref_dim)
    out = dec(*args)
    assert out.hidden_states.shape == (3, 2, 6, C)
    assert out.sampling_locations.shape == (2, 3, 6, M, L, P, 2)
    assert out.attention_weights.shape == (2, 3, 6, M, L, P)
    assert len(out.references) == 3 and all(r is args[2] for r in out.references)


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_decoder_with_refinement(ref_dim):
    torch.manual_seed(5)
    dec = _decoder(2)
    args = _decoder_inputs(ref_dim)
    heads = _heads(2)
    out = dec(*args, bbox_heads=heads)
    ref0 = args[2]
    assert out.references[0] is ref0
    ref1 = out.references[1]
    assert ref1.shape == (2, 6, 4) and not ref1.requires_grad
    torch.testing.assert_close(ref1, refine_box(heads[0](out.hidden_states[0]), ref0).detach())
    plain = dec(*args)
    torch.testing.assert_close(out.hidden_states[0], plain.hidden_states[0])
    assert not torch.allclose(out.hidden_states[1], plain.hidden_states[1])
    with pytest.raises(ValueError, match="bbox_heads"):
        dec(*args, bbox_heads=heads[:1])


def test_decoder_look_forward_twice_same_values_gradient_one_layer_back():
    """Look-forward-twice: the references equal the plain refinement's, but a loss on layer
    l's box reaches layer l-1's box head (not layer l-2's), and no layer is fed a graph."""
    torch.manual_seed(6)
    args = _decoder_inputs(4)
    plain_dec = _decoder(3)
    lft_dec = DeformableDecoder(DeformableDecoderLayer(C, 64, 0.0, L, M, P), 3,
                                look_forward_twice=True).double()
    lft_dec.load_state_dict(plain_dec.state_dict())
    heads = _heads(3)
    plain = plain_dec(*args, bbox_heads=heads)
    lft = lft_dec(*args, bbox_heads=heads)
    torch.testing.assert_close(lft.hidden_states, plain.hidden_states)
    for a, b in zip(lft.references, plain.references):
        torch.testing.assert_close(a, b)
    assert lft.references[0] is args[2]
    assert all(r.requires_grad for r in lft.references[1:])

    def grads(out) -> list[bool]:
        heads.zero_grad(set_to_none=True)
        box = refine_box(heads[2](out.hidden_states[2]), out.references[2])
        box.sum().backward()
        return [h.layers[-1].weight.grad is not None for h in heads]

    assert grads(plain) == [False, False, True]
    assert grads(lft) == [False, True, True]


def test_decoder_scales_references_by_valid_ratios():
    _, vr = _padding_mask()
    ref2 = torch.rand(2, 3, 2, dtype=torch.float64)
    ref4 = torch.rand(2, 3, 4, dtype=torch.float64)
    s2 = scale_reference_points(ref2, vr)
    s4 = scale_reference_points(ref4, vr)
    assert s2.shape == (2, 3, L, 2) and s4.shape == (2, 3, L, 4)
    torch.testing.assert_close(s2[1, 0, 0], ref2[1, 0] * vr[1, 0])
    torch.testing.assert_close(s4[1, 2, 1], ref4[1, 2] * vr[1, 1].repeat(2))
    # the first layer's cross-attention samples around the scaled reference
    torch.manual_seed(6)
    dec = _decoder(1)
    args = list(_decoder_inputs(2))
    out = dec(*args)
    layer = dec.layers[0]
    t = layer.norm2(args[0] + layer.self_attn(args[0] + args[1], args[0] + args[1], args[0])[0])
    offsets = layer.cross_attn.sampling_offsets(t + args[1]).view(2, 6, M, L, P, 2)
    wh = torch.tensor([[w_, h_] for h_, w_ in SHAPES], dtype=torch.float64)
    scaled = scale_reference_points(args[2], args[6])
    expected = scaled[:, :, None, :, None, :] + offsets / wh[None, :, None, :]
    torch.testing.assert_close(out.sampling_locations[:, 0], expected)


# ----------------------------------------------------------------------------------------- keys, backward


def _official_suffixes(prefix: str) -> dict[str, list[int]]:
    found = {}
    for line in KEYS_FILE.read_text().splitlines():
        if line.startswith(prefix):
            key, shape = line.split("\t")[:2]
            found[key[len(prefix):]] = [int(s) for s in shape.strip("[]").split(",") if s.strip()]
    return found


@pytest.mark.parametrize(
    "prefix, layer_cls",
    [
        ("transformer.encoder.layers.0.", DeformableEncoderLayer),
        ("transformer.decoder.layers.0.", DeformableDecoderLayer),
    ],
)
def test_state_dict_keys_match_official(prefix, layer_cls):
    official = _official_suffixes(prefix)
    assert official, f"no {prefix} keys in {KEYS_FILE}"
    layer = layer_cls(256, 1024, 0.1, 4, 8, 4)
    ours = {k: list(v.shape) for k, v in layer.state_dict().items()}
    assert list(ours) == list(official)  # same keys, same order
    assert ours == official


def test_backward_through_encoder_and_decoder():
    torch.manual_seed(7)
    spatial_shapes, level_start_index, n = _levels()
    mask, vr = _padding_mask()
    enc = DeformableEncoder(DeformableEncoderLayer(C, 64, 0.1, L, M, P), 2).double()
    dec = _decoder(2)
    heads = _heads(2)
    src = torch.randn(2, n, C, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(2, n, C, dtype=torch.float64)
    memory = enc(src, pos, spatial_shapes, level_start_index, vr, mask)
    tgt, qpos, ref, _, *_ = _decoder_inputs(2)
    out = dec(tgt, qpos, ref, memory, spatial_shapes, level_start_index, vr, mask, bbox_heads=heads)
    boxes = [refine_box(heads[i](out.hidden_states[i]), out.references[i]) for i in range(2)]
    loss = out.hidden_states.square().mean() + sum(b.sum() for b in boxes)
    loss.backward()
    assert src.grad is not None and torch.isfinite(src.grad).all() and src.grad.abs().sum() > 0
    assert ref.grad is not None and ref.grad.abs().sum() > 0  # through layer-0 sampling and pred box 0
    for name, p in list(enc.named_parameters()) + list(dec.named_parameters()) + list(heads.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert enc.layers[0].self_attn.sampling_offsets.weight.grad.abs().sum() > 0

