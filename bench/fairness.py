"""Does Temporal's task-queue fairness keep one tenant's flood from starving another? Measured.

A synthetic bench of the server mechanism with stand-in jobs (sleeping activities, not mmrag's
workflows: on 2 shared cores real CLIP encoding would measure CPU contention, not queueing).
It starts its own Temporal dev server with the matching settings that turn
priority and fairness on (``matching.useNewMatcher``, ``matching.enableFairness``), and one
worker whose activity queues have few slots, like the encode queue. Tenant B runs small jobs
(one activity each, one at a time); tenant A floods the same queue with a backfill. Phases,
in one run and on one server:

- ``idle``: B alone;
- ``flood``: A's backfill and B's jobs on a queue without fairness keys (FIFO);
- ``fair``: the same on a queue where every activity carries ``fairness_key=<tenant>``;
- ``priority``: the same, B's activities with ``priority_key=1`` and A's with 5;
- ``mmrag``: the keys mmrag's own starters and workflows set (workflows/priorities.py): A's
  backfill is an ingest (priority 3), B alternates small ingests (3) and Asks (1), and every
  encode activity carries its tenant as fairness key (``fairness_key(tenant)``).

Activities sleep (``--activity-ms``): queueing, not CPU, is measured, so the figures hold on
this shared machine. Each phase reports B's job latency (start to result) p50 / p99.

    .venv/bin/python bench/fairness.py [--slots 4] [--flood 2000] [--jobs 40]

The last line of output is one line of JSON with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
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
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.common import Priority
from temporalio.runtime import LoggingConfig, Runtime, TelemetryConfig, TelemetryFilter
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

# The repository root replaces the script's own directory on the path: bench/ holds a
# module named http.py, which would shadow the standard library's http package.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from workflows.priorities import ASK_PRIORITY, INGEST_PRIORITY, fairness_key  # noqa: E402

WORKFLOW_QUEUE = "fairness-workflows"
FAIRNESS_CONFIG = (
    "matching.useNewMatcher=true",
    "matching.enableFairness=true",
    "history.transferProcessorMaxPollRPS=1000",  # as the embedded stack runs it
)


@dataclass
class JobInput:
    tenant: str
    queue: str
    activities: int
    activity_ms: int
    fairness: bool
    priority_key: int  # 0: none


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


def start_server(port: int) -> subprocess.Popen[bytes]:
    temporal = shutil.which("temporal", path=str(Path(sys.executable).parent)) or "temporal"
    cmd = [temporal, "server", "start-dev", "--ip", "127.0.0.1", "--port", str(port)]
    cmd += ["--headless", "--log-level", "warn"]
    for value in FAIRNESS_CONFIG:
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


async def b_jobs(
    client: Client,
    queue: str,
    args: argparse.Namespace,
    fairness: bool,
    priority_keys: tuple[int, ...],
) -> list[float]:
    """B's small jobs, one every ``gap_ms`` whatever the latency (open loop, as users ask),
    job i with ``priority_keys[i % len]``; each one's latency in ms."""

    async def one(i: int) -> float:
        await asyncio.sleep(i * args.gap_ms / 1000)
        start = time.perf_counter()
        key = priority_keys[i % len(priority_keys)]
        job = JobInput("tenant-b", queue, 1, args.activity_ms, fairness, key)
        await client.execute_workflow(
            Job.run,
            job,
            id=f"b-{uuid.uuid4()}",
            task_queue=WORKFLOW_QUEUE,
            priority=priority_of(job),
        )
        return (time.perf_counter() - start) * 1000

    return list(await asyncio.gather(*(one(i) for i in range(args.jobs))))


async def phase(
    client: Client,
    queue: str,
    args: argparse.Namespace,
    flood: bool,
    fairness: bool,
    a_key: int,
    b_keys: tuple[int, ...],
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
    latencies = await b_jobs(client, queue, args, fairness, b_keys)
    for handle in floods:  # what is left of the flood is dropped with its workflows
        if (await handle.describe()).status == WorkflowExecutionStatus.RUNNING:
            await handle.terminate("phase over")
    figures = percentiles(latencies)
    if len(set(b_keys)) > 1:  # B's jobs by priority key, e.g. Asks (1) and ingests (3)
        for key in sorted(set(b_keys)):
            part = [ms for i, ms in enumerate(latencies) if b_keys[i % len(b_keys)] == key]
            figures[f"priority_{key}"] = percentiles(part)
    return figures


def percentiles(latencies: list[float]) -> dict[str, Any]:
    ordered = sorted(latencies)
    return {
        "b_p50_ms": round(statistics.median(ordered), 1),
        "b_p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
        "b_jobs": len(ordered),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    server = start_server(port)
    try:
        client = await connect(port)
        phases = ("idle", "flood", "fair", "priority", "mmrag")
        queues = {name: f"fairness-{name}" for name in phases}
        workers = [
            Worker(
                client,
                task_queue=WORKFLOW_QUEUE,
                workflows=[Job],
                workflow_runner=UnsandboxedWorkflowRunner(),
                max_concurrent_workflow_tasks=50,
            )
        ] + [
            Worker(client, task_queue=q, activities=[work], max_concurrent_activities=args.slots)
            for q in queues.values()
        ]
        results: dict[str, Any] = {}
        async with contextlib_all(workers):
            warm = argparse.Namespace(**{**vars(args), "jobs": 5})
            await b_jobs(client, queues["idle"], warm, False, (0,))
            plan: list[tuple[str, bool, bool, int, tuple[int, ...]]] = [
                ("idle", False, False, 0, (0,)),
                ("flood", True, False, 0, (0,)),
                ("fair", True, True, 0, (0,)),
                ("priority", True, False, 5, (1,)),
                ("mmrag", True, True, INGEST_PRIORITY, (INGEST_PRIORITY, ASK_PRIORITY)),
            ]
            for name, flood, fairness, a_key, b_keys in plan:
                results[name] = await phase(
                    client, queues[name], args, flood, fairness, a_key, b_keys
                )
                print(name, json.dumps(results[name]), flush=True)
        idle = results["idle"]["b_p50_ms"]
        for name in phases[1:]:
            results[name]["p50_over_idle"] = round(results[name]["b_p50_ms"] / idle, 2)
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
    args = parser.parse_args()
    results = asyncio.run(main_async(args))
    report = {
        "slots": args.slots,
        "activity_ms": args.activity_ms,
        "flood_activities": args.flood,
        "b_jobs": args.jobs,
        "dynamic_config": list(FAIRNESS_CONFIG),
        **results,
        "goal_fair_p50_at_most_2x_idle": results["fair"]["p50_over_idle"] <= 2.0,
        "goal_mmrag_p50_at_most_2x_idle": results["mmrag"]["p50_over_idle"] <= 2.0,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
