"""``sdetr doctor`` and ``sdetr bench kernels``: what they report, and the benchmark helpers."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from sdetr import ops
from sdetr.bench import median_ms, msda_problem, peak_allocated_bytes
from sdetr.bench.problems import R50_850x1040_LEVELS, dam_problem
from sdetr.cli import main

ROOT = pathlib.Path(ops.__file__).parents[2]


def _run_json(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_doctor_json_reports_facts_and_the_backend_of_every_op(capsys):
    facts = _run_json(capsys, ["doctor", "--json"])
    assert facts["torch"]["version"] == torch.__version__
    assert facts["torch"]["threads"] == torch.get_num_threads()
    assert facts["extension"]["available"] == ops.compiled_available()
    assert {op: info["resolved"] for op, info in facts["backends"].items()} == ops.backend_report()
    assert facts["gpus"] == [] or torch.cuda.is_available()
    compiler = facts["compiler"]
    assert (compiler["cxx"] is None) == ("reason" in compiler)
    assert len(facts["backend_lines"]) == len(facts["backends"])


def test_cpu_facts_read_the_bf16_flags_from_cpuinfo(tmp_path):
    from sdetr.bench.environment import cpu_facts
    from sdetr.cli.doctor_cmd import cpu_line
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\n"
                    "flags\t\t: fpu avx2 avx512_bf16 amx_tile amx_bf16\n\n"
                    "processor\t: 1\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx2\n")
    fast = cpu_facts(str(info))
    assert fast["model"] == "Test CPU 9000" and fast["bf16_flags"] == ["amx_bf16", "avx512_bf16"]
    assert "native bf16 (amx_bf16, avx512_bf16)" in cpu_line(fast)
    info.write_text("model name\t: Old CPU\nflags\t\t: fpu avx2\n")
    assert "keep train.precision=fp32" in cpu_line(cpu_facts(str(info)))
    unknown = cpu_facts(str(tmp_path / "missing"))
    assert unknown["bf16_flags"] is None and "native bf16 unknown" in cpu_line(unknown)


def test_doctor_says_plainly_when_the_reference_runs_without_the_extension():
    env = {**os.environ, "SDETR_DISABLE_COMPILED": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "sdetr", "doctor"], cwd=ROOT, capture_output=True, text=True,
                            env=env, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "extension     not available (disabled)" in out
    assert "ms_deform_attn: reference" in out and "pure-PyTorch reference runs because sdetr._C is not available" in out
    assert "SDETR_DISABLE_COMPILED=1" in out
    for word in ("torch", "CPU", "GPU", "C++ compiler", "CUDA toolkit"):
        assert word in out


@pytest.mark.skipif(not ops.compiled_available(), reason="sdetr._C not built")
def test_doctor_text_names_the_compiled_build(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "ms_deform_attn: compiled" in out and "dam_splat: compiled" in out
    assert "CPU kernels" in out and "-O3" in out


def test_bench_kernels_decoder_json_rows_ratios_and_threads(capsys):
    threads = torch.get_num_threads()
    try:
        result = _run_json(capsys, ["bench", "kernels", "--json", "--problem", "decoder", "--iters", "1",
                                    "--warmup", "0", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert result["threads"] == 1 and result["iters"] == 1
    rows = {(r["op"], r["backend"]): r for r in result["rows"]}
    expected = {("ms_deform_attn", b) for b in ops.available_backends("ms_deform_attn")}
    expected |= {("dam_splat", b) for b in ops.available_backends("dam_splat")}
    expected |= {("kda", b) for b in ops.available_backends("kda")}
    expected |= {("stem_max_pool", b) for b in ops.available_backends("stem_max_pool")}
    assert set(rows) == expected
    pools = [r for r in result["rows"] if r["op"] == "stem_max_pool"]
    assert {r["problem"] for r in pools} == {"tiny_train_bf16", "r50_eval_fp32"}
    assert all(r["forward_ms"] > 0 and r["forward_backward_speedup"] for r in pools)
    ref = rows[("ms_deform_attn", "reference")]
    assert ref["queries"] == 300 and ref["threads"] == 1
    assert ref["forward_speedup"] == 1.0 and ref["forward_backward_speedup"] == 1.0
    assert ref["peak_memory_ratio"] == 1.0
    assert ref["forward_ms"] > 0 and ref["forward_backward_ms"] > 0 and ref["peak_forward_backward_mib"] > 0
    assert rows[("dam_splat", "reference")]["queries"] == 6 * 300
    if ops.compiled_available():
        comp = rows[("ms_deform_attn", "compiled")]
        assert comp["forward_speedup"] == pytest.approx(ref["forward_ms"] / comp["forward_ms"])
        assert result["compiled"]["available"]


def test_bench_rejects_bad_iteration_counts(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "kernels", "--iters", "0"])
    with pytest.raises(ValueError, match="warmup"):
        median_ms(lambda: None, iters=1, warmup=-1)


def test_peak_allocated_bytes_counts_only_new_tensor_memory():
    live = torch.ones(1 << 20)  # allocated before the measurement: not counted
    size = 4 * (1 << 20)

    def allocate_two_and_free_one():
        first = torch.empty(1 << 20)
        second = torch.empty(1 << 20)
        del first
        return second.sum() + live.sum()

    peak = peak_allocated_bytes(allocate_two_and_free_one)
    assert 2 * size <= peak < 2 * size + 65536
    assert peak_allocated_bytes(lambda: live.add_(1)) < 4096


def test_problems_have_the_r50_sizes_and_realistic_locations():
    enc, dec = msda_problem("encoder"), msda_problem("decoder")
    assert enc.value.shape == (1, 18549, 8, 32) and enc.queries == 18549 and dec.queries == 300
    assert enc.spatial_shapes.tolist() == [list(s) for s in R50_850x1040_LEVELS]
    assert enc.sampling_locations.shape == (1, 18549, 8, 4, 4, 2)
    torch.testing.assert_close(enc.attention_weights.sum((-1, -2)), torch.ones(1, 18549, 8))
    inside = ((enc.sampling_locations >= 0) & (enc.sampling_locations <= 1)).all(-1).float().mean()
    assert 0.8 < inside < 1.0  # mostly inside the map, some samples outside
    locations, weights = dam_problem(dec)
    assert locations.shape == (1, 1800, 8, 4, 4, 2) and weights.shape == (1, 1800, 8, 4, 4)
    with pytest.raises(ValueError, match="problem kind"):
        msda_problem("huge")
