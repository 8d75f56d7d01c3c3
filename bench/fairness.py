"""Does Temporal's task-queue fairness keep one tenant's flood from starving another? Measured.

A synthetic bench of the server mechanism with stand-in jobs (sleeping activities, not mmrag's
workflows: on 2 shared cores real CLIP encoding would measure CPU contention, not queueing).
It starts its own Temporal dev server with the embedded stack's dynamic config
(stack/servers.py: ``matching.useNewMatcher``, ``matching.enableFairness``, one task-queue
partition), and one worker whose activity queues have few slots, like the encode queue.
Tenant B runs small jobs (one activity each, open loop); tenant A floods the same queue with
a backfill. Phases, in one run and on one server:

- ``idle``: B alone;
- ``flood``: A's backfill and B's jobs on a queue without fairness keys (FIFO);
- ``fair``: the same on a queue where every activity carries ``fairness_key=<tenant>``;
- ``priority``: the same, B's activities with ``priority_key=1`` and A's with 5;
- ``mmrag_idle`` / ``mmrag``: mmrag as deployed, B alone and under A's flood, with the keys
  mmrag's starters and workflows set (workflows/priorities.py): A's backfill is an ingest
  (priority 3), B alternates small ingests (3, on the flooded encode queue, sharing the
  workflow queue with A) and Asks (1) that run on the query queue, where the query worker
  encodes by a local activity (workers/roles.py ``query_role``: no encode-queue hop);
  every encode activity carries its tenant as fairness key;
- ``mmrag_shared``: the same without a query worker: B's Asks start on the workflow queue
  and send their encode to the flooded encode queue (the throughput path).

Activities sleep (``--activity-ms``): queueing, not CPU, is measured. Each phase reports
B's job latency (start to result) p50 / p99, and where it went: every job's history is read
back and its time split at the recorded events (``SEGMENTS``: workflow-task and activity
schedule-to-start, their runs, the client's two ends), median per segment and the slowest
job's split; the per-phase line also lists each job's activity schedule-to-start in order.

    .venv/bin/python bench/fairness.py [--slots 4] [--flood 2000] [--jobs 40]
        [--partitions 4] [--no-sticky]

The last line of output is one line of JSON with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import shutil
import socket
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from temporalio import activity, workflow
from temporalio.api.enums.v1 import EventType, TaskQueueKind
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.common import Priority
from temporalio.runtime import LoggingConfig, Runtime, TelemetryConfig, TelemetryFilter
from temporalio.service import RPCError
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

# The repository root replaces the script's own directory on the path: bench/ holds a
# module named http.py, which would shadow the standard library's http package.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from stack.servers import LATENCY_DYNAMIC_CONFIG, PRIORITY_DYNAMIC_CONFIG  # noqa: E402
from workflows.priorities import ASK_PRIORITY, INGEST_PRIORITY, fairness_key  # noqa: E402

WORKFLOW_QUEUE = "fairness-workflows"  # `mmrag`: A's and B's ingests, Asks without a query worker
QUERY_QUEUE = "fairness-query"  # `mmrag-query`: B's Asks, encoded by a local activity
# The embedded stack's own dynamic config (priority, fairness, one partition per queue);
# --partitions N replaces the partition count (4 is the server's default).
FAIRNESS_CONFIG = (*LATENCY_DYNAMIC_CONFIG, *PRIORITY_DYNAMIC_CONFIG)


@dataclass
class JobInput:
    tenant: str
    queue: str
    activities: int
    activity_ms: int
    fairness: bool
    priority_key: int  # 0: none
    # An Ask on the query queue (mmrag's default placement, workers/roles.py query_role):
    # the query is encoded by a local activity of the Ask's own worker, no encode-queue hop.
    local: bool = False


@activity.defn
async def work(ms: int) -> None:
    """Stands in for an encode batch: holds a slot for ``ms`` without using the CPU."""
    await asyncio.sleep(ms / 1000)


def priority_of(job: JobInput) -> Priority:
    """The job's priority: set on the workflow (its workflow tasks queue by it too) and on
    each activity (activities would inherit it; set explicitly for clarity)."""
    return Priority(
        priority_key=job.priority_key or None,
        fairness_key=fairness_key(job.tenant) if job.fairness else None,
    )


@workflow.defn
class Job:
    @workflow.run
    async def run(self, job: JobInput) -> None:
        priority = priority_of(job)
        if job.local:
            await workflow.execute_local_activity(
                work, job.activity_ms, start_to_close_timeout=timedelta(minutes=5)
            )
            return
        await asyncio.gather(
            *(
                workflow.execute_activity(
                    work,
                    job.activity_ms,
                    task_queue=job.queue,
                    start_to_close_timeout=timedelta(minutes=5),
                    priority=priority,
                )
                for _ in range(job.activities)
            )
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(port: int, config: tuple[str, ...]) -> subprocess.Popen[bytes]:
    temporal = shutil.which("temporal", path=str(Path(sys.executable).parent)) or "temporal"
    cmd = [temporal, "server", "start-dev", "--ip", "127.0.0.1", "--port", str(port)]
    cmd += ["--headless", "--log-level", "warn"]
    for value in config:
        cmd += ["--dynamic-config-value", value]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def connect(port: int, timeout: float = 60) -> Client:
    deadline = time.monotonic() + timeout
    while True:
        try:
            # Terminating a flood makes the worker log each of its running activities'
            # completions as "not found": expected here, so the SDK logs errors only.
            quiet = TelemetryFilter(core_level="ERROR", other_level="ERROR")
            runtime = Runtime(telemetry=TelemetryConfig(logging=LoggingConfig(filter=quiet)))
            return await Client.connect(f"127.0.0.1:{port}", runtime=runtime)
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


@dataclass(frozen=True)
class Kind:
    """One kind of B's jobs: its priority key (0: none) and whether it is an Ask on the
    query queue (encoded by a local activity there, as mmrag deploys Asks by default)."""

    priority_key: int
    on_query_queue: bool = False

    @property
    def label(self) -> str:
        return ("ask_query_queue" if self.on_query_queue else "") or f"priority_{self.priority_key}"


@dataclass
class BRun:
    """One of B's jobs as the client saw it (wall clock, comparable with event times)."""

    kind: Kind
    workflow_id: str
    started: float
    finished: float

    @property
    def ms(self) -> float:
        return (self.finished - self.started) * 1000


async def b_jobs(
    client: Client,
    queue: str,
    args: argparse.Namespace,
    fairness: bool,
    kinds: tuple[Kind, ...],
) -> list[BRun]:
    """B's small jobs, one every ``gap_ms`` whatever the latency (open loop, as users ask),
    job i of ``kinds[i % len]``."""

    async def one(i: int) -> BRun:
        await asyncio.sleep(i * args.gap_ms / 1000)
        kind = kinds[i % len(kinds)]
        job = JobInput(
            "tenant-b",
            queue,
            1,
            args.activity_ms,
            fairness,
            kind.priority_key,
            local=kind.on_query_queue,
        )
        workflow_id = f"b-{uuid.uuid4()}"
        started = time.time()
        await client.execute_workflow(
            Job.run,
            job,
            id=workflow_id,
            task_queue=QUERY_QUEUE if kind.on_query_queue else WORKFLOW_QUEUE,
            priority=priority_of(job),
        )
        return BRun(kind, workflow_id, started, time.time())

    return list(await asyncio.gather(*(one(i) for i in range(args.jobs))))


# Where a job's time goes, from its recorded history: each interval between consecutive
# events is charged to the later event's type; the client's own two ends are added.
SEGMENT_OF = {
    EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED: "wft_wait",  # workflow task schedule-to-start
    EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED: "wft_run",  # incl. a local activity's run
    EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED: "activity_wait",  # activity schedule-to-start
    EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED: "activity_run",
}
SEGMENTS = (
    "start",  # client's start call to WorkflowExecutionStarted
    "wft1_wait",  # the first workflow task's schedule-to-start (the workflow queue)
    "wft_run",
    "activity_wait",
    "activity_run",
    "wft2_wait",  # the workflow task after the activity (sticky or workflow queue)
    "server_steps",  # the rest between events: activity done -> task scheduled, etc.
    "result",  # WorkflowExecutionCompleted to the client holding the result
)


def event_time(event: Any) -> float:
    return float(event.event_time.seconds) + event.event_time.nanos / 1e9


async def breakdown(client: Client, run: BRun) -> dict[str, Any]:
    """One job's latency split into SEGMENTS (ms), from its history's event timestamps."""
    history = await client.get_workflow_handle(run.workflow_id).fetch_history()
    events = list(history.events)
    seg = dict.fromkeys(SEGMENTS, 0.0)
    seg["start"] = (event_time(events[0]) - run.started) * 1000
    seg["result"] = (run.finished - event_time(events[-1])) * 1000
    wft_waits = 0
    sticky = False
    for prev, event in itertools.pairwise(events):
        ms = (event_time(event) - event_time(prev)) * 1000
        name = SEGMENT_OF.get(event.event_type, "server_steps")
        if name == "wft_wait":
            name = "wft1_wait" if wft_waits == 0 else "wft2_wait"
            wft_waits += 1
            sticky = sticky or prev.workflow_task_scheduled_event_attributes.task_queue.kind == (
                TaskQueueKind.TASK_QUEUE_KIND_STICKY
            )
        seg[name] += ms
    return {**{k: round(v, 1) for k, v in seg.items()}, "sticky": sticky, "ms": round(run.ms, 1)}


async def phase(
    client: Client,
    queue: str,
    args: argparse.Namespace,
    flood: bool,
    fairness: bool,
    a_key: int,
    kinds: tuple[Kind, ...],
) -> dict[str, Any]:
    floods = []
    if flood:
        per_job = args.flood // args.flood_jobs
        backfill = JobInput("tenant-a", queue, per_job, args.activity_ms, fairness, a_key)
        floods = [
            await client.start_workflow(
                Job.run,
                backfill,
                id=f"a-{uuid.uuid4()}",
                task_queue=WORKFLOW_QUEUE,
                priority=priority_of(backfill),
            )
            for _ in range(args.flood_jobs)
        ]
        await asyncio.sleep(1.0)  # the backlog is there before B starts
    runs = await b_jobs(client, queue, args, fairness, kinds)
    for handle in floods:  # what is left of the flood is dropped with its workflows
        if (await handle.describe()).status == WorkflowExecutionStatus.RUNNING:
            with contextlib.suppress(RPCError):  # it completed in between
                await handle.terminate("phase over")
    splits = [await breakdown(client, run) for run in runs]
    figures = summary(runs, splits)
    # In start order: which of B's jobs waited (the first ones? one in four?), for the log.
    figures["activity_wait_by_job"] = [round(s["activity_wait"]) for s in splits]
    if len(set(kinds)) > 1:  # B's jobs by kind, e.g. Asks (1) and ingests (3)
        for kind in sorted(set(kinds), key=lambda k: k.label):
            part = [i for i, run in enumerate(runs) if run.kind == kind]
            figures[kind.label] = summary([runs[i] for i in part], [splits[i] for i in part])
    return figures


def summary(runs: list[BRun], splits: list[dict[str, Any]]) -> dict[str, Any]:
    figures = percentiles([run.ms for run in runs])
    # Median of each segment, and the slowest job's own split (the p99 of 40 is the max).
    figures["median_ms"] = {k: round(statistics.median(s[k] for s in splits), 1) for k in SEGMENTS}
    figures["slowest"] = max(splits, key=lambda s: float(s["ms"]))
    figures["sticky_wft2"] = sum(bool(s["sticky"]) for s in splits)
    return figures


def percentiles(latencies: list[float]) -> dict[str, Any]:
    ordered = sorted(latencies)
    return {
        "b_p50_ms": round(statistics.median(ordered), 1),
        "b_p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
        "b_jobs": len(ordered),
    }


INGEST = Kind(INGEST_PRIORITY)
PLAN: tuple[tuple[str, bool, bool, int, tuple[Kind, ...], str], ...] = (
    # name, flood, fairness keys, A's priority key, B's kinds, the idle phase it compares to
    ("idle", False, False, 0, (Kind(0),), ""),
    ("flood", True, False, 0, (Kind(0),), "idle"),
    ("fair", True, True, 0, (Kind(0),), "idle"),
    ("priority", True, False, 5, (Kind(1),), "idle"),
    # mmrag as deployed (query worker up): B's Asks on the query queue, its ingests share
    # the workflow queue and the encode queue with A's backfill.
    ("mmrag_idle", False, True, 0, (INGEST, Kind(ASK_PRIORITY, True)), ""),
    ("mmrag", True, True, INGEST_PRIORITY, (INGEST, Kind(ASK_PRIORITY, True)), "mmrag_idle"),
    # mmrag without a query worker: Asks on `mmrag`, encode_query on the encode queue.
    ("mmrag_shared", True, True, INGEST_PRIORITY, (INGEST, Kind(ASK_PRIORITY)), "idle"),
)


async def main_async(args: argparse.Namespace, config: tuple[str, ...]) -> dict[str, Any]:
    port = free_port()
    server = start_server(port, config)
    try:
        client = await connect(port)
        queues = {name: f"fairness-{name}" for name, *_ in PLAN}
        # Workflow workers with the SDK's default slots, pollers and cache, as mmrag's.
        workflow_options: dict[str, Any] = {"workflow_runner": UnsandboxedWorkflowRunner()}
        if args.no_sticky:
            workflow_options["max_cached_workflows"] = 0
        workers = [
            Worker(client, task_queue=WORKFLOW_QUEUE, workflows=[Job], **workflow_options),
            Worker(
                client,
                task_queue=QUERY_QUEUE,
                workflows=[Job],
                activities=[work],
                **workflow_options,
            ),
        ] + [
            Worker(client, task_queue=q, activities=[work], max_concurrent_activities=args.slots)
            for q in queues.values()
        ]
        results: dict[str, Any] = {}
        async with contextlib_all(workers):
            warm = argparse.Namespace(**{**vars(args), "jobs": 5})
            await b_jobs(client, queues["idle"], warm, False, (Kind(0), Kind(1, True)))
            for name, flood, fairness, a_key, kinds, _ in PLAN:
                results[name] = await phase(
                    client, queues[name], args, flood, fairness, a_key, kinds
                )
                brief = {k: results[name][k] for k in ("b_p50_ms", "b_p99_ms", "median_ms")}
                brief["activity_wait_by_job"] = results[name].pop("activity_wait_by_job")
                print(name, json.dumps(brief), flush=True)
        for name, *_, idle in PLAN:
            if idle:
                ratio = results[name]["b_p50_ms"] / results[idle]["b_p50_ms"]
                results[name]["p50_over_idle"] = round(ratio, 2)
        mmrag, idle = results["mmrag"], results["mmrag_idle"]
        for label in ("priority_3", "ask_query_queue"):
            mmrag[label]["p50_over_idle"] = round(
                mmrag[label]["b_p50_ms"] / idle[label]["b_p50_ms"], 2
            )
        return results
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()


class contextlib_all:  # noqa: N801 - used like a context manager function
    """Run several workers for the duration of a block."""

    def __init__(self, workers: list[Worker]) -> None:
        self.workers = workers
        self.tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> None:
        self.tasks = [asyncio.create_task(w.run()) for w in self.workers]
        await asyncio.sleep(0.5)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(*(w.shutdown() for w in self.workers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slots", type=int, default=4, help="activity slots of the queue")
    parser.add_argument("--activity-ms", type=int, default=50)
    parser.add_argument("--flood", type=int, default=2000, help="A's activities per phase")
    parser.add_argument("--flood-jobs", type=int, default=20, help="A's workflows per phase")
    parser.add_argument("--jobs", type=int, default=40, help="B's jobs per phase")
    parser.add_argument("--gap-ms", type=int, default=250, help="B starts a job this often")
    parser.add_argument(
        "--partitions",
        type=int,
        default=0,
        help="task-queue partitions (matching.numTaskqueueRead/WritePartitions): the stack's 1 "
        "unless given; 4 is the server's default",
    )
    parser.add_argument(
        "--no-sticky",
        action="store_true",
        help="workers cache no workflows: every workflow task goes to the workflow queue",
    )
    parser.add_argument("--breakdown", action="store_true", help="print each phase's split")
    args = parser.parse_args()
    config = tuple(v for v in FAIRNESS_CONFIG if not v.startswith("matching.numTaskqueue"))
    partitions = args.partitions or 1
    config += tuple(f"matching.numTaskqueue{s}Partitions={partitions}" for s in ("Read", "Write"))
    results = asyncio.run(main_async(args, config))
    report = {
        "slots": args.slots,
        "activity_ms": args.activity_ms,
        "flood_activities": args.flood,
        "b_jobs": args.jobs,
        "dynamic_config": list(config),
        "sticky": not args.no_sticky,
        **results,
        "goal_fair_p50_at_most_2x_idle": results["fair"]["p50_over_idle"] <= 2.0,
        "goal_mmrag_p50_at_most_2x_idle": results["mmrag"]["p50_over_idle"] <= 2.0,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
