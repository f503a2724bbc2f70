"""Deterministic synthetic shapes dataset in COCO-2017 layout.

Layout written (the same as real COCO 2017, so the same reader works)::

    out_dir/train2017/000000000001.jpg ...   out_dir/annotations/instances_train2017.json
    out_dir/val2017/000000000001.jpg ...     out_dir/annotations/instances_val2017.json
    out_dir/sdetr_synth.json                 (generation parameters and counts)

Facts about the data:

* 5 categories with non-contiguous ids: 3 circle, 7 square, 12 triangle, 18 ring, 23 cross.
  A model therefore needs ``num_classes = max id + 1 = 24`` logits (as COCO needs 91).
* Textured backgrounds (smooth noise, gradients, stripes, checkers), random object colours
  and per-image Gaussian noise: colour carries no class information, shape does.
* Image sides are independently uniform in ``min_size..max_size`` (varying aspect ratio).
* Object sizes (target pixel areas, ``synth_layout.TARGET_AREA``): small 324..900 (COCO's
  small is < 32²), medium 1600..7500, large >= 14500, drawn 30 / 45 / 25 %.
* Every image has 1..6 objects (never zero: keeps AP clean). A placement is rejected if its
  box IoU with an earlier object exceeds 0.5 or it would leave an earlier object < 70% visible.
* ``bbox`` = [x, y, w, h] of the *visible* extent in pixels; ``area`` = number of visible
  pixels of the shape (not w*h); ``iscrowd`` = 0; annotation ids are 1.. per file; image ids
  are 1.. per split. No ``segmentation`` field (box detection only).
* Images 0, 1 and 2 of each split contain a forced small, medium and large object, so all
  three COCO area ranges occur in any split of >= 3 images (large needs sides >= ~134 px).
* Deterministic: each image draws from ``SeedSequence([seed, split, index])``; the JSON is
  byte-identical for a seed, the JPEGs (quality 90) too for a given Pillow version.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from sdetr.data.errors import DatasetError
from sdetr.data.synth_draw import CATEGORIES
from sdetr.data.synth_layout import SIZE_CLASSES, SynthAnnotation, area_range, render_image

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 2
META_FILE = "sdetr_synth.json"
SPLITS = ("train2017", "val2017")
JPEG_QUALITY = 90
PROGRESS_MIN_IMAGES = 200
FORCED_CLASSES = ("small", "medium", "large")  # for images 0, 1, 2 of each split
LARGE_MIN_SIDE = 170  # image 2 of a split gets sides >= this (capped by max_size)


@dataclass(frozen=True)
class SplitSummary:
    """Counts of one split: images, annotations, annotations per category name and area range."""

    images: int
    annotations: int
    per_category: dict[str, int]
    per_area: dict[str, int]


@dataclass(frozen=True)
class SynthSummary:
    """What ``generate_synthetic_coco`` wrote. ``elapsed_s`` is 0 when an output was reused."""

    out_dir: str
    seed: int
    min_size: int
    max_size: int
    categories: dict[int, str]
    train: SplitSummary
    val: SplitSummary
    elapsed_s: float = field(default=0.0, compare=False)


def _check_params(num_train: int, num_val: int, seed: int, min_size: int, max_size: int) -> None:
    for name, value in (("num_train", num_train), ("num_val", num_val), ("seed", seed)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if not 32 <= min_size <= max_size:
        raise ValueError(f"need 32 <= min_size <= max_size, got min_size={min_size}, "
                         f"max_size={max_size}")


def _image_size(rng: np.random.Generator, index: int, min_size: int,
                max_size: int) -> tuple[int, int]:
    lo = max(min_size, min(max_size, LARGE_MIN_SIDE)) if index == 2 else min_size
    return int(rng.integers(lo, max_size + 1)), int(rng.integers(lo, max_size + 1))


def _summarise(coco: dict[str, Any]) -> SplitSummary:
    names = {c["id"]: c["name"] for c in coco["categories"]}
    per_cat = Counter(names[a["category_id"]] for a in coco["annotations"])
    per_area = Counter(area_range(a["area"]) for a in coco["annotations"])
    return SplitSummary(len(coco["images"]), len(coco["annotations"]),
                        {n: per_cat.get(n, 0) for n in names.values()},
                        {r: per_area.get(r, 0) for r in SIZE_CLASSES})


def _coco_header(params: dict[str, int]) -> dict[str, Any]:
    return {
        "info": {"description": "sdetr synthetic shapes (COCO format)",
                 "version": str(GENERATOR_VERSION), "contributor": "sdetr",
                 "sdetr_synth": params},
        "licenses": [],
        "images": [],
        "annotations": [],
        "categories": [{"id": c.id, "name": c.name, "supercategory": "shape"}
                       for c in CATEGORIES],
    }


def _add_image(coco: dict[str, Any], image_id: int, size: tuple[int, int],
               anns: list[SynthAnnotation]) -> None:
    coco["images"].append({"id": image_id, "file_name": f"{image_id:012d}.jpg",
                           "width": size[0], "height": size[1]})
    for ann in anns:
        coco["annotations"].append({
            "id": len(coco["annotations"]) + 1, "image_id": image_id,
            "category_id": ann.category_id, "bbox": list(ann.bbox), "area": ann.area,
            "iscrowd": 0})


def _generate_split(root: Path, split_code: int, count: int, params: dict[str, int],
                    progress: tqdm) -> dict[str, Any]:
    """Write the images of one split under ``root/<split>/``; return its COCO dict."""
    split = SPLITS[split_code]
    (root / split).mkdir(parents=True)
    coco = _coco_header(params)
    for index in range(count):
        rng = np.random.default_rng(np.random.SeedSequence([params["seed"], split_code, index]))
        size = _image_size(rng, index, params["min_size"], params["max_size"])
        forced = FORCED_CLASSES[index] if index < len(FORCED_CLASSES) else None
        pixels, anns = render_image(rng, size[0], size[1], forced)
        image_id = index + 1
        Image.fromarray(pixels, "RGB").save(root / split / f"{image_id:012d}.jpg",
                                            quality=JPEG_QUALITY)
        _add_image(coco, image_id, size, anns)
        progress.update(1)
    return coco


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, separators=(",", ":")), encoding="utf-8")


def generate_synthetic_coco(out_dir: Path, *, num_train: int, num_val: int, seed: int,
                            min_size: int = 160, max_size: int = 320) -> SynthSummary:
    """Generate the dataset into ``out_dir`` (must be absent or empty); see the module doc.

    Writes in place (no atomicity); ``synth_main`` wraps this with a temp dir + rename.
    A tqdm progress bar (stderr) is shown when more than 200 images are generated.
    """
    _check_params(num_train, num_val, seed, min_size, max_size)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DatasetError(f"output directory is not empty: {out_dir}")
    params = {"generator_version": GENERATOR_VERSION, "seed": seed, "num_train": num_train,
              "num_val": num_val, "min_size": min_size, "max_size": max_size}
    start = time.perf_counter()
    (out_dir / "annotations").mkdir(parents=True)
    total = num_train + num_val
    splits = {}
    with tqdm(total=total, desc="synth", unit="img", disable=total <= PROGRESS_MIN_IMAGES) as bar:
        for code, count in enumerate((num_train, num_val)):
            coco = _generate_split(out_dir, code, count, params, bar)
            _write_json(out_dir / "annotations" / f"instances_{SPLITS[code]}.json", coco)
            splits[SPLITS[code]] = _summarise(coco)
    summary = SynthSummary(str(out_dir), seed, min_size, max_size,
                           {c.id: c.name for c in CATEGORIES}, splits["train2017"],
                           splits["val2017"], elapsed_s=time.perf_counter() - start)
    meta = {"params": params, "summary": asdict(summary)}
    del meta["summary"]["elapsed_s"], meta["summary"]["out_dir"]  # keep the tree relocatable
    _write_json(out_dir / META_FILE, meta)
    logger.info("synthetic COCO written to %s: %d train / %d val images, %d / %d boxes (%.1f s)",
                out_dir, summary.train.images, summary.val.images, summary.train.annotations,
                summary.val.annotations, summary.elapsed_s)
    return summary


def read_synth_meta(out_dir: Path) -> dict[str, Any] | None:
    """The ``sdetr_synth.json`` of a synth output, or None when the file is absent."""
    path = Path(out_dir) / META_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"corrupt synth marker file {path}: {exc}") from exc
    if not isinstance(meta, dict) or not {"params", "summary"} <= meta.keys():
        raise DatasetError(f"corrupt synth marker file {path}: missing 'params'/'summary'")
    return meta


def _summary_from_meta(meta: dict[str, Any], out_dir: Path) -> SynthSummary:
    s = meta["summary"]
    return SynthSummary(str(out_dir), s["seed"], s["min_size"], s["max_size"],
                        {int(k): v for k, v in s["categories"].items()},
                        SplitSummary(**s["train"]), SplitSummary(**s["val"]))


def synth_main(out: str, train: int, val: int, seed: int, *, min_size: int = 160,
               max_size: int = 320) -> SynthSummary:
    """Generate the dataset at ``out`` atomically (temp dir next to it, then rename).

    If ``out`` is a previous synth output with the same parameters it is reused as is; one
    written by an older generator version (same seed, counts and sizes) is replaced by the
    current one. Raises DatasetError if ``out`` is a non-empty directory of anything else (or a
    file).
    """
    _check_params(train, val, seed, min_size, max_size)
    target = Path(out)
    params = {"generator_version": GENERATOR_VERSION, "seed": seed, "num_train": train,
              "num_val": val, "min_size": min_size, "max_size": max_size}
    stale = False
    if target.exists():
        if not target.is_dir():
            raise DatasetError(f"refusing to overwrite {target}: it is a file")
        if any(target.iterdir()):
            meta = read_synth_meta(target)
            if meta is not None and meta["params"] == params:
                logger.info("reusing synthetic dataset at %s (same parameters)", target)
                return _summary_from_meta(meta, target)
            stale = meta is not None and _older_version_of(meta["params"], params)
            if not stale:
                raise DatasetError(f"refusing to overwrite {target}: non-empty and not a synth "
                                   f"output of these parameters {params}")
            logger.warning("synthetic dataset at %s was written by generator version %s: "
                           "replacing it with version %d", target,
                           meta["params"].get("generator_version"), GENERATOR_VERSION)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the dataset should be readable like any folder
    try:
        summary = generate_synthetic_coco(tmp, num_train=train, num_val=val, seed=seed,
                                          min_size=min_size, max_size=max_size)
        if stale:  # the old output leaves only once the new one is complete
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
            os.replace(target, old / target.name)
            shutil.rmtree(old)
        os.replace(tmp, target)  # atomic; an existing *empty* target dir is replaced
    except BaseException:
        shutil.rmtree(tmp)
        raise
    logger.info("synthetic dataset ready at %s", target)
    return replace(summary, out_dir=str(target))


def _older_version_of(found: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """True when ``found`` are the same generation parameters from an older generator."""
    version = found.get("generator_version")
    same_rest = all(found.get(k) == v for k, v in wanted.items() if k != "generator_version")
    return isinstance(version, int) and version < wanted["generator_version"] and same_rest
