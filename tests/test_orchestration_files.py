"""The cluster files under orchestration/ parse and have the structure their tools expect:
the Ray cluster launcher config (checked against Ray's own schema too) and the KubeRay RayJob."""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
ORCH = REPO / "orchestration"
LAUNCHER = ORCH / "ray-cluster.yaml"
RAYJOB = ORCH / "kuberay-rayjob.yaml"
SWEEP_FLAGS = {"--dry-run", "--address", "--force", "--max-concurrent", "--set"}


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} is not a YAML mapping"
    return data


def _pinned_ray_version() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d.split("==", 1)[1] for d in deps if re.match(r"ray(\[.*\])?==", d)]
    assert len(pins) == 1, deps
    return pins[0]


def _sweep_command(entrypoint: str) -> list[str]:
    """The tokens of ``sdetr sweep ...`` inside a shell entrypoint."""
    tokens = shlex.split(entrypoint)
    start = next(i for i in range(len(tokens) - 1) if tokens[i:i + 2] == ["sdetr", "sweep"])
    end = next((i for i in range(start, len(tokens)) if tokens[i] in ("&&", ";", "|")),
               len(tokens))
    return tokens[start:end]


def test_every_yaml_parses_and_is_known():
    found = sorted(ORCH.rglob("*.y*ml"))
    assert found == sorted([LAUNCHER, RAYJOB]), found
    for path in found:
        _load(path)


def test_launcher_node_types_and_gpu_workers():
    cfg = _load(LAUNCHER)
    assert cfg["cluster_name"] and cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    assert head in types
    assert "GPU" not in types[head]["resources"]
    workers = {name: t for name, t in types.items() if name != head}
    assert workers
    for name, node in workers.items():
        assert node["resources"]["GPU"] == 8, name
        assert node["resources"]["CPU"] >= 8, name
        assert 0 <= node["min_workers"] <= node["max_workers"] <= cfg["max_workers"], name
        assert node["node_config"]["InstanceType"], name


def test_launcher_installs_like_the_makefile_and_starts_ray():
    cfg = _load(LAUNCHER)
    setup = "\n".join(cfg["setup_commands"])
    torch_spec = re.search(r"^TORCH_SPEC\s*:=\s*(.+)$", (REPO / "Makefile").read_text(),
                           re.M).group(1).strip()
    assert f'pip install -q "{torch_spec}"' in setup
    assert "pip install -q --no-build-isolation -e ." in setup
    assert setup.index(torch_spec) < setup.index("--no-build-isolation")  # torch first
    assert "/shared" in setup
    head_start = " ".join(cfg["head_start_ray_commands"])
    worker_start = " ".join(cfg["worker_start_ray_commands"])
    assert "ray start --head" in head_start and "RAY_AUTH_MODE=token" in head_start
    assert "--address=$RAY_HEAD_IP:6379" in worker_start and "RAY_AUTH_MODE=token" in worker_start
    mounts = cfg["file_mounts"]
    assert mounts["/home/ubuntu/sdetr"] == "."
    assert (REPO / "setup.py").is_file()  # "." is the repository root (run `ray up` there)
    assert "~/.ray/auth_token" in mounts.values()
    assert "/.venv" in cfg["rsync_exclude"] and "*.so" in cfg["rsync_exclude"]


def test_launcher_passes_rays_own_schema():
    pytest.importorskip("jsonschema")
    util = pytest.importorskip("ray.autoscaler._private.util")
    cfg = _load(LAUNCHER)
    util.validate_config(util.prepare_config(copy.deepcopy(cfg)))


def test_rayjob_structure():
    job = _load(RAYJOB)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert "sdetr sweep experiments/table1.yaml" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == _pinned_ray_version()
    assert cluster["authOptions"]["mode"] == "token"
    head_pod = cluster["headGroupSpec"]["template"]["spec"]
    groups = cluster["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        pod = group["template"]["spec"]
        for container in pod["containers"]:
            for side in ("requests", "limits"):
                assert int(container["resources"][side]["nvidia.com/gpu"]) == 8
    for pod in [head_pod] + [g["template"]["spec"] for g in groups]:
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["shared"]["persistentVolumeClaim"]["claimName"]
        for container in pod["containers"]:
            mounts = container["volumeMounts"]
            assert {m["name"] for m in mounts} <= set(volumes)
            assert "/shared" in {m["mountPath"] for m in mounts}
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["MLFLOW_TRACKING_URI"].startswith("http://")
    head_ports = {p["containerPort"] for p in head_pod["containers"][0]["ports"]}
    assert {6379, 8265} <= head_ports


def test_rayjob_entrypoint_parses_with_the_sweep_cli():
    tokens = _sweep_command(_load(RAYJOB)["spec"]["entrypoint"])
    assert tokens[2] == "experiments/table1.yaml"
    assert {t for t in tokens if t.startswith("--")} <= SWEEP_FLAGS
    from sdetr.cli import build_parser

    try:
        args = build_parser().parse_args(tokens[1:])
    except SystemExit:
        pytest.fail(f"`{' '.join(tokens)}` does not parse with `sdetr sweep`")
    assert args.file == "experiments/table1.yaml" and args.address == "auto"
    assert ["data.root=/shared/coco"] in args.overrides


def test_sweep_file_named_by_the_rayjob_exists():
    target = REPO / _sweep_command(_load(RAYJOB)["spec"]["entrypoint"])[2]
    if not target.is_file():
        pytest.skip(f"{target.relative_to(REPO)} is not in the repository yet")
    assert yaml.safe_load(target.read_text())


def test_readme_points_at_files_that_exist():
    text = (ORCH / "README.md").read_text()
    named = set(re.findall(r"orchestration/[\w./-]+\.(?:ya?ml|json)", text))
    named |= {f"orchestration/deepspeed/{n}" for n in re.findall(r"`(zero\w*\.json)`", text)}
    assert named
    missing = sorted(n for n in named if not (REPO / n).is_file())
    assert not missing, missing
