"""Set-up of the Ray processes of a run (the job's ``runtime_env``).

Ray Train 2.x starts a detached ``PlacementGroupCleaner`` actor that polls the Ray State API to
notice a dead controller. The State API is served by the dashboard, which a run's local cluster
does not start (``include_dashboard=False``: the dashboard needs ``ray[default]``'s extra
packages), so every poll logs the same warning ("Failed to query Ray Train Controller actor
state ...") every few seconds for the whole run. :func:`quiet_ray_internals` runs in every worker
process of the job and raises that one logger to ERROR; everything else Ray and sdetr log is
unchanged. (The cleaner's job — removing the placement groups of a dead controller — is done
anyway when the run shuts its local cluster down.)
"""

from __future__ import annotations

import logging
from typing import Any

QUIET_LOGGERS: tuple[str, ...] = (
    "ray.train.v2._internal.execution.controller.placement_group_cleaner",
)
SETUP_HOOK = "sdetr.engine.ray_setup.quiet_ray_internals"


def quiet_ray_internals() -> None:
    """``worker_process_setup_hook``: :data:`QUIET_LOGGERS` log errors only."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def runtime_env() -> dict[str, Any]:
    """The ``runtime_env`` a run's ``ray.init`` passes."""
    return {"worker_process_setup_hook": SETUP_HOOK}


__all__ = ["QUIET_LOGGERS", "SETUP_HOOK", "quiet_ray_internals", "runtime_env"]
