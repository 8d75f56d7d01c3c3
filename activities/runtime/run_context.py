"""The workflow an activity runs for: audit rows, run locks and version actors are keyed by it."""

from __future__ import annotations

from temporalio import activity


def workflow_ids() -> tuple[str, str]:
    """(workflow id, run id) of the workflow that scheduled the running activity.

    mmrag's activities only run inside workflows. A standalone activity has neither id, and
    an audit row or a run lock keyed by an empty id would be a bug, so this raises.
    """
    info = activity.info()
    if not info.workflow_id or not info.workflow_run_id:
        raise RuntimeError(f"activity {info.activity_type} ran outside a workflow")
    return info.workflow_id, info.workflow_run_id
