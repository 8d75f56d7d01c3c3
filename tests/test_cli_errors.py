"""What a person meets when something is missing or mistyped, through the real `mmrag` CLI
against the real stack: a line that says what the command waits for (never silence), and
every mistake as one line that says what to do, exit status 2 (never a traceback).

Runs that must find no worker use a namespace of their own on the test stack's Temporal:
the shared workers poll ``default`` only.
"""

from __future__ import annotations

import asyncio
import gc
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest_asyncio
from google.protobuf.duration_pb2 import Duration
from temporalio.api.workflowservice.v1 import (
    RegisterNamespaceRequest,
)
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError

from settings import REPO_ROOT
from starters.background import WorkerProcess
from starters.synthetic_corpus import write_corpus
from tests.conftest import ServerStack
from tests.test_cli import closed_port, mmrag, poll_once

# A bound on how long a test reads a command's output, so a hang fails instead of blocking
# the suite; no test asserts a duration.
READ_LIMIT_S = 90.0


class Running:
    """An `mmrag` command in the background whose stderr lines are read as they come."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "starters.cli", *args],
            env={**env, "COLUMNS": "200"},
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, predicate: Callable[[str], bool]) -> str:
        """The first stderr line ``predicate`` accepts (lines seen are in ``self.lines``)."""
        while True:
            try:
                line = self._queue.get(timeout=READ_LIMIT_S)
            except queue.Empty:
                self.proc.kill()
                raise AssertionError(f"no such line in {READ_LIMIT_S} s: {self.lines}") from None
            if line is None:
                raise AssertionError(f"exited {self.proc.wait()} without it: {self.lines}")
            self.lines.append(line)
            if predicate(line):
                return line

    def interrupt(self) -> int:
        """Ctrl+C, as a person stops waiting; every stderr line is in ``self.lines`` after."""
        self.proc.send_signal(signal.SIGINT)
        try:
            status = self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        while (line := self._queue.get(timeout=READ_LIMIT_S)) is not None:
            self.lines.append(line)
        return status


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def empty_namespace(test_stack: ServerStack) -> AsyncIterator[str]:
    """A namespace no worker polls, usable once the server's namespace cache has it."""
    name = f"cli-empty-{uuid.uuid4().hex[:8]}"
    address = test_stack.endpoints["temporal_address"]
    client = await Client.connect(address)
    await client.workflow_service.register_namespace(
        RegisterNamespaceRequest(
            namespace=name, workflow_execution_retention_period=Duration(seconds=86400)
        )
    )
    in_it = await Client.connect(address, namespace=name)
    for _ in range(120):
        try:
            await in_it.count_workflows()
            break
        except RPCError:
            await asyncio.sleep(0.5)
    yield name
    gc.collect()


def in_namespace(test_stack: ServerStack, namespace: str) -> dict[str, str]:
    return {**test_stack.env, "TEMPORAL_NAMESPACE": namespace}


async def running_workflows(test_stack: ServerStack, namespace: str, kind: str) -> list[str]:
    client = await Client.connect(test_stack.endpoints["temporal_address"], namespace=namespace)
    ids = []
    async for wf in client.list_workflows(f"WorkflowType = '{kind}'"):
        described = await client.get_workflow_handle(wf.id, run_id=wf.run_id).describe()
        if described.status == WorkflowExecutionStatus.RUNNING:
            ids.append(wf.id)
    return ids


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped) on this host."""
    done = subprocess.Popen(["true"])
    done.wait()
    return done.pid


# -- no worker: the command says what it waits for ----------------------------------------
async def test_an_ask_with_no_worker_says_which_queue_it_waits_for(
    test_stack: ServerStack, empty_namespace: str
) -> None:
    """No silent wait: within a few seconds the Ask says it waits for a worker on ``mmrag``
    and which ``mmrag worker --role`` serves it; Ctrl+C ends the Ask instead of leaving it
    Running."""
    ask = Running(in_namespace(test_stack, empty_namespace), "ask", "a red circle")
    line = ask.wait_for(lambda text: "waiting for a worker" in text)
    assert "task queue mmrag (Ask)" in line and "mmrag worker --role cpu" in line
    assert ask.interrupt() == 130
    assert not [text for text in ask.lines if "Traceback" in text]
    assert await running_workflows(test_stack, empty_namespace, "Ask") == []


async def test_ingest_wait_with_no_worker_says_so(
    test_stack: ServerStack, empty_namespace: str, tmp_path: Path
) -> None:
    write_corpus(tmp_path / "c", per_class=1, seed=31)
    ingest = Running(
        in_namespace(test_stack, empty_namespace),
        "ingest",
        str(tmp_path / "c"),
        "--tenant",
        "nobody-serves",
        "--wait",
    )
    started = ingest.wait_for(lambda text: text.startswith("started IngestBatch"))
    line = ingest.wait_for(lambda text: "waiting for a worker" in text)
    assert "task queue mmrag (IngestBatch)" in line and "mmrag worker --role cpu" in line
    assert ingest.interrupt() == 130
    assert "keeps running" in ingest.lines[-1]  # an ingest is durable: it is not stopped
    client = await Client.connect(
        test_stack.endpoints["temporal_address"], namespace=empty_namespace
    )
    await client.get_workflow_handle(started.split()[-1]).terminate(reason="test cleanup")


async def test_auto_queue_trusts_only_live_query_workers(
    test_stack: ServerStack, empty_namespace: str
) -> None:
    """``--queue auto`` takes the query queue only for a live query worker: a poller of
    this host whose process has exited is ignored, and an Ask a listed query worker does
    not take (gone from another host, still listed) is asked again on ``mmrag``."""
    env = in_namespace(test_stack, empty_namespace)
    address = test_stack.endpoints["temporal_address"]
    await poll_once(address, empty_namespace, "mmrag-query", f"{dead_pid()}@{socket.gethostname()}")
    ask = Running(env, "ask", "a red circle", "--no-generate")
    line = ask.wait_for(lambda text: "waiting for a worker" in text)
    assert "task queue mmrag (Ask)" in line
    assert ask.interrupt() == 130

    await poll_once(address, empty_namespace, "mmrag-query", "1@elsewhere.invalid")
    ask = Running(env, "ask", "a red circle", "--no-generate")
    first = ask.wait_for(lambda text: "waiting for a worker" in text)
    assert "task queue mmrag-query (Ask): 1 poll it (1@elsewhere.invalid)" in first
    ask.wait_for(lambda text: "no worker took the Ask on mmrag-query; asking on mmrag" in text)
    ask.wait_for(lambda text: "waiting for a worker on task queue mmrag (Ask)" in text)
    assert ask.interrupt() == 130
    assert await running_workflows(test_stack, empty_namespace, "Ask") == []


async def test_ingest_of_a_bucket_without_credentials_fails_in_one_line(
    test_stack: ServerStack, empty_namespace: str
) -> None:
    """A worker without Google credentials (no emulator, no metadata server): the listing
    step fails without retries (no retry brings credentials), and the command ends with one
    line naming what to set, exit status 1, and the run Failed, not Running."""
    env = in_namespace(test_stack, empty_namespace)
    setup = mmrag(env, "temporal", "setup", "--namespace", empty_namespace)
    assert setup.returncode == 0, setup.stderr
    closed = f"127.0.0.1:{closed_port()}"
    # No emulator and no Google credentials; the worker logs in to Postgres as its role.
    dropped = ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "MMRAG_DATABASE_URL")
    worker_env = {k: v for k, v in env.items() if k not in dropped}
    worker_env.update(
        {"GCE_METADATA_HOST": closed, "GCE_METADATA_IP": closed, "CLOUDSDK_CONFIG": "/nonexistent"}
    )
    worker = WorkerProcess.start(test_stack.state_dir, "all", worker_env)
    try:
        tenant = f"gcs-{uuid.uuid4().hex[:6]}"
        out = mmrag(
            env,
            "ingest",
            "gs://mmrag-no-credentials/prefix/",
            "--tenant",
            tenant,
            "--wait",
            timeout=READ_LIMIT_S,
        )
        assert out.returncode == 1, (out.stdout, out.stderr)
        assert "Traceback" not in out.stderr
        last = out.stderr.strip().splitlines()[-1]
        assert "scan_page" in last and "GOOGLE_APPLICATION_CREDENTIALS" in last, out.stderr
        workflow_id = next(
            line.split()[-1] for line in out.stderr.splitlines() if "IngestBatch" in line
        )
        client = await Client.connect(
            test_stack.endpoints["temporal_address"], namespace=empty_namespace
        )
        described = await client.get_workflow_handle(workflow_id).describe()
        assert described.status == WorkflowExecutionStatus.FAILED
    finally:
        worker.stop(timeout=10)


# -- schedules --------------------------------------------------------------------------
def one_line_error(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    return lines[0]


def test_schedule_mistakes_are_one_line_each(test_stack: ServerStack) -> None:
    env = test_stack.env
    tenant = f"sched-{uuid.uuid4().hex[:6]}"
    created = mmrag(env, "schedule", "create", "--tenant", tenant, "--cron", "*/15 9-17 * * 1-5")
    assert created.returncode == 0, created.stderr
    try:
        again = one_line_error(mmrag(env, "schedule", "create", "--tenant", tenant))
        assert "already exists" in again and "schedule delete" in again
        bad = one_line_error(
            mmrag(env, "schedule", "create", "--tenant", f"{tenant}-x", "--cron", "61 * * * *")
        )
        assert "--cron '61 * * * *'" in bad and "minute hour day-of-month" in bad
        missing = one_line_error(mmrag(env, "schedule", "delete", "--id", f"{tenant}-missing"))
        assert "no schedule" in missing and "schedule list" in missing
        listed = mmrag(env, "schedule", "list")
        row = next(r for r in listed.stdout.splitlines() if tenant in r)
        assert "*/15 9-17 * * 1-5" in row  # the cron, as it was given
    finally:
        mmrag(env, "schedule", "delete", "--tenant", tenant)


# -- the worker without its model -------------------------------------------------------
def test_worker_without_weights_offline_is_one_line(tmp_path: Path) -> None:
    """No minute of download retries and no traceback: one line naming the settings, as
    soon as the worker sees the weights are neither cached nor downloadable."""
    base = {
        **os.environ,
        "MMRAG_CLIP_MODEL": "ViT-B-32",
        "MMRAG_CLIP_PRETRAINED": "laion2b_s34b_b79k",
        "MMRAG_CLIP_CHECKPOINT": "",
        "HF_HOME": str(tmp_path / "empty-hf-cache"),
    }
    base.pop("HF_HUB_OFFLINE", None)
    offline = one_line_error(
        mmrag({**base, "HF_HUB_OFFLINE": "1"}, "worker", "--role", "encode", timeout=60)
    )
    assert "MMRAG_CLIP_MODEL" in offline and "MMRAG_CLIP_CHECKPOINT" in offline
    assert "HF_HUB_OFFLINE" in offline
    endpoint = f"http://127.0.0.1:{closed_port()}"
    unreachable = one_line_error(
        mmrag({**base, "HF_ENDPOINT": endpoint}, "worker", "--role", "query", timeout=60)
    )
    assert f"{endpoint} cannot be reached" in unreachable
    missing = one_line_error(
        mmrag(
            {**base, "MMRAG_CLIP_CHECKPOINT": str(tmp_path / "nope.pt")},
            "worker",
            "--role",
            "all",
            timeout=60,
        )
    )
    assert "MMRAG_CLIP_CHECKPOINT" in missing and "does not exist" in missing


# -- what an Ask is given ---------------------------------------------------------------
def test_ask_mistakes_are_one_line_each(test_stack: ServerStack, tmp_path: Path) -> None:
    env = test_stack.env
    zero = one_line_error(mmrag(env, "ask", "a red circle", "--top-k", "0"))
    assert "--top-k 0" in zero and "1 or more" in zero
    assert "--top-k 0" in one_line_error(mmrag(env, "search", "a red circle", "--top-k", "0"))
    jpg = one_line_error(mmrag(env, "ask", "x", "--filter", "media_type=image/jpg"))
    assert "media_type=image/jpeg" in jpg
    unknown = one_line_error(mmrag(env, "ask", "x", "--filter", "media_type=image"))
    assert "image/png" in unknown
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    said = one_line_error(mmrag(env, "ask", "--image", str(empty)))
    assert "is empty (0 bytes)" in said and "needs a question" not in said
    gone = one_line_error(mmrag(env, "ask", "--image", str(tmp_path / "gone.jpg")))
    assert "no such file" in gone
    json_alone = one_line_error(mmrag(env, "ingest", str(tmp_path), "--json"))
    assert "--wait" in json_alone


def test_help_shows_defaults_and_describes_every_command() -> None:
    env = {**os.environ, "COLUMNS": "200"}
    top = mmrag(env, "--help")
    assert top.returncode == 0 and "``" not in top.stdout
    listing = top.stdout.split("positional arguments:")[1].split("options:")[0]
    commands = re.findall(r"^    ([a-z][a-z-]*)", listing, flags=re.MULTILINE)
    assert {"stack", "worker", "ingest", "ask", "forget", "schedule"} <= set(commands)
    for command in commands:
        out = mmrag(env, command, "--help")
        assert out.returncode == 0, out.stderr
        description = out.stdout.split("\n\n")[1]
        assert description.strip() and not description.startswith(("positional", "options")), (
            command
        )
    worker = mmrag(env, "worker", "--help").stdout
    for role in ("cpu", "encode", "generate", "query"):
        assert f"\n  {role} " in worker
    assert "MMRAG_CLIP_MODEL" in worker and "MMRAG_CLIP_CHECKPOINT" in worker
    assert "(default: all)" in worker
    stack = mmrag(env, "stack", "--help").stdout
    assert all(f"\n  {verb} " in stack for verb in ("up", "down", "status"))
    assert "(default: default)" in mmrag(env, "ask", "--help").stdout  # --tenant
