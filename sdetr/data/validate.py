"""Up-front scan of a COCO-format dataset: what the reader will skip, clip, drop or fail on."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from pycocotools.coco import COCO

from sdetr.data.coco import filter_annotations, load_coco_api, open_image
from sdetr.data.errors import DatasetError

logger = logging.getLogger(__name__)


@dataclass
class ValidationReport:
    """Counts from ``validate_dataset``. What the reader (``CocoDetection``) does with each:

    * ``images_without_annotations``: kept (valid COCO; they count in evaluation).
    * ``images_without_boxes``: no usable box left after the removals below; kept too.
    * ``crowd_annotations``: removed before the transforms.
    * ``degenerate_boxes``: width or height <= 0 after clipping to the image: dropped.
    * ``clipped_boxes``: partly outside the image: clipped to it, kept.
    * ``orphan_annotations``: image_id not among the images: never read.
    * ``unknown_category_annotations``: category_id not among the categories: an error.
    * ``missing_images`` / ``corrupt_images``: errors; loading that item raises DatasetError.
    """

    img_dir: str
    ann_file: str
    images: int = 0
    annotations: int = 0
    categories: int = 0
    images_without_annotations: int = 0
    images_without_boxes: int = 0
    crowd_annotations: int = 0
    degenerate_boxes: int = 0
    clipped_boxes: int = 0
    orphan_annotations: int = 0
    unknown_category_annotations: int = 0
    missing_images: list[str] = field(default_factory=list)
    corrupt_images: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[str]:
        """One line per problem that would make training or evaluation fail."""
        lines = [f"missing image: {p}" for p in self.missing_images]
        lines += [f"corrupt image: {p}" for p in self.corrupt_images]
        if self.unknown_category_annotations:
            lines.append(f"{self.unknown_category_annotations} annotations with a category id "
                         f"not in 'categories' ({self.ann_file})")
        return lines

    @property
    def ok(self) -> bool:
        return not self.errors


def _check_image(path: Path, size: tuple[int, int], decode: bool) -> str | None:
    """None if the image is fine, else a one-line reason (missing images excluded)."""
    if decode:
        try:
            open_image(path, size)
        except DatasetError as exc:
            return str(exc)
        return None
    try:
        with Image.open(path) as image:
            found = image.size
            image.verify()
    except (OSError, ValueError, SyntaxError) as exc:
        return f"cannot read image {path}: {exc}"
    if found != size:
        return (f"image {path} is {found[0]}x{found[1]} but the annotation file says "
                f"{size[0]}x{size[1]}")
    return None


def _scan_images(report: ValidationReport, coco: COCO, img_dir: Path, decode: bool) -> None:
    for image_id in sorted(coco.imgs):
        info = coco.imgs[image_id]
        anns = coco.imgToAnns.get(image_id, [])
        report.images_without_annotations += not anns
        kept = filter_annotations(anns, info["width"], info["height"])
        report.images_without_boxes += kept.boxes.shape[0] == 0
        report.crowd_annotations += kept.crowd
        report.degenerate_boxes += kept.degenerate
        report.clipped_boxes += kept.clipped
        path = img_dir / info["file_name"]
        if not path.is_file():
            report.missing_images.append(str(path))
            continue
        reason = _check_image(path, (info["width"], info["height"]), decode)
        if reason is not None:
            report.corrupt_images.append(reason)


def validate_dataset(img_dir: str | Path, ann_file: str | Path, *,
                     decode: bool = False) -> ValidationReport:
    """Scan every image and annotation once; log the counts and every error line.

    Images are opened and verified (header and structure); ``decode=True`` fully decodes
    them, which also catches truncated files but is slower. An annotation file that is
    missing or not COCO raises DatasetError (nothing else can be checked then).
    """
    coco = load_coco_api(ann_file)
    report = ValidationReport(str(img_dir), str(ann_file), images=len(coco.imgs),
                              annotations=len(coco.anns), categories=len(coco.cats))
    report.orphan_annotations = sum(a["image_id"] not in coco.imgs for a in coco.anns.values())
    report.unknown_category_annotations = sum(a["category_id"] not in coco.cats
                                              for a in coco.anns.values())
    _scan_images(report, coco, Path(img_dir), decode)
    logger.info("validated %s: %d images (%d without annotations, %d without usable boxes), "
                "%d annotations (%d crowd removed, %d degenerate dropped, %d clipped), "
                "%d errors", ann_file, report.images, report.images_without_annotations,
                report.images_without_boxes, report.annotations, report.crowd_annotations,
                report.degenerate_boxes, report.clipped_boxes, len(report.errors))
    for line in report.errors:
        logger.warning("%s", line)
    return report
