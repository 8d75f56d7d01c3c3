"""The home of ``bound_knobs``: the worker's bounds on a caller's load knobs, as a local
activity whose result is recorded in the history (workflows/limits.py, ``bounded_knobs``)."""

from dataclasses import dataclass

from workflows.activities import not_here, stub

BOUND_KNOBS = "bound_knobs"


@dataclass
class Knobs:
    """Load knobs a caller passed to a workflow; 0 where the workflow does not use one.

    ``bound_knobs`` returns them clamped to the worker's maxima (0 in, default out where a
    0 means "the worker's default")."""

    page_size: int = 0
    batch_size: int = 0
    max_concurrent_batches: int = 0
    heartbeat_timeout_s: int = 0
    interval_s: int = 0


@stub(BOUND_KNOBS)
def bound_knobs(knobs: Knobs) -> Knobs:
    """The caller's knobs as this worker allows them (a local activity)."""
    raise not_here(BOUND_KNOBS)
