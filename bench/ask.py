"""Ask latency: the durable ``Ask`` workflow against the same steps called in-process, same run.

Starts its own embedded stack (Temporal dev server in memory with the stack's flags, Milvus,
Postgres) on free ports in a temporary directory, ingests a few hundred synthetic images
through ``IngestBatch`` (which creates the index version) and bulk-inserts ``--vectors``
random unit vectors of the demo model's dimension for the same tenant, then measures
p50 / p99 / mean over ``--asks`` varied questions (never repeated, so the query-embedding and
prompt caches stay cold) of retrieval-only asks (``generate=False``) and full asks against the
zero-latency OpenAI-compatible test server (``tests/llm_server.py``, mode ``ok``):

- in-process: ``encode_query`` -> ``retrieve`` -> ``generate`` -> ``finalize_answer`` (the
  product's activity code, with the inputs ``workflows/ask.py`` builds) called directly, no
  Temporal (``finalize_answer`` reads ``activity.info()``, so it runs under
  ``temporalio.testing.ActivityEnvironment`` with a fresh run id per ask: the same code and
  the same audit insert, plus a context variable set around the call);
- ``Ask`` with the product's workers (``workers.run.build_workers``) in this process on the
  same Client, with and without ``request_eager_start``, on ``mmrag`` and on ``mmrag-query``
  (the query role: encoding in the workflow's worker);
- ``Ask`` with one worker process per role (``mmrag worker --role cpu|encode|generate|query``),
  on both queues;
- the same ``Ask`` code on bench-only task queues whose cpu-role worker (built by
  ``build_workers``, only the task queue and workflow runner overridden) passes the workflow
  payload modules through the sandbox, or runs unsandboxed; and ``AskFloor``, a bench-only
  workflow that runs the in-process pipeline (the product's activity code) as one local
  activity: the floor of a durable Ask. The bench holds no copy of ``Ask``: the in-process
  baseline builds every step's input with ``workflows/ask.py``'s own builders, and the
  placement with encoding local is the product's query queue. Notes and figures:
  ``bench/README-ask.md``.

All variants of one round run back to back, each round with fresh questions, so the noise of
this shared 2-core machine hits them alike. It then breaks the Temporal time down from the
workflow histories (server event timestamps) and tries worker tuning and dev-server settings
(Temporal restarted with other ``--dynamic-config-value`` / ``--sqlite-pragma`` flags).
Everything it starts is stopped, by pid; the temporary directory is removed.

    .venv/bin/python bench/ask.py [--asks 50] [--warmup 10] [--vectors 20000] [--quick]

The last line of output is one line of JSON with the figures (``headline`` and ``goals``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

# The repository root, and not bench/ itself: a bench module must not shadow the standard
# library for this script (bench/http.py would be imported as ``http``).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from temporalio import activity, workflow  # noqa: E402

import workflows.ask as ask_steps  # noqa: E402
from bench.harness import (  # noqa: E402
    TENANT,
    Questions,
    bench_env,
    index_corpus,
    stage_medians,
    summary,
)
from settings import WORKER_ROLES, get_settings  # noqa: E402
from stack.servers import LATENCY_DYNAMIC_CONFIG, Temporal  # noqa: E402
from stack.services import Stack, StackPorts  # noqa: E402
from workflows.ask import QUICK_RETRY  # noqa: E402
from workflows.contracts import (  # noqa: E402
    ASK_WORKFLOW,
    QUERY_TASK_QUEUE,
    TASK_QUEUE,
    AskInput,
    AskResult,
)

BASE_RPS_FLAG = LATENCY_DYNAMIC_CONFIG[0]  # what stack/servers.py sets


# -- the embedded stack, with extra dev-server flags (bench-only) ---------------------------
class _TemporalWithFlags(Temporal):
    """The stack's Temporal server with extra ``--dynamic-config-value`` pairs (a pair whose
    key the stack already sets replaces it) and extra raw flags (``--sqlite-pragma``)."""

    def __init__(self, ctx: Any, dynamic: list[str], raw: list[str]) -> None:
        super().__init__(ctx)
        self.dynamic, self.raw = dynamic, raw

    def command(self) -> list[str]:
        cmd = super().command()
        keys = {kv.split("=", 1)[0] for kv in self.dynamic}
        out: list[str] = []
        i = 0
        while i < len(cmd):
            if cmd[i] == "--dynamic-config-value" and cmd[i + 1].split("=", 1)[0] in keys:
                i += 2
                continue
            out.append(cmd[i])
            i += 1
        for kv in self.dynamic:
            out += ["--dynamic-config-value", kv]
        return out + self.raw


class BenchStack(Stack):
    """``Stack`` whose Temporal server can be restarted with other flags between phases."""

    dynamic: list[str] = []
    raw: list[str] = []

    def server(self, name: str, ports: StackPorts | None = None) -> Any:
        srv = super().server(name, ports)
        if name == "temporal":
            return _TemporalWithFlags(srv.ctx, list(self.dynamic), list(self.raw))
        return srv

    def restart_temporal(self, dynamic: list[str], raw: list[str], db_file: bool) -> None:
        """Restart Temporal with these flags; a SQLite file always starts empty (a journal
        mode set by an earlier run would otherwise stick to the file)."""
        self.stop_service("temporal")
        self.dynamic, self.raw, self.temporal_db_file = dynamic, raw, db_file
        db = self.server("temporal").db_file
        for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            path.unlink(missing_ok=True)
        self.start_service("temporal")


# -- the in-process baseline ------------------------------------------------------------------
class InProcess:
    """The Ask workflow's steps, called directly in this process: no Temporal anywhere. The
    same activity code the workers run, given the inputs ``workflows/ask.py`` builds (its
    ``encode_query_input`` / ``retrieve_input`` / ``generate_input`` / ``finalize_input``), so
    the baseline follows every change to the product's pipeline."""

    def __init__(self) -> None:
        from temporalio.testing import ActivityEnvironment

        from activities.ask import AskActivities
        from activities.encode_query import QueryEncodeActivities
        from activities.generate import GenerateActivities

        settings = get_settings()
        self.encode = QueryEncodeActivities(settings)
        self.ask = AskActivities(settings)
        self.generate = GenerateActivities()
        self.env = ActivityEnvironment()

    def run(self, inp: AskInput) -> tuple[float, dict[str, float], AskResult]:
        t0 = time.perf_counter()
        query = self.encode.encode_query(ask_steps.encode_query_input(inp))
        t1 = time.perf_counter()
        retrieval = self.ask.retrieve(ask_steps.retrieve_input(inp, query))
        t2 = time.perf_counter()
        stages = {"encode": (t1 - t0) * 1000, "retrieve": (t2 - t1) * 1000}
        answer, kind, llm = retrieval.extractive_answer, "extractive", ""
        context = retrieval.context
        if not retrieval.sources:
            kind = "none"
        elif inp.generate:
            gen = self.generate.generate(ask_steps.generate_input(inp, retrieval))
            if gen.kind == "generated":
                answer, kind, llm = gen.text, gen.kind, gen.model
                context = gen.context or retrieval.context
        t3 = time.perf_counter()
        if inp.generate:
            stages["generate"] = (t3 - t2) * 1000
        run_id = str(uuid.uuid4())
        self.env.info = dataclasses.replace(
            self.env.info, workflow_id=f"bench-inprocess/{run_id}", workflow_run_id=run_id
        )
        final = self.env.run(
            self.ask.finalize_answer,
            ask_steps.finalize_input(inp, retrieval, answer, kind, context, "", (t3 - t0) * 1000),
        )
        t4 = time.perf_counter()
        stages["finalize"] = (t4 - t3) * 1000
        result = AskResult(
            answer=final.answer,
            sources=retrieval.sources,
            latency_ms=round((t4 - t0) * 1000, 1),
            stage_ms=stages,
            answer_kind=final.answer_kind,
            index_version=retrieval.index_version,
            encoder_model=query.model,
            llm_model=llm,
        )
        return (t4 - t0) * 1000, stages, result


# -- the floor of a durable Ask (bench-only; runs the product's activity code) -----------------
FLOOR_WORKFLOW = "BenchAskFloor"
ONE_LA = "bench_ask_in_one_local_activity"


class OneLocalActivity:
    """The whole in-process pipeline (``InProcess.run``) as one activity."""

    def __init__(self) -> None:
        self.inproc = InProcess()

    @activity.defn(name=ONE_LA)
    def run(self, inp: AskInput) -> AskResult:
        return self.inproc.run(inp)[2]


@workflow.defn(name=FLOOR_WORKFLOW)
class AskFloor:
    """One local activity and nothing else: what a durable Ask costs at the least (one
    workflow task, one marker), to compare the product's ``Ask`` with. Not a copy of Ask:
    it orders no steps of its own."""

    @workflow.run
    async def run(self, inp: AskInput) -> AskResult:
        return await workflow.execute_local_activity(
            ONE_LA,
            inp,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=QUICK_RETRY,
            result_type=AskResult,
        )


# -- workers ---------------------------------------------------------------------------------
# Bench-only task queues: a copy of the ``mmrag`` (cpu) role polls each with another workflow
# runner, sharing the encode and generate workers, so all configurations are measured in the
# same rounds. ``Ask`` started there is the same workflow code with the same activities.
PT_DATA_QUEUE = "mmrag-bench-ptdata"
PT_QUEUE = "mmrag-bench-pt"  # also the prefix of the worker-tuning queues
UNSANDBOXED_QUEUE = "mmrag-bench-unsandboxed"
FLOOR_QUEUE = "mmrag-bench-pt-floor"  # passthrough runner + AskFloor
DATA_MODULES = ("workflows.contracts", "workflows.activities")
RUNNERS = {
    PT_DATA_QUEUE: DATA_MODULES,
    # + workflows.ingest: what workflows/ask.py imports only for three search-attribute keys.
    PT_QUEUE: (*DATA_MODULES, "workflows.ingest"),
}


def runner_for(queue: str, extra: list[str] | None = None) -> Any:
    """The workflow runner of a bench queue; ``extra`` modules are passed through as well
    (the bench's own module, for ``AskFloor``)."""
    from temporalio.worker import UnsandboxedWorkflowRunner
    from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

    if queue == UNSANDBOXED_QUEUE:
        return UnsandboxedWorkflowRunner()
    modules = RUNNERS.get(queue) or (RUNNERS[PT_QUEUE] if queue.startswith(PT_QUEUE) else None)
    if modules:
        restrictions = SandboxRestrictions.default.with_passthrough_modules(
            *modules, *(extra or [])
        )
        return SandboxedWorkflowRunner(restrictions=restrictions)
    return None


def product_workers(
    client: Any,
    role: str,
    tuning: dict[str, Any] | None = None,
    queue: str = "",
) -> list[Any]:
    """``workers.run.build_workers(role)``, exactly as the product builds its workers, with
    only what the bench varies overridden: Worker keyword arguments (``tuning``), and for a
    bench queue the task queue, the workflow runner and, on the floor's queue, the bench-only
    ``AskFloor`` and its one local activity."""
    import workers.run as run_module

    settings = get_settings()
    extra_activities: list[Any] = []
    extra_workflows: list[Any] = []
    if queue == FLOOR_QUEUE:
        # This file under an importable name, so its sandbox can pass it through by name.
        me = importlib.import_module("bench.ask")
        extra_workflows = [me.AskFloor]
        extra_activities = [me.OneLocalActivity().run]
    product_worker = run_module.Worker

    def worker(client: Any, **kwargs: Any) -> Any:
        kwargs.update(tuning or {})
        if queue:
            kwargs["task_queue"] = queue
            runner = runner_for(queue, extra=["bench"] if extra_workflows else [])
            if runner is not None:
                kwargs["workflow_runner"] = runner
            if extra_activities:
                kwargs["workflows"] = [*kwargs["workflows"], *extra_workflows]
                kwargs["activities"] = [*kwargs["activities"], *extra_activities]
        return product_worker(client, **kwargs)

    run_module.Worker = worker  # type: ignore[assignment,misc]
    try:
        return run_module.build_workers(role, client, settings)
    finally:
        run_module.Worker = product_worker  # type: ignore[misc]


class InProcessWorkers:
    """Workers on this process's event loop and Client (so eager start works): the product's
    ``build_workers("all")`` plus the cpu role on each bench-only queue (``queues``: a list,
    or queue -> Worker keyword arguments for that queue's worker)."""

    def __init__(self, client: Any, queues: list[str] | dict[str, dict[str, Any]]) -> None:
        per_queue = queues if isinstance(queues, dict) else {q: {} for q in queues}
        self.workers = product_workers(client, "all")
        for queue, tuning in per_queue.items():
            self.workers += product_workers(client, "cpu", tuning, queue)
        self.tasks = [asyncio.create_task(w.run()) for w in self.workers]

    async def stop(self) -> None:
        await asyncio.gather(*(w.shutdown() for w in self.workers), return_exceptions=True)
        await asyncio.gather(*self.tasks, return_exceptions=True)


ROLES_DEPLOYED = WORKER_ROLES
READY = "mmrag worker ready"


@dataclass
class BenchWorkerProcess:
    """``bench/ask.py --serve-queue Q``: the cpu role on a bench queue, in its own process."""

    proc: Any
    log_path: Path

    @classmethod
    def start(cls, queue: str, env: dict[str, str], log_dir: Path) -> BenchWorkerProcess:
        import subprocess

        log_path = log_dir / f"bench-worker-{queue}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--serve-queue", queue],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + 120
        while READY not in log_path.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(
                    f"bench worker for {queue} did not start:\n{log_path.read_text()}"
                )
            time.sleep(0.1)
        return cls(proc, log_path)

    def stop(self, timeout: float = 15) -> None:
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(timeout=30)


async def serve_queue(queue: str) -> None:
    """The body of a bench worker process: like ``mmrag worker --role cpu`` on ``queue``."""
    import signal

    from workers.temporal_client import connect

    client = await connect()
    workers = product_workers(client, "cpu", None, queue)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(w.run()) for w in workers]
    print(f"{READY}: bench queue {queue}", flush=True)
    await stop.wait()
    await asyncio.gather(*(w.shutdown() for w in workers), return_exceptions=True)
    await asyncio.gather(*tasks, return_exceptions=True)


def start_worker_processes(state: Path, env: dict[str, str], bench_queues: list[str]) -> list:
    """One process per role, as deployed (``mmrag worker --role cpu|encode|generate|query``), plus
    one bench process per bench queue; started in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    from starters.background import WorkerProcess

    log_dir = state / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(len(ROLES_DEPLOYED) + len(bench_queues)) as pool:
        futures = [pool.submit(WorkerProcess.start, state, role, env) for role in ROLES_DEPLOYED]
        futures += [pool.submit(BenchWorkerProcess.start, q, env, log_dir) for q in bench_queues]
        started, errors = [], []
        for f in futures:
            try:
                started.append(f.result())
            except Exception as e:  # noqa: BLE001 - stop the others, then report
                errors.append(e)
    if errors:
        for w in started:
            w.stop(timeout=10)
        raise errors[0]
    return started


# -- asks through Temporal ----------------------------------------------------------------------
async def temporal_ask(
    client: Any, inp: AskInput, eager: bool, queue: str
) -> tuple[float, AskResult, str]:
    wid = f"bench-ask/{uuid.uuid4().hex}"
    started = time.perf_counter()
    handle = await client.start_workflow(
        FLOOR_WORKFLOW if queue == FLOOR_QUEUE else ASK_WORKFLOW,
        inp,
        id=wid,
        task_queue=queue,
        result_type=AskResult,
        static_summary=f"ask for tenant {inp.tenant}",
        request_eager_start=eager,
    )
    result = await handle.result()
    return (time.perf_counter() - started) * 1000, result, wid


def _check(result: AskResult, generate: bool) -> None:
    want = "generated" if generate else "extractive"
    if result.answer_kind != want or not result.sources:
        raise RuntimeError(
            f"unexpected ask result: kind {result.answer_kind}, {len(result.sources)} sources, "
            f"degraded={result.degraded} ({result.degraded_reason})"
        )


@dataclass
class Series:
    """One measured variant: wall-clock ms per ask, stage ms per ask, workflow ids."""

    wall: list[float] = dataclasses.field(default_factory=list)
    stages: list[dict[str, float]] = dataclasses.field(default_factory=list)
    server: list[float] = dataclasses.field(default_factory=list)  # AskResult.latency_ms
    ids: list[str] = dataclasses.field(default_factory=list)

    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = summary(self.wall)
        out["stage_ms_p50"] = stage_medians(self.stages)
        if self.server:
            out["workflow_latency_ms_p50"] = round(statistics.median(self.server), 1)
        return out


Variant = Callable[[str, Series], Awaitable[None]]


async def interleaved(
    variants: dict[str, Variant], rounds: int, warmup: int, questions: Questions
) -> dict[str, Series]:
    """Run every variant once per round, back to back, each with its own fresh question."""
    series = {name: Series() for name in variants}
    for r in range(warmup + rounds):
        for name, run in variants.items():
            await run(questions.next(), series[name] if r >= warmup else Series())
    return series


def inprocess_runner(inproc: InProcess, generate: bool) -> Variant:
    async def run(question: str, s: Series) -> None:
        ms, stages, result = inproc.run(AskInput(tenant=TENANT, text=question, generate=generate))
        _check(result, generate)
        s.wall.append(ms)
        s.stages.append(stages)

    return run


def temporal_runner(client: Any, generate: bool, eager: bool, queue: str = TASK_QUEUE) -> Variant:
    """The product's ``Ask`` on ``queue`` (``FLOOR_QUEUE``: the bench's ``AskFloor``)."""

    async def run(question: str, s: Series) -> None:
        inp = AskInput(tenant=TENANT, text=question, generate=generate)
        ms, result, wid = await temporal_ask(client, inp, eager, queue)
        _check(result, generate)
        s.wall.append(ms)
        s.stages.append(result.stage_ms)
        s.server.append(result.latency_ms)
        s.ids.append(wid)

    return run


# -- where the time goes: workflow histories --------------------------------------------------
def _event_label(ev: Any, names: dict[int, str]) -> str:
    from temporalio.api.enums.v1 import EventType

    kind = EventType.Name(ev.event_type).removeprefix("EVENT_TYPE_").lower()
    kind = kind.replace("workflow_execution_", "wf_").replace("workflow_task_", "wft_")
    kind = kind.replace("activity_task_", "act_")
    if ev.HasField("activity_task_scheduled_event_attributes"):
        names[ev.event_id] = ev.activity_task_scheduled_event_attributes.activity_type.name
        return f"{kind}({names[ev.event_id]})"
    for attr in (
        "activity_task_started_event_attributes",
        "activity_task_completed_event_attributes",
    ):
        if ev.HasField(attr):
            return f"{kind}({names.get(getattr(ev, attr).scheduled_event_id, '?')})"
    return kind


async def breakdown(client: Any, series: Series, limit: int = 20) -> dict[str, Any]:
    """Median gap between consecutive history events (server timestamps), per position, over
    the last ``limit`` asks of one variant; plus client-side overhead (wall - server span)."""
    gaps: dict[int, tuple[str, list[float]]] = {}
    spans: list[float] = []
    walls = series.wall[-limit:]
    for wid in series.ids[-limit:]:
        history = await client.get_workflow_handle(wid).fetch_history()
        events = list(history.events)
        names: dict[int, str] = {}
        times = [e.event_time.ToNanoseconds() / 1e6 for e in events]
        labels = [_event_label(e, names) for e in events]
        spans.append(times[-1] - times[0])
        for i in range(1, len(events)):
            label = f"{labels[i - 1]} -> {labels[i]}"
            gaps.setdefault(i, (label, []))[1].append(times[i] - times[i - 1])
    steps = [
        {"step": label, "ms_p50": round(statistics.median(v), 2)}
        for _, (label, v) in sorted(gaps.items())
        if len(v) == len(spans)
    ]
    return {
        "server_span_ms_p50": round(statistics.median(spans), 1),
        "client_overhead_ms_p50": round(
            statistics.median([w - s for w, s in zip(walls, spans, strict=True)]), 1
        ),
        "steps": [s for s in steps if s["ms_p50"] >= 0.05],
    }


def print_breakdown(title: str, b: dict[str, Any]) -> None:
    print(
        f"  {title}: server span p50 {b['server_span_ms_p50']} ms, client start+result "
        f"overhead p50 {b['client_overhead_ms_p50']} ms; history gaps (p50):"
    )
    for s in b["steps"]:
        print(f"      {s['ms_p50']:7.2f} ms  {s['step']}")


# -- setup -------------------------------------------------------------------------------------
# -- phases ------------------------------------------------------------------------------------
def added(temporal: dict[str, Any], base: dict[str, Any]) -> dict[str, float]:
    return {
        "added_ms_p50": round(temporal["p50"] - base["p50"], 1),
        "added_ms_p99": round(temporal["p99"] - base["p99"], 1),
        "added_ms_mean": round(temporal["mean"] - base["mean"], 1),
        "ratio_p50": round(temporal["p50"] / base["p50"], 2),
    }


def line(name: str, f: dict[str, Any], base: dict[str, Any] | None = None) -> None:
    extra = ""
    if base is not None:
        a = added(f, base)
        extra = f" | added {a['added_ms_p50']:+5.1f} ms {a['ratio_p50']:4.2f}x"
    stages = " ".join(f"{k[:3]} {v}" for k, v in f.get("stage_ms_p50", {}).items())
    print(
        f"  {name:<50} p50 {f['p50']:5.1f} p99 {f['p99']:5.1f} mean {f['mean']:5.1f}"
        f"{extra}  [{stages}]",
        flush=True,
    )


def print_group(figs: dict[str, Any], kind: str) -> None:
    base = figs[f"{kind}/in-process"]
    for name, f in figs.items():
        if name.startswith(f"{kind}/"):
            line(name, f, None if name == f"{kind}/in-process" else base)


AS_IS = "Ask eager (as is)"
QUERY = "Ask eager, query queue (encode local)"
QUERY_SEP = "Ask, worker processes, query queue"
PT = "Ask eager, sandbox passthrough"
FLOOR = "floor eager, passthrough, all steps in 1 local act."


def main_variants(client: Any, inproc: InProcess, kind: str) -> dict[str, Variant]:
    g = kind == "full"
    variants = {
        f"{kind}/in-process": inprocess_runner(inproc, g),
        f"{kind}/{AS_IS}": temporal_runner(client, g, True),
        f"{kind}/{QUERY}": temporal_runner(client, g, True, QUERY_TASK_QUEUE),
        f"{kind}/Ask, start without eager (as is)": temporal_runner(client, g, False),
        f"{kind}/Ask eager, passthrough data modules": temporal_runner(
            client, g, True, PT_DATA_QUEUE
        ),
        f"{kind}/{PT}": temporal_runner(client, g, True, PT_QUEUE),
        f"{kind}/Ask eager, unsandboxed": temporal_runner(client, g, True, UNSANDBOXED_QUEUE),
        f"{kind}/{FLOOR}": temporal_runner(client, g, True, FLOOR_QUEUE),
    }
    return variants


ALL_BENCH_QUEUES = [PT_DATA_QUEUE, PT_QUEUE, UNSANDBOXED_QUEUE, FLOOR_QUEUE]


async def phase_main(
    client: Any, inproc: InProcess, asks: int, warmup: int, q: Questions
) -> tuple[dict[str, Any], dict[str, Series]]:
    workers = InProcessWorkers(client, ALL_BENCH_QUEUES)
    try:
        variants = {
            **main_variants(client, inproc, "retrieval"),
            **main_variants(client, inproc, "full"),
        }
        series = await interleaved(variants, asks, warmup, q)
    finally:
        await workers.stop()
    return {name: s.figures() for name, s in series.items()}, series


async def phase_repeated(client: Any, inproc: InProcess, asks: int) -> dict[str, Any]:
    """The same question again and again: encode (and the LLM prompt) come from caches."""
    workers = InProcessWorkers(client, [PT_QUEUE])
    try:
        variants: dict[str, Variant] = {}
        for kind in ("retrieval", "full"):
            g = kind == "full"
            variants[f"{kind}/in-process"] = inprocess_runner(inproc, g)
            variants[f"{kind}/{AS_IS}"] = temporal_runner(client, g, True)
            variants[f"{kind}/{PT}"] = temporal_runner(client, g, True, PT_QUEUE)
        series = {name: Series() for name in variants}
        question = "a red circle on a white background"
        for r in range(asks + 3):
            for name, run in variants.items():
                await run(question, series[name] if r >= 3 else Series())
    finally:
        await workers.stop()
    return {name: s.figures() for name, s in series.items()}


async def phase_tuning(client: Any, inproc: InProcess, asks: int, q: Questions) -> dict:
    """Workflow-worker settings, each on its own bench queue (passthrough runner), all polled
    at once and measured in the same rounds, eager, against in-process."""
    queues = {f"{PT_QUEUE}-tuning-{i}": t for i, t in enumerate(TUNINGS.values())}
    workers = InProcessWorkers(client, queues)
    try:
        variants: dict[str, Variant] = {}
        for kind in ("retrieval", "full"):
            g = kind == "full"
            variants[f"{kind}/in-process"] = inprocess_runner(inproc, g)
            for name, queue in zip(TUNINGS, queues, strict=True):
                variants[f"{kind}/{name}"] = temporal_runner(client, g, True, queue)
        series = await interleaved(variants, asks, 3, q)
    finally:
        await workers.stop()
    return {name: s.figures() for name, s in series.items()}


async def phase_server(client: Any, inproc: InProcess, asks: int, q: Questions) -> dict:
    """Passthrough Ask, eager, against in-process, on the Temporal server as now configured."""
    workers = InProcessWorkers(client, [PT_QUEUE])
    try:
        variants: dict[str, Variant] = {}
        for kind in ("retrieval", "full"):
            g = kind == "full"
            variants[f"{kind}/in-process"] = inprocess_runner(inproc, g)
            variants[f"{kind}/passthrough"] = temporal_runner(client, g, True, PT_QUEUE)
        series = await interleaved(variants, asks, 3, q)
    finally:
        await workers.stop()
    figs = {name: s.figures() for name, s in series.items()}
    out: dict[str, Any] = {}
    for kind in ("retrieval", "full"):
        f = figs[f"{kind}/passthrough"]
        out[kind] = {
            "p50": f["p50"],
            "p99": f["p99"],
            "added_ms_p50": added(f, figs[f"{kind}/in-process"])["added_ms_p50"],
        }
    return out


def print_short(name: str, r: dict[str, Any]) -> None:
    cells = "   ".join(
        f"{k} p50 {v['p50']:5.1f} (added {v['added_ms_p50']:+5.1f})" for k, v in r.items()
    )
    print(f"  {name:<48} {cells}", flush=True)


async def phase_separate(
    client: Any, inproc: InProcess, asks: int, warmup: int, q: Questions, state: Path, env: dict
) -> tuple[dict[str, Any], dict[str, Series], float]:
    t = time.perf_counter()
    procs = start_worker_processes(state, env, [PT_QUEUE])
    start_s = time.perf_counter() - t
    try:
        variants: dict[str, Variant] = {}
        for kind in ("retrieval", "full"):
            g = kind == "full"
            variants[f"{kind}/in-process"] = inprocess_runner(inproc, g)
            variants[f"{kind}/Ask, worker processes (as is)"] = temporal_runner(client, g, False)
            variants[f"{kind}/{QUERY_SEP}"] = temporal_runner(client, g, False, QUERY_TASK_QUEUE)
            variants[f"{kind}/Ask, worker processes, sandbox passthrough"] = temporal_runner(
                client, g, False, PT_QUEUE
            )
        series = await interleaved(variants, asks, warmup, q)
    finally:
        for w in procs:
            w.stop(timeout=15)
    return {name: s.figures() for name, s in series.items()}, series, start_s


# -- main --------------------------------------------------------------------------------------
SERVER_CONFIGS: dict[str, tuple[list[str], list[str], bool]] = {
    # name: (dynamic config pairs, raw flags, SQLite file?); most telling first, since the
    # time budget may cut the list short.
    "stack default (MaxPollRPS=1000, in memory)": ([], [], False),
    "transferProcessorMaxPollRPS=20 (server default)": (
        ["history.transferProcessorMaxPollRPS=20"],
        [],
        False,
    ),
    "SQLite file (as `mmrag stack up`)": ([], [], True),
    "SQLite file + journal_mode=WAL, synchronous=NORMAL": (
        [],
        ["--sqlite-pragma", "journal_mode=WAL", "--sqlite-pragma", "synchronous=NORMAL"],
        True,
    ),
    "transferProcessorMaxPollRPS=10000": (["history.transferProcessorMaxPollRPS=10000"], [], False),
    "+ system.enableActivityEagerExecution=true": (
        ["system.enableActivityEagerExecution=true"],
        [],
        False,
    ),
    "SQLite file + synchronous=OFF": ([], ["--sqlite-pragma", "synchronous=OFF"], True),
}
TUNINGS: dict[str, dict[str, Any]] = {
    "Worker defaults (build_workers)": {},
    "max_concurrent_workflow_task_polls=2": {"max_concurrent_workflow_task_polls": 2},
    "nonsticky_to_sticky_poll_ratio=1.0": {"nonsticky_to_sticky_poll_ratio": 1.0},
    "max_cached_workflows=0 (no sticky cache)": {"max_cached_workflows": 0},
}


async def run(
    args: argparse.Namespace, stack: BenchStack, tmp: Path, env: dict, deadline: float
) -> dict:
    """All phases; the optional ones (2, 4, 5 and each server setting) are skipped, and
    listed under ``skipped``, once ``deadline`` (time.monotonic) has passed."""
    import logging

    from activities.rag.tokens import tokenizer_name
    from workers.temporal_client import connect

    figures: dict[str, Any] = {
        "asks": args.asks,
        "warmup": args.warmup,
        "model": "mmrag-tiny",
        "torch_threads": int(env["MMRAG_TORCH_THREADS"]),
        "temporal": "dev server in memory, " + BASE_RPS_FLAG,
        "tokenizer": tokenizer_name(),
        "percentile": "nearest rank",
        "passthrough_modules": list(RUNNERS[PT_QUEUE]),
    }
    client = await connect()  # the product's client: same data converter as its workers
    q = Questions()

    seed_workers = InProcessWorkers(client, [])
    # The first ingest's alias creation logs a pymilvus ERROR (alter_alias before
    # create_alias in activities/store/vectors.py point_alias); it is expected, keep it out.
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
    try:
        figures["index"] = await index_corpus(client, tmp, args.images_per_class, args.vectors)
    finally:
        await seed_workers.stop()
        logging.getLogger("pymilvus").setLevel(logging.WARNING)
    ix = figures["index"]
    print(
        f"index: {ix['vectors_total']} vectors (dim {ix['dim']}) for tenant {TENANT!r}: "
        f"{ix['real_images']} ingested images in {ix['ingest_s']} s + bulk insert in "
        f"{ix['bulk_insert_s']} s; HNSW indexed rows {ix['hnsw_indexed_rows']}",
        flush=True,
    )
    inproc = InProcess()

    print(
        f"\n[1] workers in the bench process, same Client ({args.asks} asks per line after "
        f"{args.warmup} warm-up, all lines interleaved; ms; added = p50 - in-process p50)",
        flush=True,
    )
    figures["load_avg_1m"] = {"start": round(os.getloadavg()[0], 2)}
    phase_s: dict[str, float] = {}
    figures["phase_s"] = phase_s
    t = time.perf_counter()
    main, main_series = await phase_main(client, inproc, args.asks, args.warmup, q)
    figures["load_avg_1m"]["after_phase_1"] = round(os.getloadavg()[0], 2)
    print(f"    (1-minute load average on this 2-core machine: {os.getloadavg()[0]:.1f})")
    print_group(main, "retrieval")
    print_group(main, "full")
    figures["in_process_workers"] = main
    phase_s["1_in_process_workers"] = round(time.perf_counter() - t, 1)

    print("\n    where the time goes (Temporal server event timestamps, last 20 asks):")
    figures["breakdown"] = {}
    for kind in ("retrieval", "full"):
        for how in (AS_IS, QUERY, PT, "Ask eager, unsandboxed"):
            b = await breakdown(client, main_series[f"{kind}/{how}"])
            figures["breakdown"][f"{kind}/{how}"] = b
            print_breakdown(f"{kind}/{how}", b)

    skipped: list[str] = []
    figures["skipped"] = skipped

    def over_budget(what: str) -> bool:
        if time.monotonic() < deadline:
            return False
        skipped.append(what)
        print(f"\n(time budget --budget-s spent: skipping {what})", flush=True)
        return True

    if not args.quick and not over_budget("[2] repeated question"):
        n = max(5, args.asks // 2)
        print(f"\n[2] one repeated question ({n} asks; encode + prompt caches hit)", flush=True)
        t = time.perf_counter()
        rep = await phase_repeated(client, inproc, n)
        phase_s["2_repeated"] = round(time.perf_counter() - t, 1)
        print_group(rep, "retrieval")
        print_group(rep, "full")
        figures["repeated_question"] = rep

    print(
        f"\n[3] one worker process per role ({', '.join(ROLES_DEPLOYED)}) + a bench cpu-role "
        "process with the sandbox passthrough; no eager start possible",
        flush=True,
    )
    t = time.perf_counter()
    sep, sep_series, start_s = await phase_separate(
        client, inproc, args.asks, args.warmup, q, stack.state_dir, env
    )
    phase_s["3_worker_processes"] = round(time.perf_counter() - t, 1)
    print(f"    (worker processes ready in {start_s:.1f} s)")
    print_group(sep, "retrieval")
    print_group(sep, "full")
    figures["worker_processes"] = sep
    figures["breakdown_worker_processes"] = {}
    for kind in ("retrieval", "full"):
        for how in ("Ask, worker processes (as is)", QUERY_SEP):
            name = f"{kind}/{how}"
            b = await breakdown(client, sep_series[name])
            figures["breakdown_worker_processes"][name] = b
            print_breakdown(name, b)

    if not args.quick and not over_budget("[4] worker tuning"):
        n = max(5, args.asks // 4)
        t = time.perf_counter()
        print(
            f"\n[4] workflow-worker tuning, sandbox passthrough, one bench queue per setting "
            f"({n} asks per line, eager, interleaved)",
            flush=True,
        )
        tun = await phase_tuning(client, inproc, n, q)
        print_group(tun, "retrieval")
        print_group(tun, "full")
        figures["worker_tuning"] = tun
        phase_s["4_worker_tuning"] = round(time.perf_counter() - t, 1)

    if not args.quick and not over_budget("[5] server settings"):
        n = max(5, args.asks // 5)
        t = time.perf_counter()
        print(
            f"\n[5] Temporal dev-server settings, restarted per line; Ask eager with the sandbox "
            f"passthrough ({n} asks each; not interleaved across lines)",
            flush=True,
        )
        figures["server_settings"] = {}
        for name, (dynamic, raw, db_file) in SERVER_CONFIGS.items():
            if over_budget(f"[5] {name}"):
                break
            stack.restart_temporal(dynamic, raw, db_file)
            client = await connect()
            r = await phase_server(client, inproc, n, q)
            figures["server_settings"][name] = r
            print_short(name, r)
        phase_s["5_server_settings"] = round(time.perf_counter() - t, 1)
    figures["load_avg_1m"]["end"] = round(os.getloadavg()[0], 2)
    figures["headline"] = headline(main, sep)
    figures["goals"] = goals(figures["headline"])
    return figures


HEADLINE: dict[str, tuple[str, str | dict[str, str]]] = {
    # key: (figures table, variant name without the kind prefix, or one per kind)
    "eager_as_is": ("main", AS_IS),
    "eager_query_queue": ("main", QUERY),
    "worker_processes_query_queue": ("sep", QUERY_SEP),
    "eager_passthrough": ("main", PT),
    "worker_processes_as_is": ("sep", "Ask, worker processes (as is)"),
    "worker_processes_passthrough": ("sep", "Ask, worker processes, sandbox passthrough"),
    # The placement with encoding local is the product's own: an Ask on the query queue.
    "eager_passthrough_local_placement": ("main", QUERY),
    "eager_one_local_activity_floor": ("main", FLOOR),
}


def headline(main: dict[str, Any], sep: dict[str, Any]) -> dict[str, Any]:
    tables = {"main": main, "sep": sep}
    out: dict[str, Any] = {}
    for kind in ("retrieval", "full"):
        for key, (table, names) in HEADLINE.items():
            figs = tables[table]
            name = names if isinstance(names, str) else names[kind]
            t, base = figs[f"{kind}/{name}"], figs[f"{kind}/in-process"]
            out[f"{kind}/{key}"] = {
                "variant": name,
                "p50": t["p50"],
                "p99": t["p99"],
                "mean": t["mean"],
                "in_process_p50": base["p50"],
                "in_process_p99": base["p99"],
                **added(t, base),
            }
    return out


def goals(h: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in HEADLINE:
        r, f = h[f"retrieval/{key}"], h[f"full/{key}"]
        out[key] = {
            "retrieval_p50_under_80ms": r["p50"] < 80,
            "retrieval_added_under_30ms": r["added_ms_p50"] < 30,
            "full_added_under_60ms": f["added_ms_p50"] < 60,
        }
    return out


GOAL_LABELS = {
    "retrieval_p50_under_80ms": "retrieval<80",
    "retrieval_added_under_30ms": "retrieval added<30",
    "full_added_under_60ms": "full added<60",
}


def print_headline(figures: dict[str, Any]) -> None:
    h, g = figures["headline"], figures["goals"]
    print(
        "\nsummary: p50 end to end | added = Temporal p50 - in-process p50 (same rounds) | "
        "goals: retrieval p50 < 80 ms, retrieval added < 30 ms, full added < 60 ms"
    )
    for key in HEADLINE:
        r, f, ok = h[f"retrieval/{key}"], h[f"full/{key}"], g[key]
        marks = " ".join(
            f"{GOAL_LABELS[name]} {'met' if v else 'MISSED'}," for name, v in ok.items()
        ).rstrip(",")
        print(
            f"  {key:<34} retrieval {r['p50']:5.1f} ms (+{r['added_ms_p50']:4.1f}, "
            f"{r['ratio_p50']:.2f}x)  full {f['p50']:5.1f} ms (+{f['added_ms_p50']:4.1f}, "
            f"{f['ratio_p50']:.2f}x)  {marks}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--asks", type=int, default=50, help="measured asks per variant")
    parser.add_argument("--warmup", type=int, default=10, help="warm-up asks per variant")
    parser.add_argument("--vectors", type=int, default=20000, help="bulk random vectors")
    parser.add_argument("--images-per-class", type=int, default=12, help="x18 real images")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument(
        "--budget-s",
        type=float,
        default=230,
        help="start no optional phase after this many seconds (keeps a run under ~5 min)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="skip the repeated-question and setting phases"
    )
    parser.add_argument("--serve-queue", default="", help=argparse.SUPPRESS)  # worker process
    args = parser.parse_args()
    if args.serve_queue:
        asyncio.run(serve_queue(args.serve_queue))
        return

    from tests.llm_server import LlmTestServer

    tmp = Path(tempfile.mkdtemp(prefix="mmrag-bench-ask-"))
    state = tmp / "state"
    stack = BenchStack(state, StackPorts.free(), temporal_db_file=False)
    llm = LlmTestServer(mode="ok")
    t0 = time.perf_counter()
    try:
        endpoints = stack.up()
        llm.start()
        env = bench_env(state, endpoints, llm.base_url, args.torch_threads, grace_s=2)
        os.environ.update(env)
        get_settings.cache_clear()
        print(f"stack up in {time.perf_counter() - t0:.1f} s ({state})", flush=True)
        deadline = time.monotonic() - (time.perf_counter() - t0) + args.budget_s
        figures = asyncio.run(run(args, stack, tmp, env, deadline))
    finally:
        llm.stop()
        stack.down()
        shutil.rmtree(tmp, ignore_errors=True)
    figures["total_s"] = round(time.perf_counter() - t0, 1)
    print_headline(figures)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
