"""Measurements of a built model: parameter counts now; FLOPs, FPS and memory later."""

from sdetr.profiling.params import ParamCounts, count_parameters

__all__ = ["ParamCounts", "count_parameters"]
