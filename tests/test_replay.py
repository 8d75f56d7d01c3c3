"""Workflow histories recorded by earlier versions must replay on today's code.

The committed histories under tests/fixtures/histories, at least one per workflow type, are
the compatibility contract for running workflows: a change to a workflow that breaks one of
them needs ``workflow.patched``. Each ``test_fresh_*`` test runs a workflow now and replays
its history; with ``MMRAG_RECORD_HISTORIES=1`` it also commits that history under its name
when no file has it yet (``tests.helpers.assert_replays``: committed files are never
overwritten, newer code records under the next ``_vN``). Reindex full and rollback
histories are recorded by tests/test_lifecycle.py, whose runs they are.

Replay goes through the workers' credential interceptor (workers/auth.py), which trusts the
history: a run accepted when it ran replays after its signing key is rotated out and after
its token expired; a refused run replays as the same refusal.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import pkgutil
import time
from importlib import import_module
from pathlib import Path

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowFailureError, WorkflowHistory

import workflows
from starters.ingest import start_ingest
from starters.lifecycle import start_forget, start_reindex, start_watch
from starters.synthetic_corpus import write_corpus
from tests.conftest import ServerStack, Workers
from tests.helpers import (
    HISTORIES,
    assert_replays,
    committed_history,
    current_verify_keys,
    issued_token,
    milvus_pks,
    replayer,
    wait_searchable,
    workflow_classes,
)
from tests.llm_server import LlmTestServer
from workers.auth import (
    HEADER,
    REFUSED_MARKER,
    AuthClientInterceptor,
    ClientCredentials,
    CredentialError,
    token_from_payload,
    verify_token,
)
from workflows.contracts import (
    ASK_WORKFLOW,
    INGEST_ASSET_WORKFLOW,
    QUERY_TASK_QUEUE,
    TASK_QUEUE,
    AskInput,
    AskResult,
    ForgetInput,
    IngestAssetInput,
    IngestResult,
    ReindexInput,
    WatchPrefixInput,
    asset_id_for,
    ingest_asset_workflow_id,
)


def committed_histories() -> list[Path]:
    return sorted(HISTORIES.glob("*.json"))


def workflow_type(history: WorkflowHistory) -> str:
    return history.events[0].workflow_execution_started_event_attributes.workflow_type.name


def type_name(cls: type) -> str:
    return str(cls.__temporal_workflow_definition.name)  # type: ignore[attr-defined]


def test_the_replayer_knows_every_workflow_type() -> None:
    """Every ``@workflow.defn`` under workflows/ is replayed (and so needs a fixture)."""
    defined = {
        type_name(obj)
        for info in pkgutil.iter_modules(workflows.__path__)
        for _, obj in inspect.getmembers(import_module(f"workflows.{info.name}"), inspect.isclass)
        if hasattr(obj, "__temporal_workflow_definition")
    }
    assert defined == {type_name(cls) for cls in workflow_classes()}


async def test_committed_histories_replay() -> None:
    paths = committed_histories()
    recorded = set()
    for path in paths:  # none carries a credential header: accepted runs still replay
        history = committed_history(path)
        recorded.add(workflow_type(history))
        await replayer().replay_workflow(history)
    missing = {type_name(cls) for cls in workflow_classes()} - recorded
    assert not missing, f"no committed history of {sorted(missing)} under {HISTORIES}"


async def test_fresh_ingest_history_replays(
    worker: Workers, client: Client, tenant: str, tmp_path: Path
) -> None:
    write_corpus(tmp_path / "c", per_class=1, seed=99)
    (tmp_path / "c" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    handle = await start_ingest(client, tenant, [str(tmp_path / "c")], batch_size=8)
    result = await asyncio.wait_for(handle.result(), timeout=120)
    assert (result.ingested, result.failed) == (18, 1)
    # v1 was recorded before the load knobs were bounded by the worker (KNOBS_BOUNDED).
    await assert_replays(await handle.fetch_history(), "ingest_batch_v2.json")


@pytest.mark.parametrize(
    ("queue", "generate", "recorded_as"),
    [
        (TASK_QUEUE, False, "ask_retrieval_v2.json"),
        (TASK_QUEUE, True, "ask_full_v2.json"),
        (QUERY_TASK_QUEUE, False, "ask_query_retrieval_v1.json"),
        (QUERY_TASK_QUEUE, True, "ask_query_full_v1.json"),
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
    llm.set_mode("ok")
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
    await assert_replays(await handle.fetch_history(), recorded_as)


async def test_fresh_ingest_asset_history_replays(
    worker: Workers, client: Client, tenant: str, tmp_path: Path
) -> None:
    """``IngestAsset`` as the storage-event bridge starts it: one object, one version."""
    path = write_corpus(tmp_path / "a", per_class=1, seed=96)[0][0]
    uri = path.resolve().as_uri()
    handle = await client.start_workflow(
        INGEST_ASSET_WORKFLOW,
        IngestAssetInput(tenant, uri, tags={"source": "replay"}),
        id=ingest_asset_workflow_id(tenant, uri, "1"),
        task_queue=TASK_QUEUE,
        result_type=IngestResult,
    )
    result = await asyncio.wait_for(handle.result(), timeout=120)
    assert (result.ingested, result.failed) == (1, 0)
    await assert_replays(await handle.fetch_history(), "ingest_asset_v1.json")


async def test_fresh_forget_history_replays(
    worker: Workers, client: Client, tenant: str, tmp_path: Path
) -> None:
    files = write_corpus(tmp_path / "f", per_class=1, seed=95)
    ingest = await start_ingest(client, tenant, [str(tmp_path / "f")])
    assert (await asyncio.wait_for(ingest.result(), timeout=120)).ingested == 18
    victim = files[0][0].resolve().as_uri()
    handle = await start_forget(
        client,
        ForgetInput(
            tenant, asset_id=asset_id_for(tenant, victim), reason="ticket 7", delete_object=True
        ),
    )
    result = await asyncio.wait_for(handle.result(), timeout=60)
    assert (result.forgotten, result.objects_deleted) == (1, 1)
    await assert_replays(await handle.fetch_history(), "forget_v1.json")


async def test_fresh_incremental_reindex_history_replays(
    worker: Workers, client: Client, tenant: str, tmp_path: Path
) -> None:
    files = write_corpus(tmp_path / "r", per_class=1, seed=94)
    ingest = await start_ingest(client, tenant, [str(tmp_path / "r")])
    assert (await asyncio.wait_for(ingest.result(), timeout=120)).ingested == 18
    for path, _ in files[:3]:  # three new generations
        os.utime(path, ns=(1, 4 * 10**18))
    handle = await start_reindex(
        client, ReindexInput(mode="incremental", tenant=tenant, batch_size=2)
    )
    result = await asyncio.wait_for(handle.result(), timeout=120)
    assert (result.embedded, result.failed, result.swapped) == (3, 0, False)
    await assert_replays(await handle.fetch_history(), "reindex_incremental_v1.json")


async def test_fresh_watch_prefix_history_replays(
    worker: Workers, client: Client, tenant: str, tmp_path: Path
) -> None:
    """One pass (``interval_s=0``, as a Schedule runs it): the pass is a child IngestBatch."""
    write_corpus(tmp_path / "w", per_class=1, seed=93)
    handle = await start_watch(
        client, WatchPrefixInput(tenant, (tmp_path / "w").resolve().as_uri(), interval_s=0)
    )
    result = await asyncio.wait_for(handle.result(), timeout=120)
    assert (result.ingested, result.unchanged) == (18, 0)
    await assert_replays(await handle.fetch_history(), "watch_prefix_v1.json")


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
    keys = current_verify_keys()
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
    await replayer(current_verify_keys()).replay_workflow(history)
    await replayer({}).replay_workflow(history)
