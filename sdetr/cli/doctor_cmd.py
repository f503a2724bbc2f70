"""``sdetr doctor [--json]``: torch / CUDA / compiler / GPU facts, the kernel build, and which
backend each op resolves to; says plainly when the reference backend runs and why."""

from __future__ import annotations

import argparse
from typing import Any

from sdetr.cli.common import print_json

REBUILD = "`pip install --no-build-isolation -e .` (see kernels/README.md)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="report the environment, the compiled kernels and the op backends")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def extension_line(ext: dict[str, Any]) -> str:
    if not ext["available"]:
        return f"not available ({ext['status']}): {ext['detail']}"
    cuda = f"CUDA kernels for {','.join(ext['cuda_archs']) or '?'}" if ext["cuda"] else "no CUDA kernels"
    return (f"sdetr._C at {ext['detail']}; {ext['compiler']}, flags {' '.join(ext['cxx_flags']) or '-'}, "
            f"CPU kernels {ext['cpu_capability']}, OpenMP {'on' if ext['openmp'] else 'off'}, {cuda}; "
            f"built against torch {ext['torch_version']}")


def backend_lines(facts: dict[str, Any]) -> list[str]:
    """One line per op: the backend it resolves to, and why when that is the reference."""
    ext = facts["extension"]
    lines = []
    for op, info in facts["backends"].items():
        if info["resolved"] is None:
            lines.append(f"{op}: ERROR {info['error']}")
            continue
        line = f"{op}: {info['resolved']} (available: {', '.join(info['available'])})"
        if info["resolved"] == "reference" and "compiled" not in info["available"]:
            why = "sdetr._C is not available" if not ext["available"] else "sdetr._C has no kernel for this op"
            line += f" -- the pure-PyTorch reference runs because {why}"
        lines.append(line)
    return lines


def extension_hint(ext: dict[str, Any]) -> str | None:
    """What to do when the extension is unavailable, by status."""
    if ext["available"]:
        return None
    if ext["status"] == "disabled":
        return f"compiled kernels disabled ({ext['detail']}): unset it to use them"
    return f"{ext['detail']}: every op uses the reference backend; build the kernels with {REBUILD}"


def notes(facts: dict[str, Any]) -> list[str]:
    """Warnings worth a line: no compiler, GPU without CUDA kernels, torch mismatch."""
    out, ext = [], facts["extension"]
    hint = extension_hint(ext)
    if hint:
        out.append(hint)
    if facts["compiler"]["cxx"] is None:
        out.append("no C++ compiler: the kernels cannot be built here; the reference backend is used")
    if facts["gpus"] and ext["available"] and not ext["cuda"]:
        out.append("a GPU is visible but sdetr._C has no CUDA kernels: backend 'compiled' raises for CUDA "
                   f"tensors; rebuild with the CUDA toolkit ({REBUILD}) or use backend 'reference'")
    if ext["available"] and ext["torch_version"] != facts["torch"]["version"].split("+")[0]:
        out.append(f"sdetr._C was built against torch {ext['torch_version']} but torch "
                   f"{facts['torch']['version']} is running: rebuild with {REBUILD}")
    return out


def cpu_line(cpu: dict[str, Any]) -> str:
    """CPU model, torch's kernel level and whether bf16 math is native (for ``bf16-mixed``)."""
    head = f"{cpu['model'] or 'unknown model'}, torch CPU kernels {cpu['torch_capability']}"
    if cpu["bf16_flags"] is None:
        return f"{head}; native bf16 unknown ({cpu.get('reason', 'no cpuinfo')})"
    if cpu["bf16_flags"]:
        return (f"{head}; native bf16 ({', '.join(cpu['bf16_flags'])}): "
                "train.precision=bf16-mixed is the fast CPU setting")
    return f"{head}; no native bf16: keep train.precision=fp32 on this CPU"


def format_report(facts: dict[str, Any]) -> str:
    torch_info, cc, cuda = facts["torch"], facts["compiler"], facts["cuda_toolkit"]
    gpus = "; ".join(f"{g['name']} (sm {g['capability']}, {g['memory_gib']} GiB)" for g in facts["gpus"])
    rows = [
        ("python", f"{facts['python']} ({facts['platform']})"),
        ("torch", (f"{torch_info['version']} (CUDA build: {torch_info['cuda_build'] or 'none'}), "
                   f"{torch_info['threads']} threads of {torch_info['cpu_count']} CPUs, "
                   f"{torch_info['parallel_backend']}")),
        ("CPU", cpu_line(facts["cpu"])),
        ("GPU", gpus or "none visible (torch.cuda.is_available() is False)"),
        ("C++ compiler", f"{cc['cxx']}: {cc['version']}" if cc["cxx"] else f"none ({cc['reason']})"),
        ("CUDA toolkit", f"{cuda['cuda_home']}: {cuda['nvcc_version']}" if cuda["cuda_home"]
         else f"none ({cuda['reason']})"),
        ("extension", extension_line(facts["extension"])),
    ]
    lines = [f"{name:<13} {text}" for name, text in rows]
    lines += [f"{'backend' if i == 0 else '':<13} {line}" for i, line in enumerate(backend_lines(facts))]
    lines += [f"{'note' if i == 0 else '':<13} {line}" for i, line in enumerate(notes(facts))]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from sdetr.bench.environment import collect_environment

    facts = collect_environment()
    if args.json:
        facts["backend_lines"] = backend_lines(facts)
        facts["notes"] = notes(facts)
        print_json(facts)
    else:
        print(format_report(facts))
    return 0
