"""Profiling: fvcore handles vs the traced reference ops, backend independence, the per-group
breakdown, uncounted-op listing, FPS/memory protocols, the CLI JSON and MLflow logging.

Tiny models and small images only (the R50 targets at 850×1040 are checked by hand, see the
profiling report)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import micro_config
from sdetr.cli import main
from sdetr.models import build
from sdetr.ops import available_backends, backends, ms_deform_attn, ms_deform_attn_pytorch
from sdetr.profiling import (FlopCount, ProfileOptions, count_flops, flop_group, log_profile,
                             mean_flop_counts, profile_model, profiling_modules, random_input)
from sdetr.profiling.handles import kda_flops, ms_deform_attn_flops
from sdetr.profiling.reference import reconcile_published, reference_key

fvcore = pytest.importorskip("fvcore")
from fvcore.nn import FlopCountAnalysis  # noqa: E402 (after the importorskip)

SHAPES = [(6, 5), (3, 3)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads make every small parallel op
    wait for a scheduler slice (the CLI test below takes ~60 s instead of ~8 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _Fn(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _msda_problem(batch=2, heads=2, channels=4, queries=7, points=3):
    gen = torch.Generator().manual_seed(0)
    shapes = torch.tensor(SHAPES, dtype=torch.long)
    start = torch.tensor([0, SHAPES[0][0] * SHAPES[0][1]], dtype=torch.long)
    n = sum(h * w for h, w in SHAPES)
    value = torch.randn(batch, n, heads, channels, generator=gen)
    loc = torch.rand(batch, queries, heads, len(SHAPES), points, 2, generator=gen)
    weights = torch.rand(batch, queries, heads, len(SHAPES), points, generator=gen)
    return value, shapes, start, loc, weights


def _fvcore_total(module: nn.Module, inputs, **handles) -> tuple[int, dict]:
    analysis = FlopCountAnalysis(module, inputs).set_op_handle(**handles)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return int(analysis.total()), dict(analysis.unsupported_ops())


def test_ms_deform_attn_handle_equals_fvcore_count_of_reference_path():
    from sdetr.profiling.handles import CUSTOM_HANDLES
    problem = _msda_problem()
    traced_reference, _ = _fvcore_total(_Fn(ms_deform_attn_pytorch), problem)
    op = _Fn(lambda *a: ms_deform_attn(*a, backend="reference"))
    without_handle, unsupported = _fvcore_total(op, problem)
    with_handle, _ = _fvcore_total(op, problem, **CUSTOM_HANDLES)
    value, _, _, loc, _ = problem
    assert traced_reference == ms_deform_attn_flops(list(value.shape), list(loc.shape))
    assert traced_reference == 4 * 2 * 2 * 4 * 7 * len(SHAPES) * 3
    assert with_handle == traced_reference
    assert without_handle == 0 and unsupported == {"sdetr::ms_deform_attn": 1}


def test_kda_handle_equals_fvcore_count_of_official_style_kda():
    if not hasattr(torch.ops.sdetr, "kda"):
        pytest.skip("sdetr::kda is not defined")
    from sdetr.ops import kda
    from sdetr.profiling.handles import CUSTOM_HANDLES
    value, shapes, start, loc, _ = _msda_problem()
    query = torch.randn(value.shape[0], loc.shape[1], value.shape[2], value.shape[3])

    def sample(v, grids):  # (B, N, M, D) at (B*M, Q, L, P, 2) -> (B*M, D, Q, L*P)
        b, _, m, d = v.shape
        maps = v.split([h * w for h, w in SHAPES], dim=1)
        return torch.cat([F.grid_sample(mp.flatten(2).transpose(1, 2).reshape(b * m, d, h, w),
                                        grids[:, :, i], align_corners=False)
                          for i, (mp, (h, w)) in enumerate(zip(maps, SHAPES))], -1)

    def official_style(q, v, lc):  # 2 grid_samples + q·k matmul + weights × values matmul
        grids = (2 * lc - 1).transpose(1, 2).flatten(0, 1)
        keys, values = sample(v, grids), sample(v, grids)
        qh = q.permute(0, 2, 1, 3).flatten(0, 1).unsqueeze(2)  # (B*M, Q, 1, D)
        attn = torch.matmul(qh, keys.permute(0, 2, 1, 3)).softmax(-1)  # (B*M, Q, 1, L*P)
        return torch.matmul(attn, values.permute(0, 2, 3, 1))  # (B*M, Q, 1, D)

    expected, _ = _fvcore_total(_Fn(official_style), (query, value, loc))
    op = _Fn(lambda q, v, lc: kda(q, v, v, shapes, start, lc, backend="reference")[0])
    counted, _ = _fvcore_total(op, (query, value, loc), **CUSTOM_HANDLES)
    assert counted == expected == kda_flops(list(value.shape), list(loc.shape))


class _Attention(nn.Module):
    def __init__(self, dim: int, self_attention: bool) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.self_attention = self_attention

    def forward(self, images, masks):
        query = images if self.self_attention else images + 1
        return self.mha(query, images, images, need_weights=False)[0]


@pytest.mark.parametrize("self_attention", [True, False])
def test_attention_handles_count_multihead_attention_as_matmuls(self_attention):
    length, dim = 11, 16
    x = torch.randn(1, length, dim)
    flops = count_flops(_Attention(dim, self_attention).eval(), x, x)
    assert flops.total == 4 * length * dim * dim + 2 * length * length * dim
    assert flops.uncounted == {}


def _with_dummy_backend(monkeypatch) -> str:
    registry = backends._REGISTRY
    monkeypatch.setitem(registry, "ms_deform_attn", dict(registry["ms_deform_attn"]))
    backends.register_backend("ms_deform_attn", "dummy_profiling",
                              lambda *args: ms_deform_attn_pytorch(*args) * 1.0, None)
    return "dummy_profiling"


def test_count_is_the_same_whichever_backend_runs(monkeypatch):
    cfg = micro_config("deformable_detr_tiny").model
    other = ("compiled" if "compiled" in available_backends("ms_deform_attn")
             else _with_dummy_backend(monkeypatch))
    names = ["reference", other]
    inp = random_input(48, 64)
    totals = {}
    for name in names:
        built = build(cfg, kernel_backend=name)
        assert built.kernel_backend == name
        with profiling_modules(built.model):
            totals[name] = count_flops(built.model, inp.images, inp.masks).total
    assert len(set(totals.values())) == 1, totals


@pytest.fixture(scope="module")
def sparse_counts():
    """Full and inference-only counts of a micro Sparse DETR (with encoder auxiliary heads)."""
    model = build(micro_config("sparse_detr_tiny").model).model
    inp = random_input(64, 96)
    with profiling_modules(model, "full"):
        full = count_flops(model, inp.images, inp.masks)
    with profiling_modules(model, "inference_only"):
        inference = count_flops(model, inp.images, inp.masks)
    assert model.track_corr and not model.encoder.aux_in_eval  # restored afterwards
    return full, inference


def test_groups_sum_to_total_and_cover_every_component(sparse_counts):
    full, inference = sparse_counts
    assert sum(full.groups.values()) == full.total
    for group in ("backbone", "input_proj", "scoring_network", "encoder", "encoder_aux_heads",
                  "query_selection", "decoder", "heads"):
        assert full.groups[group] > 0, group
    # the shared LN(Linear) projection runs on all N tokens for both callers
    assert full.detail["token_projection_backbone"] == full.detail["token_projection_memory"] > 0
    assert full.detail["decoder_heads_refinement"] > 0 and full.detail["topk_head"] > 0
    # the auxiliary heads only add ops: inference-only = full − aux heads, exactly
    assert inference.groups["encoder_aux_heads"] == 0
    assert inference.total == full.total - full.groups["encoder_aux_heads"]


def test_elementwise_ops_listed_and_unknown_ops_reported(sparse_counts):
    full, _ = sparse_counts
    assert full.uncounted == {}
    assert full.ignored_by_convention["aten::sigmoid"] > 0
    # sparse_detr_tiny's query NMS: comparisons and masks, 0 by the convention
    assert {"aten::maximum", "aten::minimum", "aten::triu_"} <= set(full.ignored_by_convention)
    assert "aten::topk" in full.ignored_by_convention
    toy = _Fn(lambda images, masks: torch.cdist(images.flatten(2), images.flatten(2)).sigmoid())
    count = count_flops(toy, torch.randn(1, 3, 4, 5), torch.zeros(1, 4, 5, dtype=torch.bool))
    assert count.uncounted == {"aten::cdist": 1}
    assert count.ignored_by_convention == {"aten::sigmoid": 1}


def test_unused_module_calls_are_counted():
    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, images, masks):
            self.unused(images)
            return self.used(images)

    x = torch.randn(3, 8)
    assert count_flops(Toy(), x, x).total == 2 * 3 * 64
    assert count_flops(Toy(), x, x, keep_module_outputs=False).total == 3 * 64


def test_flop_group_rules():
    assert flop_group(["encoder", "encoder.scorer", "proposals", "proposals.enc_output"]) == "scoring_network"
    assert flop_group(["query_selector", "proposals", "proposals.enc_output"]) == "query_selection"
    assert flop_group(["query_selector", "query_selector.bbox_embed"]) == "heads"
    assert flop_group(["decoder", "heads.bbox_embed.5", "heads.bbox_embed.5.layers.0"]) == "heads"
    assert flop_group(["decoder", "decoder.layers.0"]) == "decoder"
    assert flop_group(["encoder", "encoder.aux_heads.class_embed.0"]) == "encoder_aux_heads"
    assert flop_group([]) == "other"


def _count(total: int, **groups: int) -> FlopCount:
    return FlopCount(total, groups, {}, {}, {}, {})


def test_coco_protocols_on_a_synthetic_coco_folder(tmp_path):
    from sdetr.data import generate_synthetic_coco
    generate_synthetic_coco(tmp_path / "coco", num_train=1, num_val=3, seed=0, min_size=48,
                            max_size=80)
    options = ProfileOptions(coco_root=str(tmp_path / "coco"), num_images=3, eval_size=48,
                             eval_max_size=80, batch_sizes=(2,), iters=1, warmup=0)
    result = profile_model(micro_config("sparse_detr_tiny"), ["flops", "fps"], options=options)
    flops = result["flops"]
    assert len(flops["per_image"]) == 3 and flops["gflops_last_image"] == flops["per_image"][-1]
    assert flops["gflops"] == pytest.approx(sum(flops["per_image"]) / 3)
    assert flops["protocol"]["input"] == "coco:val2017[:3]"
    fps = result["fps"]["b2"]["protocol"]
    assert fps["input"] == "coco:val2017[0]" and min(fps["image_size"]) == 48


def test_mean_over_images_reports_true_mean_and_last_image():
    summary = mean_flop_counts([_count(10**9, backbone=10**9), _count(3 * 10**9, backbone=3 * 10**9)])
    assert summary["gflops"] == 2.0 and summary["gflops_last_image"] == 3.0
    assert summary["groups"]["backbone"] == 2.0


def test_reference_key_and_reconciliation():
    from sdetr.config import load_config
    assert reference_key(load_config("sparse_detr_r50", ["model.rho=0.2"])) == ("sparse_detr_r50", 0.2)
    assert reference_key(load_config("deformable_detr_r50", ["model.kernel_backend=reference"])) \
        == ("deformable_detr_r50", None)
    assert reference_key(load_config("deformable_detr_r50", ["model.hidden_dim=128"])) is None
    count = FlopCount(100 * 10**9, {"scoring_network": 3 * 10**9, "encoder_aux_heads": 10**9},
                      {"token_projection_backbone": 10**9, "token_projection_memory": 10**9},
                      {}, {}, {})
    rec = reconcile_published(count, published=95.5)
    assert rec["terms"] == {"scoring_network": 2.0, "token_projection_backbone": 1.0,
                            "token_projection_memory": 1.0, "encoder_aux_heads": 1.0}
    assert rec["estimate"] == 95.0 and rec["gap"] == pytest.approx(-0.5)


PROTOCOL_KEYS = {"measurement", "input", "image_size", "batch_size", "mode", "modules", "device",
                 "precision", "kernel_backend", "convention", "iterations", "warmup",
                 "torch_version", "threads"}


def test_fps_and_memory_are_positive_with_protocol():
    cfg = micro_config("sparse_detr_tiny")
    options = ProfileOptions(image_size=(48, 64), batch_sizes=(2,), iters=2, warmup=1,
                             memory_warmup=0, device="cpu")
    result = profile_model(cfg, ["fps", "memory"], options=options)
    stats = result["fps"]["b2"]
    assert stats["fps"] > 0 and stats["median_ms"] > 0 and stats["iterations"] == 2
    assert stats["fps"] == pytest.approx(2e3 / stats["median_ms"])
    assert PROTOCOL_KEYS <= set(stats["protocol"])
    protocol = stats["protocol"]
    assert (protocol["device"], protocol["image_size"], protocol["batch_size"]) == ("cpu", [48, 64], 2)
    assert (protocol["iterations"], protocol["warmup"], protocol["precision"]) == (2, 1, "fp32")
    assert protocol["fold_bn"] is True and "20 Conv2d+BatchNorm pairs folded" in protocol["notes"][0]
    assert result["memory"]["inference_b2"]["protocol"]["fold_bn"] is False
    assert protocol["kernel_backend"]["ms_deform_attn"] in available_backends("ms_deform_attn")
    for key in ("inference_b2", "train_b2"):
        mem = result["memory"][key]
        assert mem["peak_bytes"] == mem["resident_bytes"] + mem["increment_bytes"]
        assert mem["increment_bytes"] > 0 and mem["resident_bytes"] > 0
        assert PROTOCOL_KEYS <= set(mem["protocol"])
    assert result["memory"]["train_b2"]["increment_bytes"] > result["memory"]["inference_b2"]["increment_bytes"]


class _RecordingTracker:
    def __init__(self) -> None:
        self.metrics, self.tags, self.flushed = {}, {}, False

    def log_metrics(self, metrics, step):
        self.metrics.update(metrics)

    def set_tags(self, tags):
        self.tags.update(tags)

    def flush(self):
        self.flushed = True


def test_log_profile_metrics_and_protocol_tags():
    cfg = micro_config("deformable_detr_tiny")
    result = profile_model(cfg, ["params", "flops"], options=ProfileOptions(image_size=(48, 64)))
    tracker = _RecordingTracker()
    log_profile(result, tracker)
    assert tracker.metrics["profile/gflops"] == pytest.approx(result["flops"]["gflops"])
    assert math.isclose(sum(v for k, v in tracker.metrics.items()
                            if k.startswith("profile/gflops_")
                            and k != "profile/gflops_inference_only"),
                        tracker.metrics["profile/gflops"], rel_tol=1e-9)
    assert tracker.metrics["profile/params_trainable"] == result["params_trainable"]
    assert tracker.tags["sdetr.profile.flops.convention"] == "fvcore, 1 multiply-add = 1 flop"
    assert tracker.tags["sdetr.profile.flops.image_size"] == "48x64"
    assert tracker.flushed


def test_cli_profile_json_and_mlflow(capsys, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(tracking_uri=uri).create_experiment(  # artifacts in tmp, not ./mlruns
        "profile-test", artifact_location=(tmp_path / "artifacts").as_uri())
    args = ["profile", "deformable_detr_tiny", "--what", "params,flops,fps,memory", "--json",
            "--image-size", "128,160", "--iters", "2", "--warmup", "1", "--tracking-uri", uri,
            "--experiment", "profile-test"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"params_trainable", "flops", "fps", "memory", "environment"} <= set(result)
    assert set(result["fps"]) == {"b1", "b4"}
    assert set(result["memory"]) == {"inference_b1", "train_b1", "inference_b4", "train_b4"}
    assert result["flops"]["protocol"]["image_size"] == [128, 160]
    assert result["flops"]["uncounted"] == {}
    run = mlflow.MlflowClient(tracking_uri=uri).get_run(result["mlflow_run_id"])
    assert run.data.metrics["profile/gflops"] == pytest.approx(result["flops"]["gflops"])
    assert run.data.metrics["profile/fps_b4"] == pytest.approx(result["fps"]["b4"]["fps"])
    assert "profile/mem_train_b1_peak_mb" in run.data.metrics
    assert run.data.params["model.encoder"] == "dense"
    assert run.data.tags["sdetr.profile.fps.b1.iterations"] == "2"
    assert run.data.tags["sdetr.profile.fps.b1.fold_bn"] == "True"
    assert run.data.tags["sdetr.profile.flops.fold_bn"] == "False"
    assert run.data.tags["sdetr.preset"] == "deformable_detr_tiny"
    assert (tmp_path / "artifacts").is_dir()


def test_cli_bench_models_json(capsys):
    args = ["bench", "models", "sparse_detr_tiny", "deformable_detr_tiny", "--json",
            "--image-size", "48,64", "--iters", "1", "--warmup", "0", "--kernel-backend", "reference",
            "--gemm-repeats", "1"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["baseline"] == "deformable_detr_tiny"
    (run,) = result["runs"]
    assert run["kernel_backend"] == {"sparse_detr_tiny": "reference", "deformable_detr_tiny": "reference"}
    assert run["protocol"]["image_size"] == [48, 64] and run["protocol"]["iterations"] == 1
    assert result["gflops"]["sparse_detr_tiny"] < result["gflops"]["deformable_detr_tiny"]
    assert result["gflops_ratio"]["deformable_detr_tiny"] == 1.0
    assert run["time_ratio"]["deformable_detr_tiny"] == 1.0
    sparse, dense = run["latency"]["sparse_detr_tiny"], run["latency"]["deformable_detr_tiny"]
    assert run["time_ratio"]["sparse_detr_tiny"] == pytest.approx(sparse["median_ms"] / dense["median_ms"])
    assert sparse["cpu_median_ms"] > 0 and sparse["iterations"] == 1
    assert result["fold_bn"] is True and run["fold_bn"] is True and run["protocol"]["fold_bn"] is True
    assert result["threads"] == run["protocol"]["threads"] == run["gemm_rate"]["threads"]
    assert run["bn_folding"]["sparse_detr_tiny"] == {"folded": 20, "unfolded": []}
    rate = run["gemm_rate"]
    assert rate["matmul_gmac_per_s"] == max(rate["matmul_by_size"].values()) > 0
    assert rate["conv_gmac_per_s"] > 0 and rate["floor_rate"] == "matmul"
    for name, gflops in result["gflops"].items():
        assert run["floor_ms"][name] == pytest.approx(1e3 * gflops / rate["matmul_gmac_per_s"])
        assert run["latency_over_floor"][name] == pytest.approx(
            run["latency"][name]["median_ms"] / run["floor_ms"][name])
    (realised,) = run["saving_realised"].values()
    assert realised == pytest.approx((1 - run["time_ratio"]["sparse_detr_tiny"])
                                     / (1 - result["gflops_ratio"]["sparse_detr_tiny"]))


@pytest.mark.parametrize("args, culprit", [
    (["--what", "flops,gflops"], "gflops"),
    (["--what", "latency"], "latency"),
    (["--what", "flops", "--image-size", "128"], "--image-size"),
    (["--what", "flops", "--kernel-backend", "nope"], "nope"),
])
def test_cli_profile_bad_input(capsys, args, culprit):
    assert main(["profile", "deformable_detr_tiny", *args]) == 2
    assert culprit in capsys.readouterr().err
