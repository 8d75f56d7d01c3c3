"""Start lifecycle workflows (re-index, rollback, forget, watch) and manage their Schedules."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import timedelta

from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleHandle,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleState,
    WorkflowHandle,
)
from temporalio.common import WorkflowIDConflictPolicy

from workflows.contracts import (
    FORGET_WORKFLOW,
    FULL,
    INCREMENTAL,
    REINDEX_WORKFLOW,
    TASK_QUEUE,
    WATCH_PREFIX_WORKFLOW,
    ForgetInput,
    ForgetResult,
    IngestResult,
    ReindexInput,
    ReindexResult,
    WatchPrefixInput,
)

SCHEDULE_KINDS = {INCREMENTAL: "0 3 * * *", FULL: "0 4 * * 0"}  # nightly; weekly on Sunday


def reindex_workflow_id(inp: ReindexInput) -> str:
    return f"reindex/{inp.mode}/{inp.tenant or 'all'}/{uuid.uuid4().hex[:8]}"


async def start_reindex(client: Client, inp: ReindexInput) -> WorkflowHandle[object, ReindexResult]:
    scope = inp.tenant or "every tenant"
    return await client.start_workflow(
        REINDEX_WORKFLOW,
        inp,
        id=reindex_workflow_id(inp),
        task_queue=TASK_QUEUE,
        result_type=ReindexResult,
        static_summary=f"{inp.mode} re-index of {scope}",
    )


async def start_forget(client: Client, inp: ForgetInput) -> WorkflowHandle[object, ForgetResult]:
    """The id derives from what is forgotten, so a repeated request attaches to the run."""
    key = f"{inp.asset_id}|{inp.uri_prefix}|{sorted(inp.tags.items())}|{inp.if_generation}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return await client.start_workflow(
        FORGET_WORKFLOW,
        inp,
        id=f"forget/{inp.tenant}/{digest}",
        task_queue=TASK_QUEUE,
        result_type=ForgetResult,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        static_summary=f"forget assets of tenant {inp.tenant}",
    )


async def start_watch(
    client: Client, inp: WatchPrefixInput
) -> WorkflowHandle[object, IngestResult]:
    digest = hashlib.sha256(inp.prefix.encode()).hexdigest()[:16]
    return await client.start_workflow(
        WATCH_PREFIX_WORKFLOW,
        inp,
        id=f"watch/{inp.tenant}/{digest}",
        task_queue=TASK_QUEUE,
        result_type=IngestResult,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        static_summary=f"watch {inp.prefix} for tenant {inp.tenant}",
    )


def schedule_id(kind: str, tenant: str) -> str:
    return f"mmrag-reindex-{kind}-{tenant or 'all'}"


@dataclass
class ScheduleRow:
    id: str
    paused: bool
    cron: str
    note: str


async def create_schedule(
    client: Client,
    kind: str,
    tenant: str = "",
    cron: str = "",
    model: str = "",
    pretrained: str = "",
    checkpoint: str = "",
    catchup_window: timedelta = timedelta(hours=1),
    paused: bool = False,
) -> ScheduleHandle:
    """A Temporal Schedule that runs ``Reindex``; overlapping runs are skipped (and the
    workflow's scope lock refuses a second re-index of a tenant however it is started)."""
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"unknown schedule kind {kind!r}: use incremental or full")
    if kind == FULL and tenant:
        raise ValueError("a full re-index covers every tenant: drop --tenant")
    inp = ReindexInput(
        mode=kind, tenant=tenant, model=model, pretrained=pretrained, checkpoint=checkpoint
    )
    sid = schedule_id(kind, tenant)
    return await client.create_schedule(
        sid,
        Schedule(
            action=ScheduleActionStartWorkflow(
                REINDEX_WORKFLOW,
                inp,
                id=f"reindex/{kind}/{tenant or 'all'}/scheduled",
                task_queue=TASK_QUEUE,
            ),
            spec=ScheduleSpec(cron_expressions=[cron or SCHEDULE_KINDS[kind]]),
            policy=SchedulePolicy(
                overlap=ScheduleOverlapPolicy.SKIP, catchup_window=catchup_window
            ),
            state=ScheduleState(
                paused=paused, note=f"{kind} re-index of {tenant or 'every tenant'} (mmrag)"
            ),
        ),
    )


async def list_schedules(client: Client) -> list[ScheduleRow]:
    rows = []
    async for entry in await client.list_schedules():
        if not entry.id.startswith("mmrag-"):
            continue
        desc = await client.get_schedule_handle(entry.id).describe()
        spec = desc.schedule.spec
        rows.append(
            ScheduleRow(
                entry.id,
                desc.schedule.state.paused,
                ", ".join(spec.cron_expressions) if spec.cron_expressions else "",
                desc.schedule.state.note or "",
            )
        )
    return rows
