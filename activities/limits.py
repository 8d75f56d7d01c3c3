"""Worker-side bounds on the load knobs a caller passes to a workflow (workflows/limits.py).

``bound_knobs`` runs as a local activity at the start of a workflow that schedules work
from a caller's knobs (IngestBatch, Reindex, WatchPrefix): the workflow then uses the
clamped values, recorded in its history, so replay never depends on a worker's settings.
The clamping itself is :mod:`activities.runtime.bounds`, which also serves the
activities that use knobs directly (retrieve, generate).
"""

from __future__ import annotations

from activities.runtime.bounds import bounded
from settings import Settings
from workflows.activities import implements
from workflows.activities import limits as limits_stubs
from workflows.activities.limits import Knobs


class LimitActivities:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @implements(limits_stubs.bound_knobs)
    def bound_knobs(self, knobs: Knobs) -> Knobs:
        """The caller's knobs as this worker allows them (a local activity)."""
        return bounded(knobs, self.settings)
