"""The `mmrag` CLI as a person uses it: summaries, exit codes, and one-line errors (never a
traceback) when a server is down."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass, fields
from datetime import timedelta
from pathlib import Path

import pytest

from settings import REPO_ROOT
from stack.services import Stack, StackPorts
from starters.synthetic_corpus import write_corpus
from tests.conftest import ServerStack, Workers
from tests.helpers import registry_rows, wait_searchable
from tests.llm_server import LlmTestServer
from workflows.contracts import AskResult, Source


def mmrag(
    env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "starters.cli", *args],
        env={**env, "COLUMNS": "200"},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


async def poll_once(address: str, namespace: str, queue: str, identity: str) -> None:
    """One workflow-task poll of ``queue`` as ``identity``: the server then lists a poller
    of that name, as it lists a worker for minutes after its last poll."""
    from temporalio.api.taskqueue.v1 import TaskQueue
    from temporalio.api.workflowservice.v1 import PollWorkflowTaskQueueRequest
    from temporalio.client import Client
    from temporalio.service import RPCError

    client = await Client.connect(address, namespace=namespace)
    with contextlib.suppress(RPCError):  # nothing to take: it times out, stays listed
        await client.workflow_service.poll_workflow_task_queue(
            PollWorkflowTaskQueueRequest(
                namespace=namespace, task_queue=TaskQueue(name=queue), identity=identity
            ),
            timeout=timedelta(seconds=3),  # the server refuses shorter long polls
        )
    del client
    gc.collect()  # see workers.temporal_client.run_client_command


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ingest_wait_prints_a_summary_with_reasons(
    test_stack: ServerStack, worker: Workers, tmp_path: Path
) -> None:
    write_corpus(tmp_path / "c", per_class=1, seed=13)
    (tmp_path / "c" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    tenant = f"cli-{uuid.uuid4().hex[:6]}"
    out = mmrag(test_stack.env, "ingest", str(tmp_path / "c"), "--tenant", tenant, "--wait")
    assert out.returncode == 1, out.stderr  # one object failed
    assert "18 ingested" in out.stdout and "1 failed" in out.stdout
    assert "broken.png" in out.stdout and "corrupt or truncated" in out.stdout
    again = mmrag(test_stack.env, "ingest", str(tmp_path / "c"), "--tenant", tenant, "--wait")
    assert "18 unchanged" in again.stdout


def test_ask_json_prints_the_ask_result_contract(
    test_stack: ServerStack, worker: Workers, llm: LlmTestServer, tmp_path: Path
) -> None:
    """`mmrag ask --json` prints exactly one JSON document on stdout: the ``AskResult``
    contract, every field by its name, sources with every ``Source`` field, generated or
    retrieval-only, so a script can read the answer and its citations. (The pictures are
    tagged: a source with no caption, text or tags has nothing an extractive answer could
    quote, and that answer would rightly say it does not know.)"""
    llm.set_mode("ok")
    write_corpus(tmp_path / "c", per_class=1, seed=14)
    tenant = f"cli-json-{uuid.uuid4().hex[:6]}"
    ingest = mmrag(
        test_stack.env,
        "ingest",
        str(tmp_path / "c"),
        "--tenant",
        tenant,
        "--tag",
        "album=shapes",
        "--wait",
    )
    assert ingest.returncode == 0, ingest.stderr
    wait_searchable(tenant, 18)
    owned = {row.asset_id for row in registry_rows(tenant)}
    for extra, kind in (((), "generated"), (("--no-generate",), "extractive")):
        out = mmrag(
            test_stack.env,
            "ask",
            "a red circle",
            "--tenant",
            tenant,
            "--top-k",
            "3",
            "--json",
            *extra,
        )
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        assert set(result) == {f.name for f in fields(AskResult)}
        assert result["answer_kind"] == kind and not result["degraded"]
        assert result["encoder_model"] == "mmrag-tiny" and result["index_version"] >= 1
        sources = result["sources"]
        assert [s["id"] for s in sources] == ["S1", "S2", "S3"]
        assert all(set(s) == {f.name for f in fields(Source)} for s in sources)
        assert {s["asset_id"] for s in sources} <= owned
        assert sources[0]["uri"].rsplit("/", 1)[-1].startswith("red-circle-")
        assert "[S1]" in result["answer"]
        if kind == "extractive":
            assert "album=shapes [S1]" in result["answer"], result["answer"]


def test_temporal_down_is_one_line(test_stack: ServerStack, tmp_path: Path) -> None:
    env = {**test_stack.env, "TEMPORAL_ADDRESS": f"127.0.0.1:{closed_port()}"}
    out = mmrag(env, "ingest", str(tmp_path), "--tenant", "t")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "cannot reach Temporal" in out.stderr and "mmrag stack up" in out.stderr


def test_postgres_down_is_one_line(test_stack: ServerStack) -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/mmrag"
    out = mmrag({**test_stack.env, "MMRAG_DATABASE_URL": url}, "db", "upgrade")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "Postgres is unreachable" in out.stderr


def test_milvus_down_is_one_line() -> None:
    """The one command that still talks to Milvus itself (searches are Asks, which wait
    for Milvus inside the workflow): an outage is one line naming the address, exit 2."""
    uri = f"http://127.0.0.1:{closed_port()}"
    out = mmrag({**os.environ, "MMRAG_MILVUS_URI": uri}, "milvus", "provision-rbac")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"Milvus at {uri} is unreachable" in lines[0], out.stderr


def test_user_errors_say_what_to_do(test_stack: ServerStack) -> None:
    out = mmrag(test_stack.env, "ask", "--filter", "colour=red", "x")
    assert out.returncode == 2 and "not a filter" in out.stderr and "Traceback" not in out.stderr
    out = mmrag(test_stack.env, "ingest", "s3://bucket/x")
    assert out.returncode == 2 and "unsupported URI scheme" in out.stderr
    out = mmrag(test_stack.env, "forget", "--tenant", "t")
    assert out.returncode == 2 and "--asset-id" in out.stderr


def test_a_refused_milvus_privilege_is_not_reported_as_an_outage() -> None:
    from activities.store.vectors import VectorStoreAccessError, VectorStoreError
    from starters.cli import outage_message

    refused = VectorStoreAccessError(
        "Milvus refused insert: user 'mmrag_query' lacks the Insert privilege",
        "run the writing worker with MMRAG_MILVUS_TOKEN_CPU set to the mmrag_ingest user",
    )
    message = outage_message(refused)
    assert message is not None
    assert "lacks the Insert privilege" in message and "MMRAG_MILVUS_TOKEN" in message
    assert "unreachable" not in message and "stack up" not in message
    down = outage_message(VectorStoreError("Milvus at http://127.0.0.1:1 is unreachable"))
    assert down is not None and "mmrag stack up" in down


def test_a_failed_workflow_is_one_line_naming_the_step_and_the_cause() -> None:
    from temporalio.client import WorkflowFailureError
    from temporalio.exceptions import ActivityError, ApplicationError, TimeoutError, TimeoutType

    from starters.cli import workflow_failure_message

    def failed(root: BaseException) -> WorkflowFailureError:
        step = ActivityError(
            "activity task failed",
            scheduled_event_id=5,
            started_event_id=0,
            identity="",
            activity_type="encode_query",
            activity_id="1",
            retry_state=None,
        )
        step.__cause__ = root
        error = WorkflowFailureError(cause=step)
        error.__cause__ = step
        return error

    unserved = failed(
        TimeoutError("timeout", type=TimeoutType.SCHEDULE_TO_START, last_heartbeat_details=[])
    )
    message = workflow_failure_message(unserved)
    assert message is not None and "\n" not in message
    assert "at encode_query" in message and "mmrag worker" in message
    down = workflow_failure_message(failed(ApplicationError("Milvus at x is unreachable")))
    assert down == "the workflow failed at encode_query: Milvus at x is unreachable"
    assert workflow_failure_message(RuntimeError("a bug")) is None


# -- output that tells the truth, on a corpus in a folder named "café 日本" ----------------
@dataclass
class Ingested:
    tenant: str
    folder: Path
    first: subprocess.CompletedProcess[str]  # `ingest --wait --json`


@pytest.fixture(scope="module")
def cafe(
    test_stack: ServerStack, worker: Workers, tmp_path_factory: pytest.TempPathFactory
) -> Ingested:
    """18 images and one broken PNG under a unicode folder name, ingested with --json."""
    folder = tmp_path_factory.mktemp("cli-paths") / "café 日本"
    write_corpus(folder, per_class=1, seed=17)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    tenant = f"cli-cafe-{uuid.uuid4().hex[:6]}"
    first = mmrag(test_stack.env, "ingest", str(folder), "--tenant", tenant, "--wait", "--json")
    wait_searchable(tenant, 18)
    return Ingested(tenant, folder, first)


def test_ingest_wait_json_prints_only_json_with_exact_uris(cafe: Ingested) -> None:
    """stdout parses as the ``IngestResult``; status lines went to stderr; URIs stay exact
    (percent-encoded) for scripts."""
    assert cafe.first.returncode == 1, cafe.first.stderr  # the broken PNG failed
    result = json.loads(cafe.first.stdout)
    assert result["ingested"] == 18 and result["failed"] == 1
    assert [f["uri"] for f in result["failures"]] == [(cafe.folder / "broken.png").as_uri()]
    assert "caf%C3%A9%20%E6%97%A5%E6%9C%AC" in result["failures"][0]["uri"]
    assert "started IngestBatch" in cafe.first.stderr


def test_human_output_shows_paths_decoded(test_stack: ServerStack, cafe: Ingested) -> None:
    again = mmrag(test_stack.env, "ingest", str(cafe.folder), "--tenant", cafe.tenant, "--wait")
    assert "18 unchanged" in again.stdout and "1 failed" in again.stdout
    assert f"{cafe.folder}/broken.png" in again.stdout and "%C3%A9" not in again.stdout
    answer = mmrag(test_stack.env, "ask", "a red circle", "--tenant", cafe.tenant, "--no-generate")
    assert answer.returncode == 0, answer.stderr
    assert re.search(rf"\[S1\] [0-9.]+  {re.escape(str(cafe.folder))}/red-circle-", answer.stdout)
    assert "%C3%A9" not in answer.stdout


def test_search_encodes_with_the_index_model(
    test_stack: ServerStack, cafe: Ingested, tmp_path: Path
) -> None:
    """The CLI's own model settings name weights it does not have, offline: ``search`` is
    an Ask, so the workers encode the text with the index's model (mmrag-tiny) and the CLI
    loads no model at all."""
    env = {
        **test_stack.env,
        "MMRAG_CLIP_MODEL": "ViT-B-32",
        "MMRAG_CLIP_PRETRAINED": "laion2b_s34b_b79k",
        "MMRAG_CLIP_CHECKPOINT": "",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "empty-hf-cache"),
    }
    out = mmrag(env, "search", "a red circle", "--tenant", cafe.tenant, "--top-k", "3")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("1. ") and f"{cafe.folder}/red-circle-" in lines[0]
    assert len([line for line in lines if re.match(r"\d+\. ", line)]) == 3
    assert "encoder mmrag-tiny" in out.stdout


def test_an_empty_answer_in_the_default_tenant_says_where_data_lives(
    test_stack: ServerStack, cafe: Ingested
) -> None:
    out = mmrag(test_stack.env, "ask", "a red circle", "--no-generate")
    assert out.returncode == 0, out.stderr
    assert "tenant 'default' has no indexed content (--tenant defaults to 'default')" in out.stderr
    assert re.search(r"tenants with indexed assets: [^ ]+ \(\d+\)", out.stderr)
    assert "pass --tenant NAME" in out.stderr


def test_reindex_lists_still_failing_files_with_reasons_and_succeeds(
    test_stack: ServerStack, cafe: Ingested
) -> None:
    """The broken PNG failed on these very bytes at ingest: an incremental re-index lists
    it with its reason but does not count it as a new failure (exit 0), run after run."""
    out = mmrag(test_stack.env, "reindex", "incremental", "--tenant", cafe.tenant, "--wait")
    assert out.returncode == 0, (out.stdout, out.stderr)
    assert "0 failed" in out.stdout and "1 still failing" in out.stdout
    assert f"{cafe.folder}/broken.png" in out.stdout and "corrupt or truncated" in out.stdout


def test_reingest_of_forgotten_objects_names_allow_forgotten(
    test_stack: ServerStack, cafe: Ingested
) -> None:
    """Runs last among the café tests: it forgets three of the images."""
    prefix = (cafe.folder / "red-").as_uri()
    forget = mmrag(test_stack.env, "forget", "--tenant", cafe.tenant, "--uri-prefix", prefix)
    assert forget.returncode == 0 and "forgot 3 asset(s)" in forget.stdout, forget.stderr
    again = mmrag(test_stack.env, "ingest", str(cafe.folder), "--tenant", cafe.tenant, "--wait")
    assert "3 skipped (forgotten; `mmrag ingest --allow-forgotten` re-ingests them)" in again.stdout


# -- stack down -------------------------------------------------------------------------------
def test_stack_down_stops_milvus_cleanly_and_warns_about_workers() -> None:
    """After a search Milvus holds a loaded collection; its SIGTERM used to wait for a query
    node that a standalone does not have, until SIGKILL. `stack down` now stops it with
    SIGTERM, and names a worker that still polls (it would outlive the stack)."""
    import asyncio

    from pymilvus import MilvusClient

    state_dir = Path(tempfile.mkdtemp(prefix="mmrag-cli-down-"))
    stack = Stack(state_dir, StackPorts.free(), services=("temporal", "milvus"))
    try:
        endpoints = stack.up()
        milvus = MilvusClient(endpoints["milvus_uri"])
        milvus.create_collection("loaded", dimension=8)
        milvus.insert("loaded", [{"id": i, "vector": [0.1] * 8} for i in range(100)])
        milvus.load_collection("loaded")
        milvus.search("loaded", [[0.1] * 8], limit=1)
        milvus.close()

        asyncio.run(
            poll_once(endpoints["temporal_address"], "default", "mmrag", "4242@worker-elsewhere")
        )
        env = {**os.environ, "MMRAG_STATE_DIR": str(state_dir), "TEMPORAL_NAMESPACE": "default"}
        out = mmrag(env, "stack", "down")
        assert out.returncode == 0, out.stderr
        assert "worker 4242@worker-elsewhere (task queues mmrag) still runs" in out.stderr
        assert "milvus stopped (SIGTERM)" in out.stdout and "temporal stopped" in out.stdout
        assert not any(info["running"] for info in stack.status().values())
    finally:
        stack.down()
        shutil.rmtree(state_dir, ignore_errors=True)  # Milvus unpacks ~250 MB


def test_schedule_cron_text_is_rebuilt_from_calendars() -> None:
    """The server returns a schedule's cron as calendar ranges; the list shows cron text."""
    from temporalio.client import ScheduleCalendarSpec, ScheduleRange, ScheduleSpec

    from starters.lifecycle import spec_text

    nightly = ScheduleCalendarSpec(
        minute=[ScheduleRange(0)],
        hour=[ScheduleRange(3)],
        day_of_month=[ScheduleRange(1, 31)],
        month=[ScheduleRange(1, 12)],
        day_of_week=[ScheduleRange(0, 6)],
    )
    office = ScheduleCalendarSpec(
        minute=[ScheduleRange(0, 59, 15)],
        hour=[ScheduleRange(9, 17)],
        day_of_week=[ScheduleRange(1, 5)],
    )
    assert spec_text(ScheduleSpec(calendars=[nightly])) == "0 3 * * *"
    assert spec_text(ScheduleSpec(calendars=[office])) == "*/15 9-17 * * 1-5"
