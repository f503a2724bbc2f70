"""Backbones: shapes on odd sizes, freezing, FrozenBatchNorm2d, weights files.

REFERENCE §2.1, §2.2, §8, §11.2.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torchvision
from torch import nn

from sdetr.models.backbone import (
    RESNET_LAYERS, FrozenBatchNorm2d, ResNetBackbone, SwinBackbone, build_backbone, swin_official_to_ours,
)
from sdetr.models.backbone.resnet import StemMaxPool
from sdetr.models.backbone.swin import _PadFirstSwinBlock


def _n_params(module: nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


def _expected_sizes(h: int, w: int) -> list[tuple[int, int]]:
    return [(math.ceil(h / s), math.ceil(w / s)) for s in (8, 16, 32)]


@pytest.fixture(scope="module")
def swin() -> SwinBackbone:
    torch.manual_seed(0)
    return build_backbone("swin_t").eval()


@pytest.mark.parametrize("name, channels, size", [
    ("resnet18", [128, 256, 512], (97, 131)),
    ("resnet10", [128, 256, 512], (97, 131)),
    ("resnet34", [128, 256, 512], (33, 70)),
    ("resnet50", [512, 1024, 2048], (97, 131)),
])
def test_resnet_maps_channels_strides_sizes(name: str, channels: list[int], size: tuple[int, int]) -> None:
    backbone = build_backbone(name).eval()
    assert backbone.out_channels == channels and backbone.strides == [8, 16, 32]
    with torch.no_grad():
        outs = backbone(torch.randn(2, 3, *size))
    assert [tuple(o.shape[:2]) for o in outs] == [(2, c) for c in channels]
    assert [tuple(o.shape[2:]) for o in outs] == _expected_sizes(*size)
    assert not any(n.startswith(("fc", "global_pool")) for n, _ in backbone.body.named_parameters())


@pytest.mark.parametrize("name, width, channels, params", [
    ("resnet18", 32, [64, 128, 256], 2_814_976),
    ("resnet18", 48, [96, 192, 384], 6_302_816),
    ("resnet10", 32, [64, 128, 256], 1_246_336),
    ("resnet50", 32, [256, 512, 1024], 5_875_904),
])
def test_resnet_width_scales_every_stage(name: str, width: int, channels: list[int],
                                         params: int) -> None:
    """A width-w ResNet has w·2^i planes in stage i (the 7x7 stem keeps 64 channels): C3/C4/C5
    (and the maps) scale by w/64 and the parameters by about (w/64)^2."""
    backbone = build_backbone(name, width=width).eval()
    assert backbone.out_channels == channels
    assert backbone.body.conv1.out_channels == 64
    assert backbone.body.layer1[0].conv1.out_channels == width
    assert sum(p.numel() for p in backbone.parameters()) == params
    with torch.no_grad():
        outs = backbone(torch.randn(2, 3, 97, 131))
    assert [tuple(o.shape[:2]) for o in outs] == [(2, c) for c in channels]
    assert [tuple(o.shape[2:]) for o in outs] == _expected_sizes(97, 131)
    with pytest.raises(ValueError, match="width must be a positive multiple of 8"):
        build_backbone(name, width=20)
    with pytest.raises(ValueError, match="width apply to ResNets"):
        build_backbone("swin_t", width=width)


def test_resnet_width_reaches_the_input_projection() -> None:
    from sdetr.config import load_config
    from sdetr.models import build_model
    model = build_model(load_config("sparse_detr_tiny", ["model.backbone.width=32"]).model)
    assert model.backbone.out_channels == [64, 128, 256]
    assert [seq[0].in_channels for seq in model.input_proj.proj] == [64, 128, 256, 256]


@pytest.mark.parametrize("size", [(100, 130), (37, 61)])
def test_swin_maps_channels_strides_sizes(swin: SwinBackbone, size: tuple[int, int]) -> None:
    # (37, 61): every stage map (10x16 … 2x2) is smaller than or not a multiple of the window 7.
    assert swin.out_channels == [192, 384, 768] and swin.strides == [8, 16, 32]
    with torch.no_grad():
        outs = swin(torch.randn(1, 3, *size))
    assert [o.shape[1] for o in outs] == [192, 384, 768]
    assert [tuple(o.shape[2:]) for o in outs] == _expected_sizes(*size)
    assert all(o.is_contiguous() for o in outs)


def test_resnet50_paper_freezing_counts() -> None:
    backbone = build_backbone("resnet50")
    # Frozen = conv weights of the stem and layer1 only: FrozenBatchNorm2d affines are buffers.
    # conv1 3*64*7*7 = 9,408; layer1 block0 4,096 + 36,864 + 16,384 + 16,384 (downsample),
    # blocks 1-2 2 * (16,384 + 36,864 + 16,384) → 212,992. (225,344 would include the BN affines.)
    assert _n_params(backbone, trainable=False) == 9_408 + 212_992 == 222_400
    assert _n_params(backbone, trainable=True) == 23_232_512  # layer2-4 convs (REFERENCE §8 totals)
    frozen = {n.split(".")[1] for n, p in backbone.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1", "layer1"}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules()) == 53


def test_resnet_trainable_batchnorm_and_train_all() -> None:
    backbone = ResNetBackbone("resnet50", frozen_bn=False, train_layers=RESNET_LAYERS)
    assert all(p.requires_grad for p in backbone.parameters())
    assert backbone.body.bn1.weight.requires_grad and isinstance(backbone.body.bn1, nn.BatchNorm2d)
    torchvision_total = _n_params(torchvision.models.resnet50()) - (2048 * 1000 + 1000)  # minus fc
    assert _n_params(backbone) == torchvision_total == 23_508_032
    assert all(p.requires_grad for p in build_backbone("resnet18", train_all=True).parameters())
    assert isinstance(build_backbone("resnet18").body.bn1, nn.BatchNorm2d)  # from-scratch default


def test_swin_frozen_stage_counts(swin: SwinBackbone) -> None:
    frozen_names = [n for n, p in swin.named_parameters() if not p.requires_grad]
    assert {n.split(".")[1] if n.startswith("body.patch") else ".".join(n.split(".")[1:4])
            for n in frozen_names} == {"patch_embed", "layers.0.blocks", "layers.1.downsample"}
    # patch embed 4,896 + two 96-d blocks 2 * 112,347 + merging 96→192 (norm 768 + 73,728)
    assert _n_params(swin, trainable=False) == 4_896 + 224_694 + 74_496 == 304_086
    assert _n_params(swin, trainable=True) == 27_216_420
    assert all(p.requires_grad for p in build_backbone("swin_t", train_all=True).parameters())


def test_frozen_bn_equals_batchnorm_eval_and_drops_num_batches_tracked() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6, eps=1e-5).double()
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    frozen = FrozenBatchNorm2d(6).double()
    frozen.load_state_dict(bn.state_dict())  # has num_batches_tracked: dropped, strict load passes
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(frozen(x), bn.eval()(x), rtol=1e-12, atol=1e-12)
    assert not list(frozen.parameters())


def test_frozen_bn_counts_no_fvcore_flops() -> None:
    fvcore_nn = pytest.importorskip("fvcore.nn")
    x = torch.randn(1, 8, 5, 5)
    assert fvcore_nn.FlopCountAnalysis(FrozenBatchNorm2d(8), x).total() == 0
    assert fvcore_nn.FlopCountAnalysis(nn.BatchNorm2d(8).eval(), x).total() > 0


def test_resnet50_loads_torchvision_weights_and_matches(tmp_path) -> None:
    torch.manual_seed(0)
    reference = torchvision.models.resnet50().eval()
    with torch.no_grad():
        for m in reference.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "r50_torchvision.pth"
    torch.save(reference.state_dict(), path)
    backbone = build_backbone("resnet50", weights=str(path)).eval()
    report = backbone.load_report
    assert report.missing == () and report.unexpected == ()
    assert set(report.ignored) == {"fc.weight", "fc.bias"}
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        stem = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        c3 = reference.layer2(reference.layer1(stem))
        c4 = reference.layer3(c3)
        expected = [c3, c4, reference.layer4(c4)]
        outs = backbone(x)
    # fp32 rounding of two conv paths reaches 1.05e-4 on some CPUs (AVX-512); a wrong key
    # mapping would be off by O(1)
    for out, exp in zip(outs, expected):
        torch.testing.assert_close(out, exp, rtol=1e-4, atol=5e-4)


def test_resnet18_round_trip_timm_names(tmp_path) -> None:
    torch.manual_seed(1)
    source = build_backbone("resnet18").eval()
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": source.body.state_dict()}, path)  # timm names, wrapped
    target = build_backbone("resnet18", weights=str(path)).eval()
    assert target.load_report.missing == () and target.load_report.unexpected == ()
    x = torch.randn(2, 3, 97, 131)
    with torch.no_grad():
        for a, b in zip(source(x), target(x)):
            assert torch.equal(a, b)


def _as_official(backbone: SwinBackbone) -> dict[str, torch.Tensor]:
    """The backbone's weights as an official (microsoft) ImageNet checkpoint would name them."""
    out = {}
    for key, value in backbone.body.state_dict().items():
        for i in (1, 2, 3):
            key = key.replace(f"layers.{i}.downsample.", f"layers.{i - 1}.downsample.")
        out[key] = value
    for i in range(3):
        out[f"norm{i + 1}.weight"] = backbone.out_norms[i].weight.detach().clone()
        out[f"norm{i + 1}.bias"] = backbone.out_norms[i].bias.detach().clone()
    out["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    out["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)
    out.update({"norm.weight": torch.ones(768), "norm.bias": torch.zeros(768),
                "head.weight": torch.zeros(1000, 768), "head.bias": torch.zeros(1000)})
    return out


def test_swin_round_trip_official_names(tmp_path, swin: SwinBackbone) -> None:
    with torch.no_grad():
        for norm in swin.out_norms:  # non-default values so that the norm1/2/3 mapping is tested
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_()
    path = tmp_path / "swin_official.pth"
    torch.save({"model": _as_official(swin)}, path)
    torch.manual_seed(3)
    target = build_backbone("swin_t", weights=str(path)).eval()
    report = target.load_report
    assert report.missing == () and report.unexpected == ()
    assert len(report.loaded) == 175 and len(report.ignored) == 6
    x = torch.randn(1, 3, 37, 61)
    with torch.no_grad():
        for a, b in zip(swin(x), target(x)):
            assert torch.equal(a, b)


def test_swin_official_key_map() -> None:
    assert (swin_official_to_ours("layers.0.downsample.reduction.weight")
            == "body.layers.1.downsample.reduction.weight")
    assert swin_official_to_ours("layers.2.blocks.5.attn.qkv.bias") == "body.layers.2.blocks.5.attn.qkv.bias"
    assert swin_official_to_ours("norm3.weight") == "out_norms.2.weight"
    assert swin_official_to_ours("patch_embed.norm.bias") == "body.patch_embed.norm.bias"
    for ignored in ("norm.weight", "head.bias", "layers.1.blocks.1.attn_mask",
                    "layers.0.blocks.0.attn.relative_position_index"):
        assert swin_official_to_ours(ignored) is None


def test_swin_timm_names_report_missing_out_norms(tmp_path, swin: SwinBackbone) -> None:
    path = tmp_path / "swin_timm.pth"
    torch.save(swin.body.state_dict(), path)
    report = swin.load_weights(str(path))  # its own weights: only the report matters here
    assert set(report.missing) == {f"out_norms.{i}.{p}" for i in range(3) for p in ("weight", "bias")}
    assert report.unexpected == ()


def test_weights_file_errors_name_the_file(tmp_path) -> None:
    backbone = build_backbone("resnet18")
    with pytest.raises(ValueError, match=r"weights file .*nope\.pth: not found"):
        backbone.load_weights(str(tmp_path / "nope.pth"))
    unrelated = tmp_path / "detector.pth"
    torch.save({"model": {"backbone.0.body.conv1.weight": torch.zeros(64, 3, 7, 7),
                          "transformer.level_embed": torch.zeros(4, 256)}}, unrelated)
    with pytest.raises(ValueError, match=r"weights file .*detector\.pth: no key in common"):
        backbone.load_weights(str(unrelated))
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"weights file .*garbage\.pth: cannot be read"):
        backbone.load_weights(str(garbage))
    wrong_arch = tmp_path / "r18.pth"
    torch.save(backbone.body.state_dict(), wrong_arch)
    with pytest.raises(ValueError, match=r"weights file .*r18\.pth: body\.layer1\.0\.conv1\.weight has"):
        build_backbone("resnet50", weights=str(wrong_arch))


def test_build_backbone_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'resnet101'"):
        build_backbone("resnet101")
    with pytest.raises(ValueError, match="frozen_bn=False does not apply to swin_t"):
        build_backbone("swin_t", frozen_bn=False)
    with pytest.raises(ValueError, match="unknown train_layers"):
        ResNetBackbone("resnet18", train_layers=("layer5",))


def _official_shifted_window_attention(block: _PadFirstSwinBlock, x: torch.Tensor) -> torch.Tensor:
    """Naive official detection-Swin W-MSA/SW-MSA: pad, roll, attend per window, roll back, crop."""
    batch, height, width, channels = x.shape
    ws, shift, heads = block.window_size[0], block.shift_size[0], block.attn.num_heads
    hp, wp = math.ceil(height / ws) * ws, math.ceil(width / ws) * ws
    xp = x.new_zeros(batch, hp, wp, channels)
    xp[:, :height, :width] = x
    region = torch.zeros(hp, wp)
    if shift:
        xp = torch.roll(xp, (-shift, -shift), (1, 2))
        cuts = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
        for i, hs in enumerate(cuts):
            for j, wsl in enumerate(cuts):
                region[hs, wsl] = 3 * i + j
    ys, xs = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    rel = (ys[:, None] - ys[None, :] + ws - 1) * (2 * ws - 1) + (xs[:, None] - xs[None, :] + ws - 1)
    bias = block.attn.relative_position_bias_table[rel].permute(2, 0, 1)  # (heads, 49, 49)
    out = torch.zeros_like(xp)
    for top in range(0, hp, ws):
        for left in range(0, wp, ws):
            tokens = xp[:, top:top + ws, left:left + ws].reshape(batch, ws * ws, channels)
            labels = region[top:top + ws, left:left + ws].flatten()
            mask = torch.where(labels[:, None] == labels[None, :], 0.0, -100.0).to(x.dtype)
            q, k, v = block.attn.qkv(tokens).reshape(batch, ws * ws, 3, heads, -1).permute(2, 0, 3, 1, 4)
            attn = (q * block.attn.scale) @ k.transpose(-2, -1) + bias + mask
            y = (attn.softmax(-1) @ v).transpose(1, 2).reshape(batch, ws * ws, channels)
            out[:, top:top + ws, left:left + ws] = block.attn.proj(y).reshape(batch, ws, ws, channels)
    if shift:
        out = torch.roll(out, (shift, shift), (1, 2))
    return out[:, :height, :width]


@pytest.mark.parametrize("block_index", [0, 1])  # plain and shifted windows
def test_swin_window_attention_follows_official_pad_then_shift(swin: SwinBackbone, block_index: int) -> None:
    block = copy.deepcopy(swin.body.layers[0].blocks[block_index]).double().eval()
    assert isinstance(block, _PadFirstSwinBlock) and block.shift_size == ((0, 0), (3, 3))[block_index]
    x = torch.randn(2, 11, 9, 96, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(block._attn(x), _official_shifted_window_attention(block, x))


def test_zero_init_residual_starts_every_block_as_the_identity() -> None:
    """model.backbone.zero_init_residual: the last BN of every block starts at weight 0, so a
    block's output is relu(shortcut); the default keeps torchvision's weight 1."""
    from sdetr.config import ConfigError, load_config
    from sdetr.models.backbone import build_backbone

    zero = build_backbone("resnet18", frozen_bn=False, train_all=True, zero_init_residual=True)
    plain = build_backbone("resnet18", frozen_bn=False, train_all=True)
    for name, stage in zero.body.named_children():
        if name.startswith("layer"):
            for block in stage:
                assert float(block.bn2.weight.detach().abs().sum()) == 0.0
                assert float(block.bn1.weight.detach().abs().sum()) > 0.0
    assert float(plain.body.layer1[0].bn2.weight.detach().abs().sum()) > 0.0
    block = zero.body.layer1[0].eval()
    x = torch.randn(1, 64, 8, 8).relu()
    torch.testing.assert_close(block(x), x)  # no downsample: identity shortcut
    assert load_config("sparse_detr_tiny", ["model.backbone.zero_init_residual=true"])
    with pytest.raises(ConfigError, match="zero_init_residual"):
        load_config("sparse_detr_swint", ["model.backbone.zero_init_residual=true"])
    with pytest.raises(ConfigError, match="zero_init_residual"):
        load_config("sparse_detr_tiny", ["model.backbone.zero_init_residual=true",
                                         "model.backbone.weights=w.pth"])


def test_resnet10_is_resnet18_with_one_block_per_stage() -> None:
    r10, r18 = build_backbone("resnet10"), build_backbone("resnet18")
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        assert len(getattr(r10.body, stage)) == 1 and len(getattr(r18.body, stage)) == 2
    assert set(r10.state_dict()) < set(r18.state_dict())
    assert not r10.body.layer1[0].bn2.weight.eq(0).any()  # torchvision-like init, not zero-init


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stem_max_pool_equals_max_pool2d_values_and_gradients(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = torch.relu(torch.randn(2, 16, 37, 52)).to(dtype)  # ReLU output: many tied zeros
    ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = StemMaxPool()(ours), nn.MaxPool2d(3, 2, 1)(ref)
    assert out.is_contiguous() and out.shape == expected.shape == (2, 16, 19, 26)
    assert torch.equal(out, expected)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    assert ours.grad.is_contiguous() and torch.equal(ours.grad, ref.grad)
    with torch.no_grad():
        assert torch.equal(StemMaxPool()(x), expected)


def test_stem_max_pool_gradcheck_and_resnet_uses_it() -> None:
    x = torch.randn(1, 3, 11, 14, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(StemMaxPool(), (x,))
    assert isinstance(build_backbone("resnet18").body.maxpool, StemMaxPool)


def test_channels_last_resnet_matches_nchw_in_values_and_gradients() -> None:
    """``channels_last`` changes the layout, not the model: same outputs and weight gradients
    (up to the convolutions' summation order), maps channels_last, and the stem pooled by
    torch's channels_last kernel (the NCHW op is for NCHW maps)."""
    torch.manual_seed(0)
    nchw = build_backbone("resnet18", frozen_bn=False, train_all=True).train()
    torch.manual_seed(0)
    nhwc = build_backbone("resnet18", frozen_bn=False, train_all=True,
                          channels_last=True).train()
    nhwc.weights_to_channels_last()
    conv = nhwc.body.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x = torch.randn(2, 3, 64, 80)
    outs, refs = nhwc(x), nchw(x)
    for out, ref in zip(outs, refs):
        assert out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    sum(o.square().sum() for o in outs).backward()
    sum(r.square().sum() for r in refs).backward()
    for (name, p), q in zip(nhwc.named_parameters(), nchw.parameters()):
        error = float((p.grad - q.grad).norm() / q.grad.norm())
        assert error < 1e-4, (name, error)
    pooled = nhwc.body.maxpool(torch.randn(1, 4, 9, 9).contiguous(memory_format=torch.channels_last))
    assert pooled.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="channels_last and width apply to ResNets"):
        build_backbone("swin_t", channels_last=True)
