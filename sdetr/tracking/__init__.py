"""Experiment tracking (MLflow) and run provenance. Written to by the engine (rank 0 only);
reports read MLflow only. Importing this package does not import mlflow."""

from sdetr.tracking.mlflow_tracker import (DEFAULT_EXPERIMENT, MlflowTracker, Tracker,
                                           TrackingError, make_tracker, resolve_tracking_uri)
from sdetr.tracking.provenance import device_description, git_sha, run_tags

__all__ = ["DEFAULT_EXPERIMENT", "MlflowTracker", "Tracker", "TrackingError",
           "device_description", "git_sha", "make_tracker", "resolve_tracking_uri", "run_tags"]
