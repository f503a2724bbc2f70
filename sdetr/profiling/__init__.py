"""Measurements of a built model: parameters, fvcore GFLOPs, FPS / latency, peak memory.

:func:`profile_model` runs them as a stage of a run and :func:`log_profile` sends the results
to the tracker; every figure carries its :class:`Protocol` (REFERENCE §10).
"""

from sdetr.profiling.flops import FlopCount, count_flops, flop_group, mean_flop_counts
from sdetr.profiling.handles import CUSTOM_HANDLES, IGNORED_BY_CONVENTION
from sdetr.profiling.inputs import ProfileInput, coco_first_image, coco_images, random_input
from sdetr.profiling.memory import MemoryStats, inference_memory, train_step_memory
from sdetr.profiling.modes import profiling_modules
from sdetr.profiling.params import ParamCounts, count_parameters
from sdetr.profiling.protocol import (FIRST_VAL_SIZE, PAPER_FLOPS_SIZE, PUBLISHED_GFLOPS,
                                      PUBLISHED_SPARSE_SIZE, RELEASED_CODE_GFLOPS, Protocol)
from sdetr.profiling.run import (METRIC_PREFIX, WHAT_AVAILABLE, ProfileOptions, log_profile, profile_metrics,
                                 profile_model, profile_tags)
from sdetr.profiling.speed import TimingStats, interleaved_latency, measure_fps, measure_latency

__all__ = [
    "CUSTOM_HANDLES", "FIRST_VAL_SIZE", "FlopCount", "IGNORED_BY_CONVENTION", "MemoryStats",
    "METRIC_PREFIX", "PAPER_FLOPS_SIZE", "PUBLISHED_GFLOPS", "PUBLISHED_SPARSE_SIZE",
    "ParamCounts", "ProfileInput", "ProfileOptions", "Protocol", "RELEASED_CODE_GFLOPS", "TimingStats",
    "WHAT_AVAILABLE", "coco_first_image", "coco_images", "count_flops", "count_parameters",
    "flop_group", "inference_memory", "interleaved_latency", "log_profile", "mean_flop_counts",
    "measure_fps", "measure_latency", "profile_metrics", "profile_model", "profile_tags",
    "profiling_modules", "random_input", "train_step_memory",
]
