"""COCO-format detection dataset read through pycocotools' COCO API.

Box conventions: COCO JSON boxes are [x, y, w, h] in pixels of the original image. Before the
transforms they become x0,y0,x1,y1 pixels, clipped to the image; crowd annotations
(``iscrowd = 1``) and boxes with non-positive width or height after clipping are removed
(REFERENCE §1.2). After ``ToTensorNormalize`` they are cx,cy,w,h normalised by the unpadded
transformed image size. Labels are the COCO category ids themselves (no remapping), so a
model needs ``num_classes = max id + 1`` logits (91 for COCO).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset

from sdetr.data.errors import DatasetError
from sdetr.data.transforms import Target, Transform

logger = logging.getLogger(__name__)

_REQUIRED = {"images": ("id", "file_name", "width", "height"),
             "annotations": ("id", "image_id", "category_id", "bbox"),
             "categories": ("id", "name")}


def _check_coco_dict(data: Any, path: Path) -> None:
    """Raise DatasetError unless ``data`` has the COCO keys and record fields we use."""
    if not isinstance(data, dict):
        raise DatasetError(f"not a COCO annotation file (top level is not an object): {path}")
    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise DatasetError(f"not a COCO annotation file (missing {', '.join(missing)}): {path}")
    for key, fields in _REQUIRED.items():
        if not isinstance(data[key], list):
            raise DatasetError(f"not a COCO annotation file ('{key}' is not a list): {path}")
        for i, record in enumerate(data[key]):
            if not isinstance(record, dict) or any(f not in record for f in fields):
                raise DatasetError(f"malformed COCO file: {key}[{i}] lacks one of "
                                   f"{', '.join(fields)}: {path}")
            if key == "annotations" and not _is_xywh(record["bbox"]):
                raise DatasetError(f"malformed COCO file: annotations[{i}].bbox is not 4 "
                                   f"numbers: {path}")


def _is_xywh(bbox: Any) -> bool:
    return (isinstance(bbox, list) and len(bbox) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox))


def load_coco_api(ann_file: str | Path) -> COCO:
    """Read and check a COCO annotation JSON; return an indexed pycocotools ``COCO``.

    Raises DatasetError (naming the file) if it is missing, not JSON, or not COCO-shaped.
    pycocotools' progress prints are kept off stdout.
    """
    path = Path(ann_file)
    if not path.is_file():
        raise DatasetError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"annotation file is not valid JSON: {path} ({exc})") from exc
    _check_coco_dict(data, path)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


@dataclass(frozen=True)
class FilteredBoxes:
    """Usable boxes of one image: ``boxes`` (n, 4) float32 x0,y0,x1,y1 pixels, clipped to the
    image; ``labels`` (n,) int64 category ids; counts of what was removed or clipped."""

    boxes: Tensor
    labels: Tensor
    crowd: int
    degenerate: int
    clipped: int


def filter_annotations(anns: Sequence[dict[str, Any]], width: int, height: int) -> FilteredBoxes:
    """Drop crowd annotations, clip boxes to the image, drop boxes with w <= 0 or h <= 0."""
    plain = [a for a in anns if not a.get("iscrowd", 0)]
    xywh = np.asarray([a["bbox"] for a in plain], dtype=np.float64).reshape(-1, 4)
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    clipped = np.clip(xyxy, 0.0, [width, height, width, height])
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    changed = np.any(clipped != xyxy, axis=1) & keep
    labels = np.asarray([a["category_id"] for a in plain], dtype=np.int64)
    return FilteredBoxes(torch.from_numpy(clipped[keep]).to(torch.float32),
                         torch.from_numpy(labels[keep]), len(anns) - len(plain),
                         int((~keep).sum()), int(changed.sum()))


def open_image(path: Path, expected_size: tuple[int, int] | None = None) -> Image.Image:
    """Fully decode ``path`` as RGB. Raises DatasetError (naming the path) if it is missing,
    unreadable, or its (w, h) differs from ``expected_size``."""
    if not path.is_file():
        raise DatasetError(f"image file not found: {path}")
    try:
        with Image.open(path) as raw:
            image = raw.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from exc
    if expected_size is not None and image.size != tuple(expected_size):
        raise DatasetError(f"image {path} is {image.width}x{image.height} but the annotation "
                           f"file says {expected_size[0]}x{expected_size[1]}")
    return image


class CocoDetection(Dataset):
    """COCO detection dataset: ``dataset[i] -> (image, target)``.

    Args:
        img_dir: folder holding the images (``file_name`` is relative to it).
        ann_file: COCO ``instances_*.json``.
        transforms: a pipeline ending in ``ToTensorNormalize`` (``make_train_transforms`` /
            ``make_eval_transforms``); it receives a PIL RGB image and xyxy pixel boxes.
        return_masks: must be False (box detection only); accepted for API familiarity.

    Items, in sorted image-id order (images without annotations are kept; they are valid COCO
    and count in evaluation):
        image: (3, H, W) float, ImageNet-normalised, unpadded.
        target: "boxes" (n, 4) float32 cx,cy,w,h normalised to the unpadded (H, W);
            "labels" (n,) int64 COCO category ids; "image_id" () int64;
            "orig_size" (2,) int64 (h, w) of the file; "size" (2,) int64 (H, W) after transforms.
    A missing or corrupt image raises DatasetError naming the path when its item is loaded.
    """

    def __init__(self, img_dir: str | Path, ann_file: str | Path, transforms: Transform,
                 *, return_masks: bool = False) -> None:
        if return_masks:
            raise ValueError("return_masks=True is not supported: sdetr detects boxes only")
        self.img_dir = Path(img_dir)
        self.ann_file = Path(ann_file)
        self.coco = load_coco_api(self.ann_file)
        self.ids: list[int] = sorted(self.coco.imgs)
        self.transforms = transforms
        logger.info("%s: %d images, %d annotations, %d categories", self.ann_file,
                    len(self.ids), len(self.coco.anns), len(self.coco.cats))

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def categories(self) -> dict[int, str]:
        """Category id -> name, sorted by id."""
        return {cid: self.coco.cats[cid]["name"] for cid in sorted(self.coco.cats)}

    @property
    def num_classes(self) -> int:
        """Logits a model needs for these labels: max category id + 1 (91 for COCO)."""
        return max(self.coco.cats, default=-1) + 1

    def load_raw(self, index: int) -> tuple[Image.Image, Target]:
        """Image and target before the transforms (boxes xyxy pixels, crowd/degenerate out)."""
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        image = open_image(self.img_dir / info["file_name"], (info["width"], info["height"]))
        kept = filter_annotations(self.coco.imgToAnns.get(image_id, []), image.width,
                                  image.height)
        size = torch.tensor([image.height, image.width], dtype=torch.int64)
        target = {"boxes": kept.boxes, "labels": kept.labels,
                  "image_id": torch.tensor(image_id, dtype=torch.int64),
                  "orig_size": size, "size": size.clone()}
        return image, target

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        image, target = self.load_raw(index)
        return self.transforms(image, target)
