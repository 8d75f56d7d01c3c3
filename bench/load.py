"""Load and soak: concurrent Ask and ingest workflows for a bounded time against a local stack.

Starts its own embedded stack (Temporal dev server with a SQLite file, as ``mmrag stack up``;
Milvus; Postgres) on free loopback ports in a temporary directory, the LLM test server
(``tests/llm_server.py``, mode ``ok``) and one worker process per role, as deployed
(``mmrag worker --role cpu|encode|generate``, tiny model, each serving Prometheus on its own
127.0.0.1 port). It seeds tenant ``bench`` as ``bench/ask.py`` does (``bench/harness.py``:
216 synthetic images through ``IngestBatch`` plus ``--vectors`` bulk random vectors), then
runs closed loops for
``--warmup`` + ``--duration`` seconds:

- ``--ask-concurrency`` loops of ``Ask`` (``starters.ask.ask``), every question new (caches
  cold), alternating retrieval-only (``generate=false``) and full asks;
- ``--ingest-concurrency`` loops of ingests of *new* images into the same tenant: one
  ``IngestBatch`` of a fresh folder (18 images, ``starters.ingest.start_ingest``), then
  ``--assets-per-batch`` ``IngestAsset`` runs of one fresh image each.

Only workflows started after the warm-up count. It reports per workflow type the
throughput, p50/p99 latency (client wall time, start to result; nearest rank) and errors (a
failed or timed-out workflow, or a result that is not what it must be: an ask that is not
``generated``/``extractive`` with sources, an ingest with a failed object), the server's view
of the same window (workflows by close status), task-queue schedule-to-start latency from
workflow histories (``ActivityTaskScheduled`` -> ``ActivityTaskStarted`` server timestamps,
first attempts, per queue and activity; workflow tasks likewise) and from the workers' SDK
metrics (``temporal_activity_schedule_to_start_latency``, bucket bounds), and each worker's
RSS at the start and end of the measured window with the least-squares slope of RSS over it
(MB/min; a soak must show no steady growth). Traffic goes to 127.0.0.1 only; every loop is
bounded in time and count; everything it starts is stopped, by pid, and the temporary
directory is removed.

    .venv/bin/python bench/load.py [--duration 180] [--ask-concurrency 4] [--ingest-concurrency 2]

The last line of output is one line of JSON with all figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# The repository root, and not bench/ itself: a bench module must not shadow the standard
# library for this script (bench/http.py would be imported as ``http``).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import psutil  # noqa: E402
from temporalio.api.enums.v1 import EventType  # noqa: E402

from bench.harness import TENANT, Questions, bench_env, index_corpus, pct  # noqa: E402
from settings import get_settings  # noqa: E402
from stack.services import Stack, StackPorts  # noqa: E402
from starters.background import WorkerProcess  # noqa: E402

ROLES = ("cpu", "encode", "generate")
QUEUES = ("mmrag", "mmrag-gpu-encode", "mmrag-gpu-generate")
ALERT_LINE_PCT = 0.5  # the seed's error-rate alert line
KINDS = ("Ask/retrieval", "Ask/full", "IngestBatch", "IngestAsset")
MB = 1024 * 1024


# -- what one workflow run did ------------------------------------------------------------------
@dataclass
class Op:
    kind: str
    started: float  # time.monotonic()
    ended: float
    ok: bool
    error: str = ""
    images: int = 0  # ingested images (ingests)


@dataclass
class Load:
    """Shared state of the loops: the window, the counters and every finished run."""

    measure_start: float
    measure_end: float
    max_workflows: int
    timeout_s: float
    ops: list[Op] = field(default_factory=list)
    started: int = 0
    in_flight: int = 0

    def may_start(self) -> bool:
        return time.monotonic() < self.measure_end and self.started < self.max_workflows

    async def run(self, kind: str, coro: Any, check: Any) -> None:
        """Run one workflow (``coro`` returns its result), time it and record the outcome."""
        self.started += 1
        self.in_flight += 1
        t = time.monotonic()
        error, images = "", 0
        try:
            result = await asyncio.wait_for(coro, self.timeout_s)
            error, images = check(result)
        except TimeoutError:
            error = f"no result in {self.timeout_s:.0f} s"
        except Exception as e:  # noqa: BLE001 - every failure is a counted error
            error = describe(e)
        finally:
            self.in_flight -= 1
        self.ops.append(Op(kind, t, time.monotonic(), not error, error[:300], images))

    def measured(self) -> list[Op]:
        return [o for o in self.ops if self.measure_start <= o.started < self.measure_end]


def describe(e: BaseException) -> str:
    """An exception and its Temporal cause chain, in one line."""
    parts = []
    seen: BaseException | None = e
    while seen is not None and len(parts) < 5:
        parts.append(f"{type(seen).__name__}: {seen}")
        seen = getattr(seen, "cause", None) or seen.__cause__
    return " <- ".join(parts)


def check_ask(generate: bool) -> Any:
    want = "generated" if generate else "extractive"

    def check(result: Any) -> tuple[str, int]:
        if result.answer_kind != want or not result.sources or result.degraded:
            return (
                f"unexpected Ask result: kind {result.answer_kind!r} (want {want!r}), "
                f"{len(result.sources)} sources, degraded={result.degraded} "
                f"{result.degraded_reason}".strip(),
                0,
            )
        return "", 0

    return check


def check_ingest(expected: int) -> Any:
    def check(result: Any) -> tuple[str, int]:
        if result.failed or result.ingested != expected:
            reasons = "; ".join(f.reason for f in result.failures[:3])
            return (
                f"unexpected ingest result: ingested {result.ingested}/{expected}, "
                f"failed {result.failed} ({reasons})",
                result.ingested,
            )
        return "", result.ingested

    return check


# -- the loops ----------------------------------------------------------------------------------
async def ask_loop(client: Any, load: Load, questions: Questions, loop_no: int) -> None:
    from starters.ask import ask
    from workflows.contracts import AskInput

    n = loop_no  # neighbouring loops start on different kinds
    while load.may_start():
        generate = n % 2 == 1
        inp = AskInput(tenant=TENANT, text=questions.next(), generate=generate)
        kind = "Ask/full" if generate else "Ask/retrieval"
        await load.run(kind, ask(client, inp), check_ask(generate))
        n += 1


def write_image(path: Path, seed: int, size: int) -> None:
    from starters.synthetic_corpus import CLASSES, render

    rng = random.Random(seed)
    colour, shape = CLASSES[seed % len(CLASSES)]
    path.parent.mkdir(parents=True, exist_ok=True)
    render(colour, shape, rng, size).save(path, format="PNG")


async def ingest_loop(
    client: Any, load: Load, root: Path, loop_no: int, assets_per_batch: int, image_px: int
) -> None:
    from activities.store.objects import normalize_uri
    from starters.ingest import start_ingest
    from starters.synthetic_corpus import CLASSES, write_corpus
    from workflows.contracts import (
        INGEST_ASSET_WORKFLOW,
        TASK_QUEUE,
        IngestAssetInput,
        IngestResult,
    )

    tags = {"set": "load"}
    n = 0
    while load.may_start():
        seed = 100_000 * (loop_no + 1) + n
        if n % (assets_per_batch + 1) == 0:
            folder = root / f"batch-{loop_no}-{n}"
            await asyncio.to_thread(write_corpus, folder, 1, seed, image_px)

            async def batch(folder: Path = folder) -> Any:
                handle = await start_ingest(client, TENANT, [str(folder)], tags=tags)
                return await handle.result()

            await load.run("IngestBatch", batch(), check_ingest(len(CLASSES)))
        else:
            path = root / f"assets-{loop_no}" / f"asset-{n:06d}.png"
            await asyncio.to_thread(write_image, path, seed, image_px)
            inp = IngestAssetInput(tenant=TENANT, uri=normalize_uri(str(path)), tags=tags)
            coro = client.execute_workflow(
                INGEST_ASSET_WORKFLOW,
                inp,
                id=f"load-ingest-asset/{TENANT}/{uuid.uuid4().hex}",
                task_queue=TASK_QUEUE,
                result_type=IngestResult,
                static_summary=f"ingest 1 object for tenant {TENANT}",
            )
            await load.run("IngestAsset", coro, check_ingest(1))
        n += 1


# -- statistics ---------------------------------------------------------------------------------
def latency(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50_ms": 0.0, "p99_ms": 0.0, "mean_ms": 0.0, "max_ms": 0.0}
    return {
        "p50_ms": round(statistics.median(values), 1),
        "p99_ms": round(pct(values, 99), 1),
        "mean_ms": round(statistics.fmean(values), 1),
        "max_ms": round(max(values), 1),
    }


def slope_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, in value per minute."""
    if len(points) < 3:
        return 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx * 60


def workflow_figures(load: Load, duration: float) -> dict[str, Any]:
    ops = load.measured()
    out: dict[str, Any] = {}
    groups = {k: [o for o in ops if o.kind == k] for k in KINDS}
    groups["Ask"] = groups["Ask/retrieval"] + groups["Ask/full"]
    for name in ("Ask", *KINDS):
        group = groups[name]
        done = [o for o in group if o.ok]
        errors = len(group) - len(done)
        row: dict[str, Any] = {
            "runs": len(group),
            "ok": len(done),
            "errors": errors,
            "error_rate_pct": round(100 * errors / len(group), 3) if group else 0.0,
            "throughput_per_s": round(len(done) / duration, 3),
            **latency([(o.ended - o.started) * 1000 for o in done]),
        }
        if name.startswith("Ingest"):
            row["images_per_s"] = round(sum(o.images for o in done) / duration, 2)
        out[name] = row
    errors = sum(not o.ok for o in ops)
    out["all"] = {
        "runs": len(ops),
        "ok": len(ops) - errors,
        "errors": errors,
        "error_rate_pct": round(100 * errors / len(ops), 3) if ops else 0.0,
        "throughput_per_s": round((len(ops) - errors) / duration, 3),
    }
    return out


# -- schedule-to-start from workflow histories --------------------------------------------------
def iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def listed_runs(client: Any, start_wall: float, end_wall: float) -> list[Any]:
    query = f"StartTime >= '{iso(start_wall)}' AND StartTime < '{iso(end_wall)}'"
    return [w async for w in client.list_workflows(query, page_size=1000)]


async def history_schedule_to_start(client: Any, runs: list[Any], per_type: int) -> dict:
    """Server timestamps of a sample of histories (evenly spread, ``per_type`` per type)."""
    by_type: dict[str, list[Any]] = defaultdict(list)
    for w in runs:
        by_type[w.workflow_type].append(w)
    sample = []
    for group in by_type.values():
        step = max(1, len(group) // per_type)
        sample += group[::step][:per_type]
    gaps: dict[str, list[float]] = defaultdict(list)
    retries: Counter[str] = Counter()
    problems: Counter[str] = Counter()
    sem = asyncio.Semaphore(8)

    async def one(w: Any) -> None:
        async with sem:
            history = await client.get_workflow_handle(w.id, run_id=w.run_id).fetch_history()
        scheduled: dict[int, tuple[str, float]] = {}
        for e in history.events:
            name = EventType.Name(e.event_type)
            if name.endswith(("_FAILED", "_TIMED_OUT")):
                problems[f"{w.workflow_type} {name}"] += 1
            t = e.event_time.ToNanoseconds() / 1e6
            which = e.WhichOneof("attributes")
            if which == "activity_task_scheduled_event_attributes":
                a = e.activity_task_scheduled_event_attributes
                scheduled[e.event_id] = (f"{a.task_queue.name}|{a.activity_type.name}", t)
            elif which == "workflow_task_scheduled_event_attributes":
                scheduled[e.event_id] = ("mmrag|workflow task", t)
            elif which in (
                "activity_task_started_event_attributes",
                "workflow_task_started_event_attributes",
            ):
                a = getattr(e, which)
                key, t0 = scheduled.get(a.scheduled_event_id, ("", 0.0))
                if not key:
                    continue
                if getattr(a, "attempt", 1) > 1:  # includes retry backoff: counted apart
                    retries[key] += a.attempt - 1
                    continue
                gaps[key].append(t - t0)

    await asyncio.gather(*(one(w) for w in sample))
    out: dict[str, Any] = {
        "histories": len(sample),
        "per_queue": {},
        "per_step": {},
        "problem_events": dict(problems),
    }
    for queue in QUEUES:
        flat = [
            x
            for k, vs in gaps.items()
            if k.split("|")[0] == queue and "workflow" not in k
            for x in vs
        ]
        if flat:
            out["per_queue"][queue] = {"n": len(flat), **latency(flat)}
    for key, values in sorted(gaps.items()):
        out["per_step"][key.replace("|", " ")] = {"n": len(values), **latency(values)}
    out["activity_retries"] = dict(retries)
    return out


async def slowest_runs(client: Any, runs: list[Any], n: int, min_ms: float) -> list[dict]:
    """The ``n`` slowest runs (server start to close) over ``min_ms``, each with the largest
    gap between two consecutive events of its history: where the time went."""
    timed = [
        ((w.close_time - w.start_time).total_seconds() * 1000, w) for w in runs if w.close_time
    ]
    out = []
    for ms, w in sorted(timed, key=lambda x: -x[0])[:n]:
        if ms < min_ms:
            break
        history = await client.get_workflow_handle(w.id, run_id=w.run_id).fetch_history()
        events = list(history.events)
        gap, where = 0.0, ""
        for a, b in zip(events, events[1:], strict=False):
            d = (b.event_time.ToNanoseconds() - a.event_time.ToNanoseconds()) / 1e6
            if d > gap:
                gap = d
                where = f"{EventType.Name(a.event_type)} -> {EventType.Name(b.event_type)}"
        out.append(
            {
                "id": w.id,
                "type": w.workflow_type,
                "ms": round(ms, 1),
                "largest_gap_ms": round(gap, 1),
                "gap": where.replace("EVENT_TYPE_", ""),
                "problem_events": [
                    EventType.Name(e.event_type)
                    for e in events
                    if EventType.Name(e.event_type).endswith(("_FAILED", "_TIMED_OUT"))
                ],
            }
        )
    return out


# -- worker metrics endpoints -------------------------------------------------------------------
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
S2S = "temporal_activity_schedule_to_start_latency"


def scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    import urllib.request  # here: it imports http, which must be the standard library's

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    rows = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and not line.startswith("#"):
            rows.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")), float(m.group(3))))
    return rows


def histogram_by_queue(rows: list[tuple[str, dict[str, str], float]]) -> dict[str, dict]:
    """task_queue -> {"buckets": {le: cumulative count}, "sum": ms, "count": n}."""
    out: dict[str, dict] = defaultdict(lambda: {"buckets": Counter(), "sum": 0.0, "count": 0.0})
    for name, labels, value in rows:
        if not name.startswith(S2S):
            continue
        h = out[labels.get("task_queue", "?")]
        if name.endswith("_bucket"):
            h["buckets"][float(labels["le"])] += value
        elif name.endswith("_sum"):
            h["sum"] += value
        elif name.endswith("_count"):
            h["count"] += value
    return out


def metrics_schedule_to_start(before: list, after: list) -> dict[str, Any]:
    """Per task queue over the window: count, mean, and p50/p99 as bucket upper bounds."""
    b, a = histogram_by_queue(before), histogram_by_queue(after)
    out: dict[str, Any] = {}
    for queue, h in sorted(a.items()):
        h0 = b.get(queue, {"buckets": Counter(), "sum": 0.0, "count": 0.0})
        n = h["count"] - h0["count"]
        if n <= 0:
            continue
        cum = sorted((le, h["buckets"][le] - h0["buckets"].get(le, 0)) for le in h["buckets"])

        def bound(q: float, cum: list = cum, n: float = n) -> float:
            return next((le for le, c in cum if c >= q * n), math.inf)

        out[queue] = {
            "n": int(n),
            "mean_ms": round((h["sum"] - h0["sum"]) / n, 1),
            "p50_ms_le": bound(0.5),
            "p99_ms_le": bound(0.99),
        }
    return out


# -- memory -------------------------------------------------------------------------------------
def rss_bytes(pid: int, children: bool = False) -> int:
    """VmRSS of one process (and its children, for servers that fork), 0 once gone."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)] if children else [proc]
        total = 0
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += p.memory_info().rss
        return total
    except psutil.NoSuchProcess:
        return 0


def cpu_seconds(pid: int) -> float:
    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.NoSuchProcess:
        return 0.0


async def sample_memory(
    pids: dict[str, tuple[int, bool]], samples: dict[str, list], stop: asyncio.Event, every: float
) -> None:
    while not stop.is_set():
        now = time.monotonic()
        for name, (pid, children) in pids.items():
            samples[name].append((now, rss_bytes(pid, children)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


def memory_figures(samples: list[tuple[float, int]], start: float, end: float) -> dict:
    window = [(t - start, rss / MB) for t, rss in samples if start <= t <= end and rss]
    if not window:
        return {}
    half = [(t, v) for t, v in window if t >= (end - start) / 2]
    return {
        "rss_mb_start": round(window[0][1], 1),
        "rss_mb_end": round(window[-1][1], 1),
        "rss_mb_max": round(max(v for _, v in window), 1),
        "growth_mb": round(window[-1][1] - window[0][1], 1),
        "slope_mb_per_min": round(slope_per_min(window), 2),
        "slope_2nd_half_mb_per_min": round(slope_per_min(half), 2),
        "samples": len(window),
    }


def log_errors(worker: WorkerProcess, limit: int = 5) -> dict[str, Any]:
    lines = [
        ln
        for ln in worker.log().splitlines()
        if " ERROR " in ln or "Traceback" in ln or " CRITICAL " in ln
    ]
    return {"count": len(lines), "first": [ln[:300] for ln in lines[:limit]]}


# -- the run ------------------------------------------------------------------------------------
async def run(
    args: argparse.Namespace, tmp: Path, stack: Stack, workers: dict[str, WorkerProcess]
) -> dict[str, Any]:
    import logging

    from workers.temporal_client import connect

    client = await connect()
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)  # see bench/ask.py run()
    t = time.perf_counter()
    index = await index_corpus(client, tmp, args.images_per_class, args.vectors)
    logging.getLogger("pymilvus").setLevel(logging.WARNING)
    print(
        f"seeded tenant {TENANT!r}: {index['vectors_total']} vectors (dim {index['dim']}) in "
        f"{time.perf_counter() - t:.1f} s",
        flush=True,
    )
    status = stack.status()
    pids: dict[str, tuple[int, bool]] = {
        f"worker {r}": (w.proc.pid, False) for r, w in workers.items()
    }
    for name, info in status.items():
        if isinstance(info.get("pid"), int):
            pids[f"server {name}"] = (int(info["pid"]), True)
    samples: dict[str, list] = defaultdict(list)
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_memory(pids, samples, stop, args.sample_s))

    begin = time.monotonic()
    load = Load(
        measure_start=begin + args.warmup,
        measure_end=begin + args.warmup + args.duration,
        max_workflows=args.max_workflows,
        timeout_s=args.workflow_timeout,
    )
    questions = Questions()
    ingest_root = tmp / "ingest"
    loops = [
        asyncio.create_task(ask_loop(client, load, questions, i))
        for i in range(args.ask_concurrency)
    ] + [
        asyncio.create_task(
            ingest_loop(client, load, ingest_root, i, args.assets_per_batch, args.image_px)
        )
        for i in range(args.ingest_concurrency)
    ]
    print(
        f"load: {args.ask_concurrency} ask loop(s), {args.ingest_concurrency} ingest loop(s); "
        f"warm-up {args.warmup:.0f} s, then {args.duration:.0f} s measured",
        flush=True,
    )
    await asyncio.sleep(max(0.0, load.measure_start - time.monotonic()))
    start_wall = time.time() - (time.monotonic() - load.measure_start)  # the same instant
    ports: dict[str, int] = args.metrics_ports
    scrape_before = [row for p in ports.values() for row in scrape(p)]
    cpu_before = {r: cpu_seconds(w.proc.pid) for r, w in workers.items()}
    load_avg = {"start": round(os.getloadavg()[0], 2)}
    while time.monotonic() < load.measure_end:
        await asyncio.sleep(min(30.0, max(0.0, load.measure_end - time.monotonic())))
        done = load.measured()
        errors = sum(not o.ok for o in done)
        rss = ", ".join(
            f"{r} {samples[f'worker {r}'][-1][1] / MB:.0f} MB"
            for r in workers
            if samples[f"worker {r}"]
        )
        print(
            f"  t+{time.monotonic() - load.measure_start:5.0f} s: {len(done)} finished, "
            f"{errors} errors, {load.in_flight} in flight; RSS {rss}",
            flush=True,
        )
    end_wall = time.time() - (time.monotonic() - load.measure_end)
    scrape_after = [row for p in ports.values() for row in scrape(p)]
    cpu_after = {r: cpu_seconds(w.proc.pid) for r, w in workers.items()}
    load_avg["end"] = round(os.getloadavg()[0], 2)
    stop.set()
    await sampler
    # Drain: every run is bounded by --workflow-timeout; the loops start nothing new.
    drained = time.monotonic()
    await asyncio.wait(loops, timeout=args.workflow_timeout + 30)
    for task in loops:
        task.cancel()
    await asyncio.gather(*loops, return_exceptions=True)
    drain_s = time.monotonic() - drained

    duration = load.measure_end - load.measure_start
    figures: dict[str, Any] = {
        "duration_s": round(duration, 1),
        "warmup_s": args.warmup,
        "ask_concurrency": args.ask_concurrency,
        "ingest_concurrency": args.ingest_concurrency,
        "assets_per_batch": args.assets_per_batch,
        "model": "mmrag-tiny",
        "temporal": "dev server, SQLite file (as mmrag stack up)",
        "index": index,
        "workflows": workflow_figures(load, duration),
        "drain_s": round(drain_s, 1),
        "warmup_runs": sum(o.started < load.measure_start for o in load.ops),
    }
    figures["error_rate_pct"] = figures["workflows"]["all"]["error_rate_pct"]
    figures["errors"] = figures["workflows"]["all"]["errors"]
    figures["alert_line_pct"] = ALERT_LINE_PCT
    figures["errors_zero"] = figures["errors"] == 0
    figures["error_reasons"] = dict(
        Counter(re.sub(r"[0-9a-f]{16,}", "…", o.error) for o in load.measured() if not o.ok)
    )

    # Visibility is eventually consistent: a run closed a moment ago may still be listed as
    # running, so list again (bounded) until none of the window's runs is.
    for _ in range(10):
        runs = await listed_runs(client, start_wall - 1, end_wall + 1)
        in_window = [w for w in runs if start_wall <= w.start_time.timestamp() < end_wall]
        if all(w.close_time for w in in_window):
            break
        await asyncio.sleep(1)
    figures["server_view"] = {
        "runs_started_in_window": len(in_window),  # server StartTime: +-a few at the edges
        "by_type_and_status": dict(
            sorted(Counter(f"{w.workflow_type} {w.status.name}" for w in in_window).items())
        ),
    }
    figures["schedule_to_start_histories"] = await history_schedule_to_start(
        client, in_window, args.history_sample
    )
    figures["slowest_runs"] = await slowest_runs(client, in_window, 5, args.slow_ms)
    figures["schedule_to_start_metrics"] = metrics_schedule_to_start(scrape_before, scrape_after)

    start, end = load.measure_start, load.measure_end
    memory = {name: memory_figures(s, start, end) for name, s in samples.items()}
    worker_memory = {r: memory[f"worker {r}"] for r in workers}
    for r, w in workers.items():
        worker_memory[r]["pid"] = w.proc.pid
        worker_memory[r]["cpu_cores_used"] = round((cpu_after[r] - cpu_before[r]) / duration, 2)
    figures["worker_memory"] = worker_memory
    figures["server_memory"] = {
        name.split(" ", 1)[1]: memory[name] for name in memory if name.startswith("server ")
    }
    figures["memory_flat_threshold_mb_per_min"] = args.flat_mb_per_min
    figures["memory_flat"] = all(
        m.get("slope_mb_per_min", 0) < args.flat_mb_per_min for m in worker_memory.values()
    )
    figures["workers_alive_at_end"] = {r: w.alive() for r, w in workers.items()}
    figures["worker_log_errors"] = {r: log_errors(w) for r, w in workers.items()}
    figures["load_avg_1m"] = load_avg
    return figures


def print_report(f: dict[str, Any]) -> None:
    print(
        f"\nmeasured {f['duration_s']} s after {f['warmup_s']} s warm-up; "
        f"{f['ask_concurrency']} ask + {f['ingest_concurrency']} ingest loops; "
        f"drain {f['drain_s']} s"
    )
    print(f"  {'workflow':<14} {'runs':>6} {'errors':>6} {'per s':>7} {'p50 ms':>8} {'p99 ms':>8}")
    for name, w in f["workflows"].items():
        if name == "all":
            continue
        extra = f"   {w['images_per_s']} images/s" if "images_per_s" in w else ""
        print(
            f"  {name:<14} {w['runs']:>6} {w['errors']:>6} {w['throughput_per_s']:>7.2f} "
            f"{w['p50_ms']:>8.1f} {w['p99_ms']:>8.1f}{extra}"
        )
    a = f["workflows"]["all"]
    print(
        f"  errors: {a['errors']} of {a['runs']} ({a['error_rate_pct']} %; alert line "
        f"{f['alert_line_pct']} %) {f['error_reasons'] or ''}"
    )
    print(f"  server view of the window: {f['server_view']['by_type_and_status']}")
    h = f["schedule_to_start_histories"]
    print(f"  schedule-to-start (histories, {h['histories']} runs sampled, first attempts):")
    for key, s in h["per_step"].items():
        print(f"    {key:<44} n {s['n']:>5}  p50 {s['p50_ms']:7.1f}  p99 {s['p99_ms']:7.1f} ms")
    if h["activity_retries"]:
        print(f"    activity retries: {h['activity_retries']}")
    if h["problem_events"]:
        print(f"    failed / timed-out events in those histories: {h['problem_events']}")
    for r in f["slowest_runs"]:
        print(
            f"  slow run {r['type']} {r['ms']:.0f} ms ({r['id']}): largest gap "
            f"{r['largest_gap_ms']:.0f} ms {r['gap']} {r['problem_events'] or ''}"
        )
    print("  schedule-to-start (worker SDK metrics, whole window; p50/p99 are bucket bounds):")
    for queue, s in f["schedule_to_start_metrics"].items():
        print(
            f"    {queue:<24} n {s['n']:>5}  mean {s['mean_ms']:7.1f}  p50 <= {s['p50_ms_le']}  "
            f"p99 <= {s['p99_ms_le']} ms"
        )
    print(
        f"  worker RSS (start -> end MB, least-squares slope MB/min; flat if < "
        f"{f['memory_flat_threshold_mb_per_min']}):"
    )
    for role, m in {**f["worker_memory"], **f["server_memory"]}.items():
        if m:
            cores = f"  cpu {m['cpu_cores_used']} cores" if "cpu_cores_used" in m else ""
            print(
                f"    {role:<10} {m['rss_mb_start']:7.1f} -> {m['rss_mb_end']:7.1f} "
                f"(max {m['rss_mb_max']:.1f})  slope {m['slope_mb_per_min']:+.2f} "
                f"(2nd half {m['slope_2nd_half_mb_per_min']:+.2f}){cores}"
            )
    print(f"  memory flat: {f['memory_flat']}; errors zero: {f['errors_zero']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=180, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=20, help="seconds not measured")
    parser.add_argument("--ask-concurrency", type=int, default=4)
    parser.add_argument("--ingest-concurrency", type=int, default=2)
    parser.add_argument("--assets-per-batch", type=int, default=3, help="IngestAsset per batch")
    parser.add_argument("--image-px", type=int, default=256)
    parser.add_argument("--vectors", type=int, default=20000, help="bulk random vectors")
    parser.add_argument("--images-per-class", type=int, default=12, help="x18 seed images")
    parser.add_argument("--max-workflows", type=int, default=100_000)
    parser.add_argument("--workflow-timeout", type=float, default=120)
    parser.add_argument("--history-sample", type=int, default=100, help="histories per type")
    parser.add_argument("--sample-s", type=float, default=2.0, help="RSS sampling period")
    parser.add_argument("--flat-mb-per-min", type=float, default=1.0)
    parser.add_argument("--slow-ms", type=float, default=5000, help="list slower runs")
    args = parser.parse_args()
    if not (0 < args.duration <= 4 * 3600 and 0 <= args.warmup <= 600):
        parser.error("--duration must be in (0, 14400] and --warmup in [0, 600]")
    if not (0 <= args.ask_concurrency <= 64 and 0 <= args.ingest_concurrency <= 64):
        parser.error("concurrencies must be in [0, 64]")
    if args.ask_concurrency + args.ingest_concurrency == 0:
        parser.error("nothing to run")

    from tests.conftest import free_port
    from tests.llm_server import LlmTestServer

    # SIGTERM unwinds like Ctrl-C, so the finally below stops everything.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="mmrag-bench-load-"))
    state = tmp / "state"
    stack = Stack(state, StackPorts.free())
    llm = LlmTestServer(mode="ok")
    workers: dict[str, WorkerProcess] = {}
    t0 = time.perf_counter()
    try:
        endpoints = stack.up()
        llm.start()
        env = bench_env(state, endpoints, llm.base_url, torch_threads=1, grace_s=5)
        os.environ.update(env)
        get_settings.cache_clear()
        print(f"stack up in {time.perf_counter() - t0:.1f} s ({state})", flush=True)
        args.metrics_ports = {}
        for role in ROLES:
            port = free_port()
            workers[role] = WorkerProcess.start(
                state,
                role,
                {**env, "MMRAG_METRICS_PORT": str(port), "MMRAG_METRICS_HOST": "127.0.0.1"},
            )
            args.metrics_ports[role] = port
        print(f"workers ready ({', '.join(ROLES)}) at {time.perf_counter() - t0:.1f} s", flush=True)
        figures = asyncio.run(run(args, tmp, stack, workers))
    finally:
        for w in workers.values():
            w.stop(timeout=15)
        llm.stop()
        stack.down()
        shutil.rmtree(tmp, ignore_errors=True)
    figures["total_s"] = round(time.perf_counter() - t0, 1)
    print_report(figures)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
