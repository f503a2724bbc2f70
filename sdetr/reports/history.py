"""Per-step values of one MLflow metric for some runs (MLflow API only).

``mlflow.search_runs`` (:mod:`sdetr.reports.runs`) keeps each metric's latest value; a figure
of a metric *over training* needs every logged step: :func:`metric_history`.
"""

from __future__ import annotations

from typing import Iterable

import pandas as pd

from sdetr.reports.runs import ReportError, _bounded_http, display_uri

HISTORY_COLUMNS = ("run_id", "step", "value")


def metric_history(tracking_uri: str, run_ids: Iterable[str], key: str) -> pd.DataFrame:
    """Every logged value of metric ``key`` of each run: columns :data:`HISTORY_COLUMNS`
    (``step`` as logged: complete epochs for the engine's metrics), sorted by run and step; for
    a step logged twice the later value. Raises ReportError naming the store when it does not
    answer."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    rows: list[tuple[str, int, float]] = []
    run_ids = list(dict.fromkeys(run_ids))
    if not run_ids:
        return pd.DataFrame(columns=list(HISTORY_COLUMNS))
    with _bounded_http():
        try:
            client = MlflowClient(tracking_uri=tracking_uri)
            for run_id in run_ids:
                points = sorted(client.get_metric_history(run_id, key),
                                key=lambda m: (m.step, m.timestamp))
                rows += [(run_id, int(m.step), float(m.value)) for m in points]
        except (MlflowException, OSError) as exc:
            message = " ".join(str(exc).split())[:200]
            raise ReportError(f"MLflow store {display_uri(tracking_uri)} did not answer: "
                              f"{message}") from exc
    frame = pd.DataFrame(rows, columns=list(HISTORY_COLUMNS))
    return frame.drop_duplicates(["run_id", "step"], keep="last").reset_index(drop=True)
