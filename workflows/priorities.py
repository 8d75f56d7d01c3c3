"""Task-queue priority and fairness: Asks before ingests before re-indexes, tenants by turns.

Every queue is shared: one tenant's backfill can fill the encode queue, and a Reindex can
fill every queue for hours. Temporal's task-queue priority (``priority_key`` 1-5, lower
first; 3 when unset) orders tasks of different kinds, and its fairness keys (one per
tenant) hand out a queue's slots round-robin between tenants within a priority, so a
tenant's Ask or small ingest waits for its turn, not for another tenant's backlog
(docs/scaling.md, "Priority and fairness"). The server needs
``matching.useNewMatcher`` / ``matching.enableFairness`` (the embedded stack sets them,
stack/servers.py; Temporal Cloud per namespace); a server without them ignores both. Both
order tasks within a task-queue partition: the stack runs one partition per queue
(docker-compose: the encode queue); with 4, a tenant's task waited up to 4 s behind another
tenant's backlog (bench/fairness.py).

Starters set the priority on the workflow start; activities and child workflows inherit
it. Encode activities add the tenant as fairness key (:func:`tenant_turns`).
"""

from __future__ import annotations

import hashlib

from temporalio.common import Priority

from workflows.contracts import (
    ASK_WORKFLOW,
    INGEST_ASSET_WORKFLOW,
    INGEST_BATCH_WORKFLOW,
    REINDEX_WORKFLOW,
    WATCH_PREFIX_WORKFLOW,
)

MAX_FAIRNESS_KEY_BYTES = 64  # Temporal's limit on a fairness key
ASK_PRIORITY = 1
INGEST_PRIORITY = 3
REINDEX_PRIORITY = 5

#: Workflow type -> the priority its runs start with; others (Forget: short) keep the default.
START_PRIORITY = {
    ASK_WORKFLOW: ASK_PRIORITY,
    INGEST_BATCH_WORKFLOW: INGEST_PRIORITY,
    INGEST_ASSET_WORKFLOW: INGEST_PRIORITY,
    WATCH_PREFIX_WORKFLOW: INGEST_PRIORITY,
    REINDEX_WORKFLOW: REINDEX_PRIORITY,
}


def start_priority(workflow_type: str) -> Priority:
    """The priority a starter gives a run of ``workflow_type`` (Temporal's default if none)."""
    key = START_PRIORITY.get(workflow_type)
    return Priority(priority_key=key) if key is not None else Priority.default


def fairness_key(tenant: str) -> str:
    """The tenant as a fairness key: itself when it fits Temporal's 64 bytes, else a digest
    of it (tenant names may be up to 128 characters; distinct tenants keep distinct keys)."""
    if len(tenant.encode()) <= MAX_FAIRNESS_KEY_BYTES:
        return tenant
    return "sha256:" + hashlib.sha256(tenant.encode()).hexdigest()[:48]


def tenant_turns(tenant: str) -> Priority:
    """An activity's priority with the tenant as fairness key; the priority key is left
    unset, so the server takes the workflow's (an Ask's encode stays ahead of a backfill)."""
    return Priority(fairness_key=fairness_key(tenant)) if tenant else Priority.default
