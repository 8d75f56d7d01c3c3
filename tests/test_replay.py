"""Workflow histories recorded by earlier versions must replay on today's code.

The committed histories under tests/fixtures/histories are the compatibility contract
for running workflows: a change to a workflow that breaks one of them needs
``workflow.patched``. Run with ``MMRAG_RECORD_HISTORIES=1`` to (re)record the fresh one.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from temporalio.client import Client, WorkflowHistory
from temporalio.worker import Replayer

from starters.ingest import start_ingest
from starters.synthetic_corpus import write_corpus
from tests.conftest import Workers
from tests.helpers import milvus_pks, wait_searchable
from tests.llm_server import LlmTestServer
from workers.temporal_client import data_converter
from workflows.ask import Ask
from workflows.contracts import ASK_WORKFLOW, QUERY_TASK_QUEUE, TASK_QUEUE, AskInput, AskResult
from workflows.ingest import IngestAsset, IngestBatch

HISTORIES = Path(__file__).parent / "fixtures" / "histories"
WORKFLOWS = [IngestBatch, IngestAsset, Ask]


def committed_histories() -> list[Path]:
    return sorted(HISTORIES.glob("*.json"))


async def test_committed_histories_replay() -> None:
    paths = committed_histories()
    assert paths, f"no recorded histories under {HISTORIES}"
    replayer = Replayer(workflows=WORKFLOWS, data_converter=data_converter())
    for path in paths:
        history = WorkflowHistory.from_json(path.stem, path.read_text())
        await replayer.replay_workflow(history)


async def test_fresh_ingest_history_replays(
    worker: Workers, client: Client, tenant: str, tmp_path: Path
) -> None:
    write_corpus(tmp_path / "c", per_class=1, seed=99)
    (tmp_path / "c" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    handle = await start_ingest(client, tenant, [str(tmp_path / "c")], batch_size=8)
    result = await asyncio.wait_for(handle.result(), timeout=120)
    assert (result.ingested, result.failed) == (18, 1)
    history = await handle.fetch_history()
    await Replayer(workflows=WORKFLOWS, data_converter=data_converter()).replay_workflow(history)
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
    await Replayer(workflows=WORKFLOWS, data_converter=data_converter()).replay_workflow(history)
    if recorded_as and os.environ.get("MMRAG_RECORD_HISTORIES") == "1":
        (HISTORIES / recorded_as).write_text(history.to_json())
