"""Which Temporal dev-server settings change the cost of the Ask path's shape?

One workflow shaped like a retrieval-only ``Ask`` with trivial steps (an activity on another
task queue, then two local activities), run against several dev servers side by side, runs
interleaved so that machine noise falls on every variant alike:

- ``project``: what ``mmrag stack up`` runs (SQLite file in WAL mode, and
  ``stack.servers.LATENCY_DYNAMIC_CONFIG``), the baseline of the ratios;
- ``default-poll-rate``: the same without that dynamic config;
- candidates for "the next such setting": one task-queue partition instead of the default
  four, a transfer-task batch size of 1, and the in-memory store instead of the SQLite file.

Workers and client share this process; the workflow runs unsandboxed, since the sandbox's
cost is the same on every server and this measures the server's side.

    .venv/bin/python bench/temporal_settings.py [--runs 60]

The last line is one line of JSON: p50/p90 per variant and the ratio to ``project``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stack.ports import StackPorts  # noqa: E402
from stack.servers import LATENCY_DYNAMIC_CONFIG, venv_executable  # noqa: E402

WAL = ["--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=normal"]
PARTITIONS_1 = ("matching.numTaskqueueReadPartitions=1", "matching.numTaskqueueWritePartitions=1")
VARIANTS: dict[str, tuple[tuple[str, ...], bool]] = {  # name -> (dynamic config, SQLite file)
    "project": (LATENCY_DYNAMIC_CONFIG, True),
    "default-poll-rate": ((), True),
    "partitions-1": ((*LATENCY_DYNAMIC_CONFIG, *PARTITIONS_1), True),
    "transfer-batch-1": ((*LATENCY_DYNAMIC_CONFIG, "history.transferTaskBatchSize=1"), True),
    "in-memory": (LATENCY_DYNAMIC_CONFIG, False),
}


@activity.defn
async def remote_step(x: str) -> str:
    return x


@activity.defn
async def local_step(x: str) -> str:
    return x


@workflow.defn
class AskShaped:
    @workflow.run
    async def run(self, x: str) -> str:
        y = await workflow.execute_activity(
            remote_step, x, task_queue="encode", start_to_close_timeout=timedelta(seconds=10)
        )
        for _ in range(2):
            y = await workflow.execute_local_activity(
                local_step, y, start_to_close_timeout=timedelta(seconds=10)
            )
        return y


def server_command(home: Path, name: str, ports: StackPorts) -> list[str]:
    dynamic, on_file = VARIANTS[name]
    cmd = [
        venv_executable("temporal"),
        "server",
        "start-dev",
        "--headless",
        "--ip",
        "127.0.0.1",
        "--port",
        str(ports.temporal),
        "--ui-port",
        str(ports.temporal_ui),
        "--log-level",
        "error",
    ]
    if on_file:
        cmd += ["--db-filename", str(home / f"{name}.db"), *WAL]
    for value in dynamic:
        cmd += ["--dynamic-config-value", value]
    return cmd


async def connect(address: str) -> Client:
    for _ in range(150):
        try:
            return await Client.connect(address)
        except RuntimeError:
            await asyncio.sleep(0.2)
    raise RuntimeError(f"no Temporal dev server at {address}")


async def measure(runs: int, warmup: int) -> dict[str, dict[str, float]]:
    home = Path(tempfile.mkdtemp(prefix="mmrag-bench-temporal-"))
    procs: list[subprocess.Popen[bytes]] = []
    workers: list[Worker] = []
    try:
        clients: dict[str, Client] = {}
        for name in VARIANTS:
            ports = StackPorts.free()
            procs.append(
                subprocess.Popen(
                    server_command(home, name, ports),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            clients[name] = await connect(f"127.0.0.1:{ports.temporal}")
        for client in clients.values():
            workers += [
                Worker(
                    client,
                    task_queue="mmrag",
                    workflows=[AskShaped],
                    activities=[local_step],
                    workflow_runner=UnsandboxedWorkflowRunner(),
                ),
                Worker(client, task_queue="encode", activities=[remote_step]),
            ]
        running = [asyncio.create_task(w.run()) for w in workers]
        samples: dict[str, list[float]] = {name: [] for name in clients}
        for i in range(warmup + runs):
            for name, client in clients.items():
                started = time.perf_counter()
                await client.execute_workflow(
                    AskShaped.run, "q", id=f"bench-{uuid.uuid4().hex}", task_queue="mmrag"
                )
                if i >= warmup:
                    samples[name].append(1000 * (time.perf_counter() - started))
        await asyncio.gather(*(w.shutdown() for w in workers))
        await asyncio.gather(*running, return_exceptions=True)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        subprocess.run(["rm", "-rf", str(home)], check=False)
    return {
        name: {
            "p50_ms": round(statistics.median(values), 1),
            "p90_ms": round(sorted(values)[int(0.9 * (len(values) - 1))], 1),
        }
        for name, values in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    figures = asyncio.run(measure(args.runs, args.warmup))
    base = figures["project"]["p50_ms"]
    for name, f in figures.items():
        f["ratio_to_project"] = round(f["p50_ms"] / base, 2)
        print(
            f"{name:<18} p50 {f['p50_ms']:>6} ms  p90 {f['p90_ms']:>6} ms  x{f['ratio_to_project']}"
        )
    print(json.dumps({"runs": args.runs, "variants": figures}))


if __name__ == "__main__":
    main()
