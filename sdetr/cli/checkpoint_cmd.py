"""``sdetr checkpoint``: check (and convert) a checkpoint against a preset's model.

``sdetr checkpoint sparse_detr_r50 r50_sparse_detr_rho_0.1.pth --official --out w.pth``
loads a checkpoint saved by the official Deformable/Sparse DETR code into our model, prints
what was loaded, missing, unexpected or ignored, and optionally writes an sdetr weights file.
"""

from __future__ import annotations

import argparse

from sdetr.cli.common import add_config_args, load_from_args, print_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("checkpoint", help="load a checkpoint into a preset's model; report keys")
    add_config_args(p)
    p.add_argument("path", help="checkpoint file (.pth)")
    p.add_argument("--official", action="store_true",
                   help="the file was saved by the official Deformable/Sparse DETR code")
    p.add_argument("--out", help="write the loaded weights as an sdetr weights file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_from_args(args)
    from sdetr.models import (build_model, load_model_weights, load_official_checkpoint,
                              save_model_weights)
    model = build_model(cfg.model)
    summary: dict[str, object] = {"preset": cfg.preset, "checkpoint": args.path}
    if args.official:
        report = load_official_checkpoint(args.path, model)
        summary.update(format="official", loaded=len(report.loaded), missing=report.missing,
                       unexpected=report.unexpected, ignored=len(report.ignored))
    else:
        load_model_weights(args.path, model, cfg.model)
        summary.update(format="sdetr", loaded=len(model.state_dict()), missing=[], unexpected=[])
    if args.out:
        summary["written"] = str(save_model_weights(args.out, model, cfg.model))
    print_json(summary)
    return 0
