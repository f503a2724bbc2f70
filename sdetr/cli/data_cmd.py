"""``sdetr data``: generate the synthetic COCO set, or check a COCO-format dataset.

``sdetr data synth --out data/synth --train 2000 --val 200 --seed 0``
``sdetr data check data/coco --split val2017``
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sdetr.data import SplitSummary

MAX_ERROR_LINES = 20


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="generate the synthetic dataset or check a COCO dataset")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    synth = data_sub.add_parser("synth", help="generate the synthetic COCO-format dataset")
    synth.add_argument("--out", required=True, help="output folder (absent, empty, or a "
                       "previous synth output of the same parameters, which is reused)")
    synth.add_argument("--train", type=int, default=2000, help="train images (default 2000)")
    synth.add_argument("--val", type=int, default=200, help="val images (default 200)")
    synth.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    synth.add_argument("--min-size", type=int, default=160, help="smallest image side (px)")
    synth.add_argument("--max-size", type=int, default=320, help="largest image side (px)")
    synth.set_defaults(func=run_synth)
    check = data_sub.add_parser("check", help="scan a COCO-format dataset for problems")
    check.add_argument("root", help="dataset folder holding <split>/ and annotations/")
    check.add_argument("--split", default="val2017", help="split to check (default val2017)")
    check.add_argument("--decode", action="store_true",
                       help="fully decode every image (slower; also finds truncated files)")
    check.set_defaults(func=run_check)


def _split_rows(name: str, split: SplitSummary) -> str:
    cats = "  ".join(f"{n}={c}" for n, c in split.per_category.items())
    areas = "  ".join(f"{n}={c}" for n, c in split.per_area.items())
    return (f"{name:<10} {split.images:>6} images {split.annotations:>7} boxes\n"
            f"{'':<10} per category: {cats}\n{'':<10} per area:     {areas}")


def run_synth(args: argparse.Namespace) -> int:
    from sdetr.data import synth_main
    summary = synth_main(args.out, args.train, args.val, args.seed, min_size=args.min_size,
                         max_size=args.max_size)
    reused = " (reused: same parameters)" if summary.elapsed_s == 0 else \
        f" in {summary.elapsed_s:.1f} s"
    print(f"synthetic COCO at {summary.out_dir}{reused}: seed {summary.seed}, image sides "
          f"{summary.min_size}..{summary.max_size} px, categories "
          + ", ".join(f"{i} {n}" for i, n in summary.categories.items()))
    print(_split_rows("train2017", summary.train))
    print(_split_rows("val2017", summary.val))
    return 0


def run_check(args: argparse.Namespace) -> int:
    from sdetr.data import DatasetError, validate_dataset
    root = Path(args.root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    ann_file = root / "annotations" / f"instances_{args.split}.json"
    report = validate_dataset(root / args.split, ann_file, decode=args.decode)
    for key in ("images", "annotations", "categories", "images_without_annotations",
                "images_without_boxes", "crowd_annotations", "degenerate_boxes",
                "clipped_boxes", "orphan_annotations", "unknown_category_annotations"):
        print(f"{key:<30} {getattr(report, key)}")
    errors = report.errors
    print(f"{'errors':<30} {len(errors)}")
    for line in errors[:MAX_ERROR_LINES]:
        print(f"  {line}")
    if len(errors) > MAX_ERROR_LINES:
        print(f"  ... and {len(errors) - MAX_ERROR_LINES} more")
    if errors:
        raise DatasetError(f"{root / args.split}: {len(errors)} errors "
                           f"(first: {errors[0]})")
    return 0
