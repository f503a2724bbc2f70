"""Data layer: synthetic COCO generator, COCO reader, §1.2 transforms, padded batching."""

from sdetr.data.coco import CocoDetection, filter_annotations, load_coco_api, open_image
from sdetr.data.collate import DetectionBatch, collate_detection
from sdetr.data.errors import DatasetError
from sdetr.data.synth import (
    SplitSummary,
    SynthSummary,
    generate_synthetic_coco,
    read_synth_meta,
    synth_main,
)
from sdetr.data.synth_draw import CATEGORIES as SYNTH_CATEGORIES
from sdetr.data.transforms import (
    AugmentParams,
    EpochSchedule,
    coco_paper_defaults,
    make_eval_transforms,
    make_train_transforms,
    resized_size,
)
from sdetr.data.validate import ValidationReport, validate_dataset

__all__ = [
    "AugmentParams", "CocoDetection", "DatasetError", "DetectionBatch", "EpochSchedule",
    "SYNTH_CATEGORIES",
    "SplitSummary", "SynthSummary", "ValidationReport", "coco_paper_defaults",
    "collate_detection", "filter_annotations", "generate_synthetic_coco", "load_coco_api",
    "make_eval_transforms", "make_train_transforms", "open_image", "read_synth_meta",
    "resized_size", "synth_main", "validate_dataset",
]
