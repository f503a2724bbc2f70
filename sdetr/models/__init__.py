"""Detectors of the Deformable-DETR family, built from typed configs.

``build_model(cfg.model)`` is the one entry point that reads a config; every module below it
takes explicit arguments.
"""

from sdetr.models.builder import BuiltModel, build, build_criterion, build_model
from sdetr.models.checkpoint import load_model_weights, save_model_weights
from sdetr.models.detector import DeformableDETR, EncoderOutput
from sdetr.models.fuse import FoldReport, fold_batch_norm
from sdetr.models.official import CheckpointError, load_official_checkpoint
from sdetr.models.sparse import SparseDETR

__all__ = ["BuiltModel", "CheckpointError", "DeformableDETR", "EncoderOutput", "FoldReport", "build",
           "build_criterion", "build_model", "fold_batch_norm", "load_model_weights",
           "load_official_checkpoint", "save_model_weights", "SparseDETR"]
