"""Start lifecycle workflows (re-index, rollback, forget, watch) and manage their Schedules.

Schedule mistakes a person makes (a second ``create``, a cron Temporal cannot parse, a
schedule id that does not exist) come back as ``ValueError`` / ``LookupError`` with one
line that says what to do, for the CLI to print.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleCalendarSpec,
    ScheduleHandle,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleRange,
    ScheduleSpec,
    ScheduleState,
    WorkflowHandle,
)
from temporalio.service import RPCError, RPCStatusCode

from starters.runs import derived_id, start_once
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
from workflows.priorities import start_priority

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
        priority=start_priority(REINDEX_WORKFLOW),
    )


async def start_forget(client: Client, inp: ForgetInput) -> WorkflowHandle[object, ForgetResult]:
    """The id derives from what is forgotten, so a repeated request attaches to the run."""
    key = f"{inp.asset_id}|{inp.uri_prefix}|{sorted(inp.tags.items())}|{inp.if_generation}"
    return await start_once(
        client,
        FORGET_WORKFLOW,
        inp,
        derived_id("forget", inp.tenant, key),
        ForgetResult,
        f"forget assets of tenant {inp.tenant}",
    )


async def start_watch(
    client: Client, inp: WatchPrefixInput
) -> WorkflowHandle[object, IngestResult]:
    return await start_once(
        client,
        WATCH_PREFIX_WORKFLOW,
        inp,
        derived_id("watch", inp.tenant, inp.prefix),
        IngestResult,
        f"watch {inp.prefix} for tenant {inp.tenant}",
    )


def reindex_flags_problem(
    mode: str, tenant: str, model: str, pretrained: str, checkpoint: str
) -> str:
    """What is wrong with a re-index's flags for its mode ("" when nothing): a flag that
    mode would ignore is refused, so no one believes a model or tenant was applied."""
    if tenant and mode != INCREMENTAL:
        return f"--tenant: a {mode} re-index covers every tenant; drop --tenant"
    given = [f for f, v in (("--model", model), ("--pretrained", pretrained)) if v]
    if checkpoint:
        given.append("--checkpoint")
    if given and mode != FULL:
        return f"{', '.join(given)} choose the model of a full re-index; they need `full`"
    if (pretrained or checkpoint) and not model:
        return f"{given[-1]} belongs to a model: add --model"
    return ""


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
    problem = reindex_flags_problem(kind, tenant, model, pretrained, checkpoint)
    if problem:
        raise ValueError(problem)
    inp = ReindexInput(
        mode=kind, tenant=tenant, model=model, pretrained=pretrained, checkpoint=checkpoint
    )
    sid = schedule_id(kind, tenant)
    cron = cron or SCHEDULE_KINDS[kind]
    try:
        return await client.create_schedule(
            sid,
            Schedule(
                action=ScheduleActionStartWorkflow(
                    REINDEX_WORKFLOW,
                    inp,
                    id=f"reindex/{kind}/{tenant or 'all'}/scheduled",
                    task_queue=TASK_QUEUE,
                    priority=start_priority(REINDEX_WORKFLOW),
                ),
                spec=ScheduleSpec(cron_expressions=[cron]),
                policy=SchedulePolicy(
                    overlap=ScheduleOverlapPolicy.SKIP, catchup_window=catchup_window
                ),
                state=ScheduleState(
                    paused=paused, note=f"{kind} re-index of {tenant or 'every tenant'} (mmrag)"
                ),
            ),
        )
    except ScheduleAlreadyRunningError:
        raise ValueError(
            f"schedule {sid} already exists: `mmrag schedule list` shows it; delete it first "
            f"(`mmrag schedule delete --kind {kind}{' --tenant ' + tenant if tenant else ''}`) "
            "to create it again"
        ) from None
    except RPCError as e:
        if e.status != RPCStatusCode.INVALID_ARGUMENT:
            raise
        raise ValueError(
            f"--cron {cron!r} was refused ({e.message}): write five fields, minute hour "
            "day-of-month month day-of-week, e.g. '0 3 * * *' for 03:00 every day"
        ) from None


async def schedule_action(client: Client, action: str, sid: str) -> None:
    """pause | unpause | trigger | delete the schedule ``sid``; ``LookupError`` when there
    is none."""
    handle = client.get_schedule_handle(sid)
    try:
        if action == "pause":
            await handle.pause(note="paused with mmrag schedule pause")
        elif action == "unpause":
            await handle.unpause(note="unpaused with mmrag schedule unpause")
        elif action == "trigger":
            await handle.trigger()
        elif action == "delete":
            await handle.delete()
        else:
            raise ValueError(f"unknown schedule action {action!r}")
    except RPCError as e:
        if e.status != RPCStatusCode.NOT_FOUND:
            raise
        raise LookupError(
            f"there is no schedule {sid}: `mmrag schedule list` shows the schedules (pass "
            "--id, or the --kind and --tenant it was created with)"
        ) from None


async def list_schedules(client: Client) -> list[ScheduleRow]:
    rows = []
    async for entry in await client.list_schedules():
        if not entry.id.startswith("mmrag-"):
            continue
        desc = await client.get_schedule_handle(entry.id).describe()
        rows.append(
            ScheduleRow(
                entry.id,
                desc.schedule.state.paused,
                spec_text(desc.schedule.spec),
                desc.schedule.state.note or "",
            )
        )
    return rows


# Each calendar field's full range, which cron writes as "*".
_FULL = {"minute": (0, 59), "hour": (0, 23), "day_of_month": (1, 31), "month": (1, 12)}
_FULL_DOW = (0, 6)


def spec_text(spec: ScheduleSpec) -> str:
    """When a schedule runs, as cron text. The server keeps a cron expression as calendar
    ranges (``cron_expressions`` comes back empty), so the cron is rebuilt from them."""
    parts = list(spec.cron_expressions)
    parts += [_calendar_cron(c) for c in spec.calendars]
    parts += [f"every {i.every}" + (f" +{i.offset}" if i.offset else "") for i in spec.intervals]
    return ", ".join(parts) or "-"


def _calendar_cron(c: ScheduleCalendarSpec) -> str:
    fields = [
        _ranges(c.minute, _FULL["minute"]),
        _ranges(c.hour, _FULL["hour"]),
        _ranges(c.day_of_month, _FULL["day_of_month"]),
        _ranges(c.month, _FULL["month"]),
        _ranges(c.day_of_week, _FULL_DOW),
    ]
    seconds = _ranges(c.second, (0, 59))
    return " ".join(fields if seconds == "0" else [seconds, *fields])


def _ranges(ranges: Sequence[ScheduleRange], full: tuple[int, int]) -> str:
    if not ranges:
        return "*"
    out = []
    for r in ranges:
        end = max(r.end, r.start)
        step = r.step or 1
        if (r.start, end) == full:
            text = "*"
        elif end == r.start:
            text = str(r.start)
        else:
            text = f"{r.start}-{end}"
        out.append(text + (f"/{step}" if step > 1 else ""))
    return ",".join(out)
