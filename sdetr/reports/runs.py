"""Tracked runs of one MLflow experiment as a pandas DataFrame (MLflow API only).

:func:`fetch_runs` reads every active run of the experiment; :func:`select_runs` keeps the
runs a report is about; :func:`load_runs` does both. One row per run, with the columns of
``mlflow.search_runs``: ``run_id``, ``status``, ``start_time``, ``end_time``, ``run_name``,
``params.<key>`` (the flat resolved config, YAML-encoded strings), ``metrics.<name>`` (latest
value) and ``tags.<name>``.

Which runs count (:func:`select_runs`): for each sweep name, the children of its newest
parent run that no ``--force`` superseded (tag ``sdetr.sweep.superseded_by``), plus every run
without a sweep parent (plain ``sdetr train`` runs). Parent runs themselves are no rows.
Runs of all statuses are kept: a table places the FINISHED ones and lists the others.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional
from urllib.parse import urlsplit, urlunsplit

import pandas as pd

logger = logging.getLogger(__name__)

ROLE_TAG = "tags.sdetr.sweep.role"
SWEEP_TAG = "tags.sdetr.sweep.name"
SUPERSEDED_TAG = "tags.sdetr.sweep.superseded_by"
PARENT_TAG = "tags.mlflow.parentRunId"
HTTP_TIMEOUT_S = 10
"""Seconds one request to an HTTP tracking server may take (``MLFLOW_HTTP_REQUEST_TIMEOUT``)."""
PAGE_SIZE = 1000


class ReportError(ValueError):
    """A report cannot be made as asked (unknown experiment, unreachable store, no runs)."""


@dataclass(frozen=True)
class SweepInfo:
    """The sweep parent whose children a report uses."""

    name: str
    run_id: str
    start_time: Optional[pd.Timestamp]
    children: int


@dataclass
class RunSelection:
    """The runs a report is about, and what was left out (runs of older or superseded sweep
    parents)."""

    runs: pd.DataFrame
    sweeps: list[SweepInfo] = field(default_factory=list)
    ignored: int = 0


def display_uri(uri: str) -> str:
    """``uri`` without a password (``https://user:secret@host`` -> ``https://user@host``)."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}@{host}" if parts.username else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _check_local_store(uri: str) -> None:
    """A SQLite file or a file-store folder must exist: MLflow would create an empty one."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):].split("?", 1)[0])
        if not path.is_file():
            raise ReportError(f"no MLflow store at {uri}: {path} does not exist")
        return
    parts = urlsplit(uri)
    if parts.scheme in ("", "file"):
        path = Path(parts.path if parts.scheme else uri)
        if not path.is_dir():
            raise ReportError(f"no MLflow store at {uri}: {path} is not a folder")


@contextlib.contextmanager
def _bounded_http() -> Iterator[None]:
    """No retries and a short timeout for HTTP stores while the report reads (restored after):
    a server that does not answer fails the report in seconds, not minutes."""
    wanted = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": str(HTTP_TIMEOUT_S)}
    saved = {key: os.environ.get(key) for key in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _run_record(run: Any) -> dict[str, Any]:
    info, data = run.info, run.data
    record: dict[str, Any] = {
        "run_id": info.run_id, "experiment_id": info.experiment_id, "status": info.status,
        "run_name": info.run_name or data.tags.get("mlflow.runName", ""),
        "start_time": pd.to_datetime(info.start_time, unit="ms", utc=True)
        if info.start_time else pd.NaT,
        "end_time": pd.to_datetime(info.end_time, unit="ms", utc=True)
        if info.end_time else pd.NaT}
    record.update({f"params.{k}": v for k, v in data.params.items()})
    record.update({f"metrics.{k}": v for k, v in data.metrics.items()})
    record.update({f"tags.{k}": v for k, v in data.tags.items()})
    return record


def _search_all(client: Any, experiment_id: str) -> list[Any]:
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], max_results=PAGE_SIZE, page_token=token,
                                  order_by=["attributes.start_time ASC"])
        runs += list(page)
        token = page.token
        if not token:
            return runs


def fetch_runs(experiment: str, tracking_uri: str) -> pd.DataFrame:
    """Every active run of ``experiment`` in the store at ``tracking_uri``, one row each.

    Raises :class:`ReportError` naming the experiment when it does not exist, or naming the
    URI when the store does not exist or does not answer.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if not experiment:
        raise ReportError("experiment name must not be empty")
    _check_local_store(tracking_uri)
    shown = display_uri(tracking_uri)
    with _bounded_http():
        try:
            client = MlflowClient(tracking_uri=tracking_uri)
            found = client.get_experiment_by_name(experiment)
            if found is None:
                raise ReportError(f"no experiment named {experiment!r} in the MLflow store "
                                  f"{shown}")
            runs = _search_all(client, found.experiment_id)
        except (MlflowException, OSError) as exc:
            message = " ".join(str(exc).split())[:200]
            raise ReportError(f"MLflow store {shown} did not answer: {message}") from exc
    logger.info("%d run(s) in experiment %r at %s", len(runs), experiment, shown)
    frame = pd.DataFrame([_run_record(r) for r in runs])
    if frame.empty:
        frame = pd.DataFrame(columns=["run_id", "experiment_id", "status", "run_name",
                                      "start_time", "end_time"])
    return frame


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    if name in frame.columns:
        return frame[name]
    return pd.Series([None] * len(frame), index=frame.index, dtype=object)


def select_runs(frame: pd.DataFrame) -> RunSelection:
    """The runs of the newest non-superseded parent of each sweep, plus the runs without a
    sweep parent (see the module docstring)."""
    is_parent = _column(frame, ROLE_TAG) == "parent"
    parents = frame[is_parent]
    chosen: list[SweepInfo] = []
    parent_col = _column(frame, PARENT_TAG)
    for name, group in parents.groupby(_column(parents, SWEEP_TAG).fillna(""), sort=True):
        live = group[_column(group, SUPERSEDED_TAG).isna()]
        newest = (live if not live.empty else group).sort_values("start_time").iloc[-1]
        start = newest["start_time"] if pd.notna(newest["start_time"]) else None
        children = int((parent_col == newest["run_id"]).sum())
        chosen.append(SweepInfo(str(name), str(newest["run_id"]), start, children))
    chosen_ids = {s.run_id for s in chosen}
    sweep_child = parent_col.isin(set(parents["run_id"]))
    keep = ~is_parent & (~sweep_child | parent_col.isin(chosen_ids))
    ignored = int((~is_parent & ~keep).sum())
    if ignored:
        logger.info("left out %d run(s) of older or superseded sweep parents", ignored)
    return RunSelection(frame[keep].reset_index(drop=True), chosen, ignored)


def load_runs(experiment: str, tracking_uri: str) -> pd.DataFrame:
    """The runs a report of ``experiment`` uses (:func:`select_runs`); ReportError when the
    experiment has no FINISHED run among them."""
    return require_finished(select_runs(fetch_runs(experiment, tracking_uri)), experiment).runs


def require_finished(selection: RunSelection, experiment: str) -> RunSelection:
    """``selection`` itself; ReportError naming the experiment when none of its runs finished."""
    runs = selection.runs
    if runs.empty or not (runs["status"] == "FINISHED").any():
        counts = runs["status"].value_counts().to_dict() if not runs.empty else {}
        found = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "no runs"
        raise ReportError(f"experiment {experiment!r} has no finished runs ({found})")
    return selection
