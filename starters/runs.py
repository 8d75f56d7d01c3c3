"""How starters start a run that must happen once: a workflow id derived from what the run
does, and a start that attaches to the run already holding that id.

One home for the id schemes and the start call that ``ingest``, ``forget``, ``watch`` and
the storage-event bridge share (they were written four times, with the schemes in three
files). Asks and re-indexes take fresh ids: every one is a new run.
"""

from __future__ import annotations

import hashlib
from typing import Any, TypeVar

from temporalio.client import Client, WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy

from workflows.contracts import TASK_QUEUE
from workflows.priorities import start_priority

R = TypeVar("R")


def derived_id(kind: str, tenant: str, key: str) -> str:
    """``kind/tenant/<16 hex digits of sha256(key)>``: the same request, the same id."""
    return f"{kind}/{tenant}/{hashlib.sha256(key.encode()).hexdigest()[:16]}"


async def start_once(
    client: Client,
    workflow: str,
    arg: Any,
    workflow_id: str,
    result_type: type[R],
    summary: str = "",
    reject_duplicate: bool = False,
) -> WorkflowHandle[Any, R]:
    """Start ``workflow`` on the main queue, or attach to the open run that holds
    ``workflow_id`` (a second ``mmrag ingest`` of the same folder follows the first).
    ``reject_duplicate``: a closed run with that id also counts as done (an event
    delivered twice starts nothing the second time: ``WorkflowAlreadyStartedError``)."""
    return await client.start_workflow(
        workflow,
        arg,
        id=workflow_id,
        task_queue=TASK_QUEUE,
        result_type=result_type,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=(
            WorkflowIDReusePolicy.REJECT_DUPLICATE
            if reject_duplicate
            else WorkflowIDReusePolicy.ALLOW_DUPLICATE
        ),
        static_summary=summary or None,
        priority=start_priority(workflow),
    )
