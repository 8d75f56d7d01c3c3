"""The `mmrag` CLI as a person uses it: summaries, exit codes, and one-line errors (never a
traceback) when a server is down."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import uuid
from dataclasses import fields
from pathlib import Path

from settings import REPO_ROOT
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
    retrieval-only, so a script can read the answer and its citations."""
    llm.set_mode("ok")
    write_corpus(tmp_path / "c", per_class=1, seed=14)
    tenant = f"cli-json-{uuid.uuid4().hex[:6]}"
    ingest = mmrag(test_stack.env, "ingest", str(tmp_path / "c"), "--tenant", tenant, "--wait")
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


def test_temporal_down_is_one_line(test_stack: ServerStack, tmp_path: Path) -> None:
    env = {**test_stack.env, "TEMPORAL_ADDRESS": f"127.0.0.1:{closed_port()}"}
    out = mmrag(env, "ingest", str(tmp_path), "--tenant", "t")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "cannot reach Temporal" in out.stderr and "mmrag stack up" in out.stderr


def test_postgres_down_is_one_line(test_stack: ServerStack) -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/mmrag"
    out = mmrag({**test_stack.env, "MMRAG_DATABASE_URL": url}, "search", "a red circle")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "Postgres is unreachable" in out.stderr


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
