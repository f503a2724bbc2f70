"""``sdetr eval``: COCO box AP of a checkpoint on the config's val split, tracked in MLflow.

``sdetr eval sparse_detr_tiny --checkpoint runs/w.pth --rho 0.1,0.2,0.5``
``sdetr eval sparse_detr_r50 --checkpoint r50_sparse_detr_rho_0.1.pth --official``
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Optional

from sdetr.cli.common import add_config_args, load_from_args
from sdetr.config import ConfigError

TABLE_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
CORR_KEY = "corr_mask_attn_map_dec_all"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint (COCO box AP) and track it")
    add_config_args(p)
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="sdetr weights file, training checkpoint folder, or (with --official) "
                        "a checkpoint of the official code")
    p.add_argument("--official", action="store_true",
                   help="the checkpoint was saved by the official Deformable/Sparse DETR code")
    p.add_argument("--rho", metavar="R1,R2,...",
                   help="evaluate a sparse model at these keeping ratios (default: the config's "
                        "eval.rho_sweep, else model.rho)")
    p.add_argument("--out", metavar="DIR",
                   help="output folder (default <train.output_dir>/eval/<name>)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--kernel-backend", choices=("auto", "reference", "compiled"),
                   help="ms_deform_attn backend (default: model.kernel_backend)")
    p.add_argument("--tracking-uri", metavar="URI",
                   help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else "
                        "sqlite:///mlflow.db)")
    p.add_argument("--experiment", default="sdetr", help="MLflow experiment (default sdetr)")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def parse_rhos(text: Optional[str]) -> list[float]:
    """``"0.1,0.2"`` -> [0.1, 0.2]; None -> []."""
    if text is None:
        return []
    try:
        rhos = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--rho {text!r}: expected comma-separated numbers") from None
    if not rhos:
        raise ConfigError(f"--rho {text!r}: no value")
    return rhos


def _device(choice: str) -> str:
    import torch
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {choice}: no CUDA device available")
    return choice


def _cell(value: Optional[float]) -> str:
    if value is None or math.isnan(value):
        return f"{'-':>7}"
    return f"{value:>7.4f}"


def format_table(results: dict) -> str:
    """One row per evaluation: rho, the TABLE_KEYS metrics and the Corr metric."""
    header = f"{'rho':>6} " + " ".join(f"{k:>7}" for k in TABLE_KEYS) + f" {'corr':>7}"
    rows = [header]
    for rho, result in results.items():
        cells = " ".join(_cell(result.metrics[k]) for k in TABLE_KEYS)
        rho_text = "-" if rho is None else f"{rho:g}"
        rows.append(f"{rho_text:>6} {cells} {_cell(result.extra.get(CORR_KEY))}")
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    rhos = parse_rhos(args.rho)
    cfg = load_from_args(args)
    from sdetr.engine.eval_run import run_evaluation
    out_dir = Path(args.out) if args.out else Path(cfg.train.output_dir) / "eval" / cfg.name
    output = run_evaluation(
        cfg, Path(args.checkpoint), out_dir=out_dir, official=args.official,
        rhos=rhos or cfg.eval.rho_sweep, device=_device(args.device),
        kernel_backend=args.kernel_backend, track=not args.no_track,
        tracking_uri=args.tracking_uri, experiment=args.experiment,
        progress=not args.no_progress)
    print(format_table(output.results))
    print(f"metrics: {output.metrics_path}")
    if output.run_id:
        print(f"MLflow run: {output.run_id}")
    return 0
