"""HTTP overhead of ``mmrag serve``: ``POST /v1/ask`` against the same Ask started with a
Temporal client, in the same run, by the same concurrent clients.

Starts its own embedded stack (Temporal dev server, Milvus, Postgres) on free ports in a
temporary directory, one worker process (``--role all``, the tiny CLIP model) and the
zero-latency OpenAI-compatible test server, ingests a small synthetic corpus, creates an
API key and starts ``mmrag serve`` as its own process. Then ``--clients`` concurrent
clients each run ``--asks`` pairs, alternating which goes first: one Ask over HTTP
(httpx, keep-alive) and the same Ask (a different, never repeated question of the same
form, so no cache is warm for either) started with ``Client.start_workflow`` and awaited
with the workflow credential a reader token carries, on the queue the server would use.
Both measure the caller's wall clock from sending to having the parsed result.

    .venv/bin/python bench/http.py [--clients 4] [--asks 40] [--warmup 5] [--generate]

Goal: the HTTP layer adds at most 5 ms at p50, read as the median of each pair's difference
(both Asks of a pair run back to back in one client, so they share the machine's load of
that moment; the difference of the two p50s is printed too). The server's own share comes
from its ``Server-Timing`` header. The last line of output is JSON.
"""

# ruff: noqa: E402  (imports follow the sys.path fix below)
from __future__ import annotations

import importlib
import sys
from pathlib import Path

# This file is named http.py, and any script run from bench/ has bench/ as sys.path[0]: an
# `import http.client` (urllib.request, httpx, ...) there would find this file. Imported under
# that name, it hands the importer the standard library's package instead; run as a script,
# it drops its own folder from sys.path before importing anything.
_HERE = Path(__file__).resolve().parent
_SAVED = sys.path[:]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
if __name__ == "http":
    del sys.modules["http"]
    try:
        sys.modules["http"] = importlib.import_module("http")
    finally:
        sys.path[:] = _SAVED  # the importing script keeps its own folder

import argparse
import asyncio
import json
import math
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from typing import TYPE_CHECKING, Any

# Everything that imports http (urllib.request, httpx) or mmrag is imported inside the
# functions: imported as "http" (above), this file must import nothing that imports http.
if TYPE_CHECKING:
    import httpx

TENANT = "bench-http"
GOAL_ADDED_P50_MS = 5.0
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle")
PLACES = ("on a white background", "near the top", "in the middle", "drawn small", "drawn large")


def question(i: int) -> str:
    """A new question each call (the query-vector and answer caches stay cold)."""
    c, s, p = COLOURS[i % 6], SHAPES[(i // 6) % 3], PLACES[(i // 18) % 5]
    return f"a {c} {s} {p}, picture {i}"


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(statistics.median(values), 2),
        "p90": round(pct(values, 90), 2),
        "p99": round(pct(values, 99), 2),
        "mean": round(statistics.fmean(values), 2),
        "n": len(values),
    }


def free_port() -> int:
    from tests.conftest import free_port as pick

    return pick()


def start_server(env: dict[str, str], state: Path) -> tuple[subprocess.Popen[bytes], str]:
    import urllib.request

    port = free_port()
    log = (state / "logs" / "web.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "starters.cli", "serve", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**env, "MMRAG_WEB_MAX_CONNECTIONS": "1024"},
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(url + "/v1/openapi.json", timeout=2):
                return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("mmrag serve did not start: see " + str(log.name)) from None
            time.sleep(0.2)


async def measure(args: argparse.Namespace, url: str, key: str, token: str) -> dict[str, Any]:
    import httpx

    from starters.ask import ask_task_queue, start_ask
    from workers.temporal_client import connect
    from workflows.contracts import AskInput

    client = await connect(token=token)
    queue = await ask_task_queue(client)
    service = await AskService.start(queue, token)
    counter = iter(range(10**9))
    http_ms: list[float] = []
    temporal_ms: list[float] = []
    process_ms: list[float] = []  # the same Ask through the ask-service child (pipe + its client)
    process_inside: list[float] = []  # the child's own start + result time
    paired_process: list[float] = []  # each triple's HTTP minus the child's
    stages: list[float] = []
    paired: list[float] = []  # each pair's HTTP minus Temporal: the same moment's noise
    server_app: list[float] = []  # the server's own time per Ask, less its wait on Temporal
    server_temporal: list[float] = []  # the server's wait on Temporal (start + result)
    transport: list[float] = []  # the client's wall time less the server's: httpx, loopback
    server_start: list[float] = []  # the server's start_workflow call alone
    bench_start: list[float] = []  # the bench's start_workflow call alone
    # (kind, workflow id, epoch sent, epoch parsed): split afterwards against the run's own
    # start and close times, which Temporal stamps (same machine, same clock).
    runs: list[tuple[str, str, float, float]] = []

    async def over_http(h: httpx.AsyncClient, text: str) -> float:
        body = {"text": text, "top_k": 5, "generate": args.generate}
        sent = time.time()
        t = time.perf_counter()
        r = await h.post(url + "/v1/ask", json=body)
        out = r.json()
        took = (time.perf_counter() - t) * 1000
        runs.append(("http", out.get("workflow_id", ""), sent, time.time()))
        if r.status_code != 200 or not out["sources"]:
            raise RuntimeError(f"HTTP ask failed: {r.status_code} {r.text[:300]}")
        stages.append(out["latency_ms"])
        timing = dict(part.strip().split(";dur=") for part in r.headers["server-timing"].split(","))
        server_app.append(float(timing["app"]))
        server_temporal.append(float(timing["temporal"]))
        server_start.append(float(timing["start"]))
        transport.append(took - float(timing["app"]) - float(timing["temporal"]))
        return took

    async def over_temporal(text: str) -> float:
        inp = AskInput(TENANT, text=text, top_k=5, generate=args.generate)
        sent = time.time()
        t = time.perf_counter()
        handle = await start_ask(client, inp, queue)
        bench_start.append((time.perf_counter() - t) * 1000)
        result = await handle.result()
        took = (time.perf_counter() - t) * 1000
        runs.append(("temporal", handle.id, sent, time.time()))
        if not result.sources:
            raise RuntimeError("Temporal ask found nothing")
        return took

    async def over_process(text: str) -> float:
        sent = time.time()
        t = time.perf_counter()
        reply = await service.ask(text, args.generate)
        took = (time.perf_counter() - t) * 1000
        runs.append(("process", reply["workflow_id"], sent, time.time()))
        process_inside.append(reply["ms"])
        return took

    async def one_client(c: int, n: int, record: bool) -> None:
        headers = {"Authorization": f"Bearer {key}"}
        kinds = ["http", "temporal", "process"]
        async with httpx.AsyncClient(headers=headers, timeout=120) as h:
            for i in range(n):
                took = {}
                # Each kind goes first in turn, and client c starts its turns at c: the clients
                # run side by side, so in lockstep every HTTP Ask would share the machine with
                # other HTTP Asks (two busy processes) and every direct one with direct ones.
                turn = (i + c) % 3
                for kind in kinds[turn:] + kinds[:turn]:
                    text = question(next(counter))
                    if kind == "http":
                        took[kind] = await over_http(h, text)
                    elif kind == "temporal":
                        took[kind] = await over_temporal(text)
                    else:
                        took[kind] = await over_process(text)
                if record:
                    http_ms.append(took["http"])
                    temporal_ms.append(took["temporal"])
                    process_ms.append(took["process"])
                    paired.append(took["http"] - took["temporal"])
                    paired_process.append(took["http"] - took["process"])

    await asyncio.gather(*(one_client(c, args.warmup, False) for c in range(args.clients)))
    for series in (stages, server_app, server_temporal, transport, server_start, bench_start):
        series.clear()
    runs.clear()
    process_inside.clear()
    t = time.perf_counter()
    try:
        await asyncio.gather(*(one_client(c, args.asks, True) for c in range(args.clients)))
    finally:
        await service.close()
    wall_s = time.perf_counter() - t
    split = await split_runs(client, runs)
    http, temporal = summary(http_ms), summary(temporal_ms)
    added = round(http["p50"] - temporal["p50"], 2)
    return {
        "clients": args.clients,
        "asks_per_client": args.asks,
        "generate": args.generate,
        "task_queue": queue,
        "http_ms": http,
        "temporal_client_ms": temporal,
        "workflow_latency_ms_p50": round(statistics.median(stages), 2),
        "server_app_ms": summary(server_app),
        "server_temporal_ms": summary(server_temporal),
        "transport_ms": summary(transport),
        "start_call_ms_p50": {
            "server": round(statistics.median(server_start), 2),
            "bench": round(statistics.median(bench_start), 2),
        },
        "split_ms_p50": split,
        "added_ms_p50": added,
        "paired_added_ms_p50": round(statistics.median(paired), 2),
        "added_ms_p90": round(http["p90"] - temporal["p90"], 2),
        "asks_per_s": round((len(http_ms) + len(temporal_ms) + len(process_ms)) / wall_s, 1),
        "goal_added_p50_ms": GOAL_ADDED_P50_MS,
        "goal_met": statistics.median(paired) <= GOAL_ADDED_P50_MS,
        # The same Ask from a Temporal client in a process of its own, asked over a pipe:
        # both paths then cross one process boundary, and the difference is HTTP's own.
        "process_client_ms": summary(process_ms),
        "process_client_inside_ms_p50": round(statistics.median(process_inside), 2),
        "paired_added_vs_process_ms_p50": round(statistics.median(paired_process), 2),
        "goal_met_vs_process": statistics.median(paired_process) <= GOAL_ADDED_P50_MS,
    }


async def split_runs(client: Any, runs: list[tuple[str, str, float, float]]) -> dict[str, Any]:
    """Each path's wall time split at the run's start and close, as Temporal stamped them:
    ``to_start`` (the caller's side until Temporal has the run: HTTP in, the start call),
    ``in_temporal`` (start to close: the worker's tasks and the server's own latency) and
    ``from_close`` (close until the caller has the parsed result: the long poll's answer,
    decoding, HTTP out). Read after the measured Asks, so no describe call is in their path."""
    gate = asyncio.Semaphore(8)

    async def one(kind: str, wid: str, sent: float, done: float) -> tuple[str, float, float, float]:
        async with gate:
            d = await client.get_workflow_handle(wid).describe()
        started, closed = d.start_time.timestamp(), d.close_time.timestamp()
        return kind, (started - sent) * 1000, (closed - started) * 1000, (done - closed) * 1000

    rows = await asyncio.gather(*(one(*r) for r in runs if r[1]))
    out: dict[str, Any] = {}
    for kind in ("http", "temporal", "process"):
        mine = [r[1:] for r in rows if r[0] == kind]
        out[kind] = {
            name: round(statistics.median(r[i] for r in mine), 2)
            for i, name in enumerate(("to_start", "in_temporal", "from_close"))
        }
    return out


class AskService:
    """A child process holding its own Temporal client (``--ask-service``): the bench writes
    it one JSON line per Ask and reads one back. The baseline a service pays when the
    process that holds the Temporal client is not the caller's, as with ``mmrag serve``,
    but without HTTP: a pipe is the cheapest hop there is."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.numbers = iter(range(10**9))
        self.reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def start(cls, queue: str, token: str) -> AskService:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(Path(__file__).resolve()),
            "--ask-service",
            queue,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "MMRAG_AUTH_TOKEN": token},
        )
        assert proc.stdout is not None
        if (await proc.stdout.readline()).strip() != b"ready":
            raise RuntimeError("the ask service did not start")
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            reply = json.loads(line)
            self.waiting.pop(reply["n"]).set_result(reply)

    async def ask(self, text: str, generate: bool) -> dict[str, Any]:
        assert self.proc.stdin is not None
        n = next(self.numbers)
        self.waiting[n] = asyncio.get_running_loop().create_future()
        self.proc.stdin.write(json.dumps({"n": n, "text": text, "generate": generate}).encode())
        self.proc.stdin.write(b"\n")
        await self.proc.stdin.drain()
        reply = await self.waiting[n]
        if reply.get("error"):
            raise RuntimeError(f"ask service: {reply['error']}")
        return reply

    async def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        await self.proc.wait()
        self.reader.cancel()


async def serve_asks(queue: str) -> None:
    """``--ask-service``: Asks from stdin lines, answers (its own start + result time) to
    stdout, concurrently, with a Temporal client of this process (MMRAG_AUTH_TOKEN)."""
    from starters.ask import start_ask
    from workers.temporal_client import connect
    from workflows.contracts import AskInput

    client = await connect()
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    tasks: set[asyncio.Task[None]] = set()

    async def one(request: dict[str, Any]) -> None:
        inp = AskInput(TENANT, text=request["text"], top_k=5, generate=request["generate"])
        reply: dict[str, Any] = {"n": request["n"]}
        try:
            t = time.perf_counter()
            handle = await start_ask(client, inp, queue)
            result = await handle.result()
            reply |= {"ms": (time.perf_counter() - t) * 1000, "workflow_id": handle.id}
            if not result.sources:
                reply["error"] = "found nothing"
        except Exception as e:  # said to the bench, which stops
            reply["error"] = repr(e)
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()

    print("ready", flush=True)
    while line := await stdin.readline():
        task = loop.create_task(one(json.loads(line)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)


async def ingest(corpus: Path) -> int:
    from starters.ingest import start_ingest
    from workers.temporal_client import connect

    client = await connect()
    result = await (await start_ingest(client, TENANT, [str(corpus)])).result()
    if not result.ingested:
        raise RuntimeError(f"ingest failed: {result}")
    return result.vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--asks", type=int, default=40, help="measured pairs per client")
    parser.add_argument("--warmup", type=int, default=5, help="warm-up pairs per client")
    parser.add_argument("--generate", action="store_true", help="full Asks (test LLM server)")
    parser.add_argument("--ask-service", metavar="QUEUE", help=argparse.SUPPRESS)
    args = parser.parse_args()

    sys.path.insert(0, str(_HERE.parent))
    if args.ask_service:  # the child of AskService, in the bench's environment
        from workers.temporal_client import run_client_command

        run_client_command(serve_asks(args.ask_service))
        return
    from activities.clip import TINY_MODEL_DIR
    from activities.store.registry import get_engine
    from settings import get_settings
    from stack.services import Stack, StackPorts
    from starters.background import WorkerProcess
    from starters.synthetic_corpus import write_corpus
    from starters.web.keys import create_key
    from tests.helpers import wait_searchable
    from tests.llm_server import LlmTestServer
    from workers.auth import issue_token, signing_key_from_settings
    from workers.temporal_client import run_client_command

    tmp = Path(tempfile.mkdtemp(prefix="mmrag-bench-http-"))
    state = tmp / "state"
    stack = Stack(state, StackPorts.free(), services=("temporal", "milvus", "postgres"))
    llm = LlmTestServer(mode="ok")
    worker: WorkerProcess | None = None
    server: subprocess.Popen[bytes] | None = None
    t0 = time.perf_counter()
    try:
        endpoints = stack.up()
        llm.start()
        env = {
            **os.environ,
            "MMRAG_STATE_DIR": str(state),
            "MMRAG_CLIP_MODEL": "mmrag-tiny",
            "MMRAG_CLIP_PRETRAINED": "",
            "MMRAG_CLIP_CHECKPOINT": str(TINY_MODEL_DIR / "mmrag-tiny.pt"),
            "MMRAG_DEVICE": "cpu",
            "MMRAG_TORCH_THREADS": "1",
            "MMRAG_STORAGE_ROOTS": json.dumps({"*": [tmp.as_uri()]}),
            "TEMPORAL_ADDRESS": endpoints["temporal_address"],
            "TEMPORAL_NAMESPACE": "default",
            "OPENAI_BASE_URL": llm.base_url,
            "OPENAI_API_KEY": "bench-key",
            "MMRAG_LLM_MODEL": "bench-llm",
        }
        for inherited in ("TEMPORAL_PROFILE", "TEMPORAL_API_KEY", "TEMPORAL_CONFIG_FILE"):
            env.pop(inherited, None)
        os.environ.clear()
        os.environ.update(env)
        get_settings.cache_clear()
        print(f"stack up in {time.perf_counter() - t0:.1f} s ({state})", flush=True)
        worker = WorkerProcess.start(state, "all", env)
        corpus = tmp / "corpus"
        write_corpus(corpus, per_class=6, seed=3)
        vectors = run_client_command(ingest(corpus))
        wait_searchable(TENANT, vectors)
        settings = get_settings()
        key = create_key(get_engine(settings.database_endpoint()), TENANT, "reader")[1]
        signing = signing_key_from_settings(settings)
        assert signing is not None
        token = issue_token(signing[0], signing[1], [TENANT], "reader", 3600, subject="bench")
        server, url = start_server(env, state)
        print(f"ready in {time.perf_counter() - t0:.1f} s; {vectors} vectors", flush=True)
        figures = run_client_command(measure(args, url, key, token))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=20)
        if worker is not None:
            worker.stop(timeout=10)
        llm.stop()
        stack.down()
        shutil.rmtree(tmp, ignore_errors=True)
    figures["total_s"] = round(time.perf_counter() - t0, 1)
    h, t = figures["http_ms"], figures["temporal_client_ms"]
    print(
        f"\n{figures['clients']} clients x {figures['asks_per_client']} pairs "
        f"({'full' if args.generate else 'retrieval-only'} Asks on {figures['task_queue']}):\n"
        f"  POST /v1/ask         p50 {h['p50']:7.2f} ms  p90 {h['p90']:7.2f}  p99 {h['p99']:7.2f}\n"
        f"  Temporal client Ask  p50 {t['p50']:7.2f} ms  p90 {t['p90']:7.2f}  p99 {t['p99']:7.2f}\n"
        f"  server's own time    p50 {figures['server_app_ms']['p50']:7.2f} ms "
        "(Server-Timing app: parse, auth, validate, encode; not its wait on Temporal)\n"
        f"  server's Temporal    p50 {figures['server_temporal_ms']['p50']:7.2f} ms "
        "(the same start + result as the Temporal client's, from the server's process)\n"
        f"  client <-> server    p50 {figures['transport_ms']['p50']:7.2f} ms "
        "(the client's wall time less the server's: httpx, loopback, uvicorn)\n"
        f"  start call alone     p50 {figures['start_call_ms_p50']['server']:7.2f} ms "
        f"from the server, {figures['start_call_ms_p50']['bench']:7.2f} ms from the bench\n"
        f"  split at the run's start and close (p50 ms): "
        + ", ".join(
            f"{kind}: {s['to_start']:.2f} + {s['in_temporal']:.2f} + {s['from_close']:.2f}"
            for kind, s in figures["split_ms_p50"].items()
        )
        + "\n"
        f"  Temporal client in a process of its own, over a pipe: p50 "
        f"{figures['process_client_ms']['p50']:7.2f} ms (its own start + result "
        f"{figures['process_client_inside_ms_p50']:.2f} ms)\n"
        f"  HTTP adds            p50 {figures['added_ms_p50']:+.2f} ms (difference of the p50s), "
        f"{figures['paired_added_ms_p50']:+.2f} ms (median of each pair's difference; goal <= "
        f"{GOAL_ADDED_P50_MS:g}: {'met' if figures['goal_met'] else 'MISSED'}); "
        f"{figures['paired_added_vs_process_ms_p50']:+.2f} ms over the client in its own process "
        f"({'met' if figures['goal_met_vs_process'] else 'MISSED'})"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
