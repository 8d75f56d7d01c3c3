"""One IngestBatch over a big folder: continue-as-new, progress, worker memory, re-run speed.

Writes N tiny distinct PNGs (8x8, 1,000 per folder) into a temporary storage root, starts
its own embedded stack and one ``--role all`` worker (the tiny CLIP model: the point is
orchestration, not the encoder), and runs the product's ``IngestBatch`` twice:

1. the first ingest (every object encoded), then
2. the same ingest again with nothing changed (every object ``unchanged``: listing plus
   registry look-ups per page, no encode or record activity).

During each run it polls the workflow's ``progress`` query (the figure ``mmrag ingest
--wait`` shows) and checks it never goes back and ends at N; it samples the worker's RSS
(process and children) to show memory stays flat across the continue-as-new runs; after
each run it lists the runs of the workflow id and reports each run's history length and
size against Temporal's limits (51,200 events / 50 MB per run; warnings from 10,240 events
/ 10 MB). The bare baseline is the same ``scan_page`` code in process, no Temporal.

    .venv/bin/python bench/big_ingest.py [--objects 100000] [--page-size 0] [--encoded 0]

``--encoded K`` (< N): the first ingest encodes K objects; the other N - K are written after
it and given registry rows without encoding them (``seed`` in the output, no vectors), so
the unchanged re-run still covers N objects when a first ingest of N would not fit the time
at hand. The last line of output is one line of JSON with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import stack_env  # noqa: E402
from bench.ingest import MODELS  # noqa: E402
from settings import get_settings  # noqa: E402
from stack.services import Stack, StackPorts  # noqa: E402
from starters.background import WorkerProcess  # noqa: E402

TENANT = "big"
PER_FOLDER = 1000
# Temporal's per-run limits (server defaults): a run fails past the error limits.
HISTORY_EVENTS_LIMIT = 51_200
HISTORY_BYTES_LIMIT = 50 * 1024 * 1024


def write_objects(root: Path, first: int, stop: int) -> float:
    """Objects ``first`` to ``stop`` - 1: distinct 8x8 PNGs, 1,000 per folder; seconds taken."""
    from PIL import Image

    start = time.perf_counter()
    for i in range(first, stop):
        folder = root / f"d{i // PER_FOLDER:04d}"
        if i % PER_FOLDER == 0 or i == first:
            folder.mkdir(parents=True, exist_ok=True)
        pixels = bytes((i >> s) & 0xFF for s in (0, 8, 16)) * 64  # distinct per object
        buf = io.BytesIO()
        Image.frombytes("RGB", (8, 8), pixels).save(buf, format="PNG", compress_level=1)
        (folder / f"i{i:06d}.png").write_bytes(buf.getvalue())
    return time.perf_counter() - start


class RssSampler:
    """RSS of a process and its children, sampled every ``every`` seconds in a thread."""

    def __init__(self, pid: int, every: float = 1.0) -> None:
        import psutil

        self.proc = psutil.Process(pid)
        self.every = every
        self.samples: list[tuple[float, float]] = []  # (seconds since start, MiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.monotonic()

    def _rss(self) -> float:
        import psutil

        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += p.memory_info().rss
        return total / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - self._t0, self._rss()))
            self._stop.wait(self.every)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.monotonic() - self._t0, self._rss()))

    def summary(self) -> dict[str, float]:
        mib = [m for _, m in self.samples]
        return {
            "first_mib": round(mib[0], 1),
            "peak_mib": round(max(mib), 1),
            "last_mib": round(mib[-1], 1),
            "samples": len(mib),
        }


@dataclass
class Progress:
    """What the ``progress`` query said during a run."""

    seen: list[int] = field(default_factory=list)
    query_errors: int = 0

    @property
    def monotone(self) -> bool:
        return all(a <= b for a, b in zip(self.seen, self.seen[1:], strict=False))


async def poll_progress(client: Any, workflow_id: str, out: Progress, done: asyncio.Event) -> None:
    """Query ``progress`` on the workflow id's current run (it follows continue-as-new)."""
    from datetime import timedelta

    from workflows.contracts import IngestProgress

    handle = client.get_workflow_handle(workflow_id)
    while not done.is_set():
        try:
            p = await handle.query(
                "progress", result_type=IngestProgress, rpc_timeout=timedelta(seconds=5)
            )
            out.seen.append(p.seen)
        except Exception:  # between two runs, or a slow worker: counted, not fatal
            out.query_errors += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 0.5)


async def runs_of(client: Any, workflow_id: str, since_run: str) -> list[dict[str, Any]]:
    """Each run of the chain that started with ``since_run``: events and bytes, in order."""
    runs = []
    run_id: str | None = since_run
    while run_id:
        desc = await client.get_workflow_handle(workflow_id, run_id=run_id).describe()
        info = desc.raw_description.workflow_execution_info
        runs.append(
            {
                "run_id": run_id,
                "events": info.history_length,
                "bytes": info.history_size_bytes,
                "status": desc.status.name if desc.status else "",
            }
        )
        run_id = None
        history = await client.get_workflow_handle(
            workflow_id, run_id=runs[-1]["run_id"]
        ).fetch_history()
        last = history.events[-1]
        if last.HasField("workflow_execution_continued_as_new_event_attributes"):
            run_id = last.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
    return runs


async def one_ingest(corpus: Path, n: int, options: dict[str, int], expect: str) -> dict[str, Any]:
    """Run one IngestBatch to the end, watching progress; figures for the report."""
    from starters.ingest import start_ingest
    from workers.temporal_client import connect

    client = await connect()
    progress = Progress()
    done = asyncio.Event()
    start = time.perf_counter()
    handle = await start_ingest(client, TENANT, [str(corpus)], **options)  # type: ignore[arg-type]
    first_run = handle.result_run_id or ""
    poller = asyncio.create_task(poll_progress(client, handle.id, progress, done))
    result = await handle.result()
    elapsed = time.perf_counter() - start
    done.set()
    await poller
    final = await client.get_workflow_handle(handle.id).query("progress")
    runs = await runs_of(client, handle.id, first_run)
    got = getattr(result, expect)
    figures = {
        "seconds": round(elapsed, 2),
        "objects_per_s": round(n / elapsed, 1),
        "seen": result.seen,
        expect: got,
        "failed": result.failed,
        "runs": len(runs),
        "max_events_per_run": max(r["events"] for r in runs),
        "max_bytes_per_run": max(r["bytes"] for r in runs),
        "progress_samples": len(progress.seen),
        "progress_query_errors": progress.query_errors,
        "progress_monotone": progress.monotone,
        "progress_final_seen": final["seen"],
    }
    problems = []
    if result.seen != n or got != n:
        problems.append(f"result: seen {result.seen}, {expect} {got}, expected {n}")
    if not progress.monotone:
        problems.append("progress went back")
    if final["seen"] != n:
        problems.append(f"final progress seen {final['seen']} != {n}")
    if any(r["events"] >= HISTORY_EVENTS_LIMIT or r["bytes"] >= HISTORY_BYTES_LIMIT for r in runs):
        problems.append("a run reached Temporal's history limit")
    figures["problems"] = problems
    return figures


def seed_registry(corpus: Path, page_size: int) -> dict[str, float]:
    """Registry rows for the objects no ingest has seen yet, as the first ingest's
    record_outcomes would write them (status ingested, this index version), but without
    encoding them: they have no vectors. Only for the unchanged re-run at a size whose first
    ingest would not fit the time at hand; the report says how many were seeded."""
    from activities.ingest import IngestActivities
    from activities.store import registry
    from workflows.activities.ingest import ScanPageInput
    from workflows.contracts import INGESTED, AssetOutcome

    ingest = IngestActivities(get_settings())
    index = registry.active_index(ingest.engine)
    assert index is not None
    start = time.perf_counter()
    token, n = "", 0
    while True:
        page = ingest.scan_page(
            ScanPageInput(TENANT, corpus.as_uri(), token, page_size, index.version, False)
        )
        outcomes = [
            AssetOutcome(r.uri, r.asset_id, INGESTED, generation=r.generation, chunks=1)
            for r in page.to_encode
        ]
        registry.record_outcomes(
            ingest.engine, TENANT, index.version, page.to_encode, outcomes, {}, "bench-seed", "seed"
        )
        n += len(outcomes)
        token = page.next_token
        if not token:
            break
    return {"seeded_not_encoded": n, "seed_s": round(time.perf_counter() - start, 1)}


def bare_scan(corpus: Path, page_size: int) -> dict[str, float]:
    """Baseline: the same scan_page code in process over every page, no Temporal; and the
    registry look-ups alone (known_generations per page of ids)."""
    from activities.ingest import IngestActivities
    from activities.store import registry
    from workflows.activities.ingest import ScanPageInput

    ingest = IngestActivities(get_settings())
    index = registry.active_index(ingest.engine)
    assert index is not None
    start = time.perf_counter()
    token, n, ids = "", 0, []
    while True:
        page = ingest.scan_page(
            ScanPageInput(TENANT, corpus.as_uri(), token, page_size, index.version, False)
        )
        n += len(page.unchanged)
        ids.extend(o.asset_id for o in page.unchanged)
        token = page.next_token
        if not token:
            break
    scan_s = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(0, len(ids), page_size):
        registry.known_generations(ingest.engine, TENANT, ids[i : i + page_size])
    lookup_s = time.perf_counter() - start
    return {
        "unchanged": n,
        "scan_objects_per_s": round(n / scan_s, 1),
        "lookup_only_objects_per_s": round(len(ids) / lookup_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument("--page-size", type=int, default=0, help="0: the product default")
    parser.add_argument("--batch-size", type=int, default=0, help="0: the worker's setting")
    parser.add_argument(
        "--encoded",
        type=int,
        default=0,
        help="objects the first ingest encodes (0: all); the rest are written after it and "
        "get registry rows without vectors, so the unchanged re-run covers --objects",
    )
    args = parser.parse_args()
    os.environ.update(MODELS["mmrag-tiny"])
    get_settings.cache_clear()
    options = {
        k: v for k, v in (("page_size", args.page_size), ("batch_size", args.batch_size)) if v
    }
    page_size = args.page_size or 256
    encoded = min(args.encoded or args.objects, args.objects)
    figures: dict[str, Any] = {"objects": args.objects, "encoded": encoded, "page_size": page_size}
    with tempfile.TemporaryDirectory(prefix="mmrag-big-") as tmp:
        corpus = Path(tmp) / "corpus"
        figures["write_s"] = round(write_objects(corpus, 0, encoded), 1)
        print(f"wrote {encoded} PNGs in {figures['write_s']} s", flush=True)
        state = Path(tmp) / "state"
        stack = Stack(state, StackPorts.free())
        try:
            endpoints = stack.up()
            os.environ.update(stack_env(state, endpoints))
            get_settings.cache_clear()
            worker = WorkerProcess.start(state, "all", dict(os.environ))
            try:
                for name, expect in (("first", "ingested"), ("unchanged", "unchanged")):
                    if name == "unchanged" and encoded < args.objects:
                        write_objects(corpus, encoded, args.objects)
                        figures["seed"] = seed_registry(corpus, page_size)
                        print(f"seed: {json.dumps(figures['seed'])}", flush=True)
                    n = encoded if name == "first" else args.objects
                    with RssSampler(worker.proc.pid) as rss:
                        figures[name] = asyncio.run(one_ingest(corpus, n, options, expect))
                    figures[name]["worker_rss"] = rss.summary()
                    print(f"{name}: {json.dumps(figures[name])}", flush=True)
                figures["bare"] = bare_scan(corpus, page_size)
                print(f"bare: {json.dumps(figures['bare'])}", flush=True)
            finally:
                worker.stop()
        finally:
            stack.down()
    figures["goal_unchanged_objects_per_s"] = 2000
    figures["ok"] = not figures["first"]["problems"] and not figures["unchanged"]["problems"]
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
