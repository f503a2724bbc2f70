"""Setup hooks for the Ray worker processes of the local clusters sdetr starts.

A ``worker_process_setup_hook`` runs when a worker process starts, BEFORE Ray sets the actor's
``OMP_NUM_THREADS``: this module must never import torch (a torch imported here would keep the
machine's full thread count, oversubscribing the cores; measured 3.5 instead of 0.9 s per step).
"""

from __future__ import annotations

import logging

PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
PG_CLEANER_NOISE = "Failed to query Ray Train Controller actor state"
HOOK = f"{__name__}.quiet_ray_internals"


class DropMessage(logging.Filter):
    """Drops log records whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_ray_internals() -> None:
    """Ray Train's PlacementGroupCleaner asks the State API about the controller every second
    and, without a dashboard, warns each time that it could not: one driver-log line per second
    of training. Drop only that warning; the cleaner's other messages still come through."""
    logging.getLogger(PG_CLEANER_LOGGER).addFilter(DropMessage(PG_CLEANER_NOISE))
