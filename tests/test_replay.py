"""Workflow histories recorded by earlier versions must replay on today's code.

The committed histories under tests/fixtures/histories are the compatibility contract
for running workflows: a change to a workflow that breaks one of them needs
``workflow.patched``. Run with ``MMRAG_RECORD_HISTORIES=1`` to (re)record the fresh one.

Replay goes through the workers' credential interceptor (workers/auth.py), which trusts the
history: a run accepted when it ran replays after its signing key is rotated out and after
its token expired; a refused run replays as the same refusal.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowFailureError, WorkflowHistory
from temporalio.worker import Replayer

from settings import get_settings
from starters.ingest import start_ingest
from starters.lifecycle import start_forget
from starters.synthetic_corpus import write_corpus
from tests.conftest import ServerStack, Workers
from tests.helpers import issued_token, milvus_pks, wait_searchable
from tests.llm_server import LlmTestServer
from workers.auth import (
    HEADER,
    REFUSED_MARKER,
    AuthClientInterceptor,
    AuthInterceptor,
    AuthPolicy,
    ClientCredentials,
    CredentialError,
    load_verify_keys,
    token_from_payload,
    verify_token,
)
from workers.temporal_client import data_converter
from workflows.ask import Ask
from workflows.contracts import (
    ASK_WORKFLOW,
    QUERY_TASK_QUEUE,
    TASK_QUEUE,
    AskInput,
    AskResult,
    ForgetInput,
)
from workflows.forget import Forget
from workflows.ingest import IngestAsset, IngestBatch

HISTORIES = Path(__file__).parent / "fixtures" / "histories"
WORKFLOWS = [IngestBatch, IngestAsset, Ask, Forget]


def current_keys() -> dict:  # type: ignore[type-arg]
    """The verification keys the workers hold now (the test stack's)."""
    return load_verify_keys(get_settings().state_dir / "auth" / "verify_keys.json")


def replayer(verify_keys: dict | None = None) -> Replayer:  # type: ignore[type-arg]
    """A replayer as the workers are built: the credential interceptor in front, holding
    ``verify_keys`` (default: none at all, i.e. every key rotated out)."""
    return Replayer(
        workflows=WORKFLOWS,
        data_converter=data_converter(),
        interceptors=[AuthInterceptor(AuthPolicy(verify_keys or {}))],
    )


def committed_histories() -> list[Path]:
    return sorted(HISTORIES.glob("*.json"))


async def test_committed_histories_replay() -> None:
    paths = committed_histories()
    assert paths, f"no recorded histories under {HISTORIES}"
    for path in paths:  # recorded before credentials existed: no header, still replayed
        history = WorkflowHistory.from_json(path.stem, path.read_text())
        await replayer().replay_workflow(history)


async def test_fresh_ingest_history_replays(
    worker: Workers, client: Client, tenant: str, tmp_path: Path
) -> None:
    write_corpus(tmp_path / "c", per_class=1, seed=99)
    (tmp_path / "c" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    handle = await start_ingest(client, tenant, [str(tmp_path / "c")], batch_size=8)
    result = await asyncio.wait_for(handle.result(), timeout=120)
    assert (result.ingested, result.failed) == (18, 1)
    history = await handle.fetch_history()
    await replayer(current_keys()).replay_workflow(history)
    if os.environ.get("MMRAG_RECORD_HISTORIES") == "1":
        (HISTORIES / "ingest_batch_v1.json").write_text(history.to_json())


@pytest.mark.parametrize(
    ("queue", "generate", "recorded_as"),
    [
        (TASK_QUEUE, False, "ask_retrieval_v1.json"),
        (TASK_QUEUE, True, "ask_full_v1.json"),
        (QUERY_TASK_QUEUE, False, ""),
        (QUERY_TASK_QUEUE, True, ""),
    ],
)
async def test_fresh_ask_history_replays(
    worker: Workers,
    client: Client,
    llm: LlmTestServer,
    tenant: str,
    tmp_path: Path,
    queue: str,
    generate: bool,
    recorded_as: str,
) -> None:
    """Ask in both placements (encode on the encode queue, or local on the query queue),
    retrieval-only and generated; ``ask_*_v1.json`` were recorded before retrieval-only
    asks became one local activity (``RETRIEVAL_ONLY_IN_ONE_STEP``)."""
    write_corpus(tmp_path / "c", per_class=1, seed=98)
    ingest = await start_ingest(client, tenant, [str(tmp_path / "c")])
    assert (await asyncio.wait_for(ingest.result(), timeout=120)).ingested == 18
    wait_searchable(tenant, len(milvus_pks(tenant)))
    handle = await client.start_workflow(
        ASK_WORKFLOW,
        AskInput(tenant=tenant, text="a red circle", generate=generate),
        id=f"ask/{tenant}/replay",
        task_queue=queue,
        result_type=AskResult,
    )
    result = await asyncio.wait_for(handle.result(), timeout=60)
    assert result.sources
    assert result.answer_kind == ("generated" if generate else "extractive")
    history = await handle.fetch_history()
    await replayer(current_keys()).replay_workflow(history)
    if recorded_as and os.environ.get("MMRAG_RECORD_HISTORIES") == "1":
        (HISTORIES / recorded_as).write_text(history.to_json())


async def client_with_token(test_stack: ServerStack, token: str) -> Client:
    return await Client.connect(
        test_stack.endpoints["temporal_address"],
        namespace="default",
        interceptors=[AuthClientInterceptor(ClientCredentials(token))],
    )


def recorded_token(history: WorkflowHistory) -> str:
    header = history.events[0].workflow_execution_started_event_attributes.header.fields
    return token_from_payload(header.get(HEADER))


async def test_history_replays_after_its_key_is_rotated_out_and_its_token_expired(
    worker: Workers, test_stack: ServerStack, tenant: str, tmp_path: Path
) -> None:
    write_corpus(tmp_path / "c", per_class=1, seed=97)
    token = issued_token([tenant], "writer", ttl_s=10)
    writer = await client_with_token(test_stack, token)
    handle = await start_ingest(writer, tenant, [str(tmp_path / "c")])
    assert (await asyncio.wait_for(handle.result(), timeout=120)).ingested == 18
    history = await handle.fetch_history()
    assert recorded_token(history) == token
    keys = current_keys()
    expires = verify_token(token, keys, check_expiry=False).expires_at
    await asyncio.sleep(max(0.0, expires - time.time()) + 1)
    # Checked again now, the recorded credential would be refused ...
    with pytest.raises(CredentialError, match="expired"):
        verify_token(token, keys)
    with pytest.raises(CredentialError, match="unknown key id"):
        verify_token(token, {})  # ... and so would it be once its key is rotated out
    # ... but replay trusts the history it recorded.
    await replayer(keys).replay_workflow(history)
    await replayer({}).replay_workflow(history)


async def test_a_refused_history_replays_as_the_same_refusal(
    worker: Workers, test_stack: ServerStack, tenant: str
) -> None:
    reader = await client_with_token(test_stack, issued_token([tenant], "reader"))
    handle = await start_forget(reader, ForgetInput(tenant, uri_prefix="file:///nothing/"))
    with pytest.raises(WorkflowFailureError):
        await asyncio.wait_for(handle.result(), timeout=60)
    history = await handle.fetch_history()
    markers = [
        e.SerializeToString()
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_MARKER_RECORDED
    ]
    assert any(REFUSED_MARKER.encode() in m for m in markers), markers  # the recorded verdict
    assert history.events[-1].event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED
    # Same commands with the keys it was refused under, and with them all rotated out.
    await replayer(current_keys()).replay_workflow(history)
    await replayer({}).replay_workflow(history)
