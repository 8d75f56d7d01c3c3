"""Workflow histories recorded by earlier versions must replay on today's code.

The committed histories under tests/fixtures/histories are the compatibility contract
for running workflows: a change to a workflow that breaks one of them needs
``workflow.patched``. Run with ``MMRAG_RECORD_HISTORIES=1`` to (re)record the fresh one.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from temporalio.client import Client, WorkflowHistory
from temporalio.worker import Replayer

from starters.ingest import start_ingest
from starters.synthetic_corpus import write_corpus
from tests.conftest import Workers
from workers.temporal_client import data_converter
from workflows.ingest import IngestAsset, IngestBatch

HISTORIES = Path(__file__).parent / "fixtures" / "histories"
WORKFLOWS = [IngestBatch, IngestAsset]


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
