"""Workflow versioning: a change to a running workflow type ships behind ``workflow.patched``.

The committed history ``ingest_batch_v1.json`` was recorded before the change below. The
change (check the encoder before anything else, so a model mismatch fails before listing a
bucket) adds an activity at the start of ``IngestBatch``; it is defined here, registered
under the same workflow name, the way it would replace ``workflows/ingest.py``:

- with ``patched()`` the old history replays (old runs keep the old path), and a new run
  records the patch marker and takes the new path;
- without ``patched()`` the same change makes replay of the old history fail with a
  nondeterminism error: in production, every open run of that type would be stuck;
- step 2 of the patch lifecycle (``deprecate_patch``) replays new histories but not old
  ones: it may only ship once no pre-patch run is open (docs/versioning.md, "Replay and changing
  workflows safely").
"""

from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from temporalio import workflow
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHistory
from temporalio.worker import Replayer, Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions
from temporalio.workflow import NondeterminismError

from workflows.activities.ingest import DESCRIBE_ENCODER, EncoderInfo
from workflows.contracts import (
    ENCODE_TASK_QUEUE,
    INGEST_BATCH_WORKFLOW,
    IngestBatchInput,
    IngestResult,
)
from workflows.ingest import ENCODE_RETRY, IngestAsset, IngestBatch

if TYPE_CHECKING:
    from tests.conftest import Workers

V1_HISTORY = Path(__file__).parent / "fixtures" / "histories" / "ingest_batch_v1.json"
PATCH = "check-encoder-first"
# The changed workflows live in this module, which the sandbox re-imports like any workflow
# module (so it imports only what a workflow module may: temporalio, workflows.*, and pytest,
# passed through); test-only imports stay inside the test functions.
RUNNER = SandboxedWorkflowRunner(
    restrictions=SandboxRestrictions.default.with_passthrough_modules("pytest", "_pytest")
)


async def check_encoder() -> EncoderInfo:
    """The new step: ask the encode queue which model it runs, before listing anything."""
    return await workflow.execute_activity(
        DESCRIBE_ENCODER,
        task_queue=ENCODE_TASK_QUEUE,
        start_to_close_timeout=timedelta(minutes=10),
        retry_policy=ENCODE_RETRY,
        result_type=EncoderInfo,
        summary="encoder model (checked first)",
    )


@workflow.defn(name=INGEST_BATCH_WORKFLOW)
class IngestBatchPatched(IngestBatch):
    """Step 1: the change behind ``patched``: new runs check, replaying old runs do not."""

    @workflow.run
    async def run(self, inp: IngestBatchInput) -> IngestResult:
        if workflow.patched(PATCH):
            await check_encoder()
        return await super().run(inp)


@workflow.defn(name=INGEST_BATCH_WORKFLOW)
class IngestBatchUnguarded(IngestBatch):
    """The same change without ``patched``: what must never ship."""

    @workflow.run
    async def run(self, inp: IngestBatchInput) -> IngestResult:
        await check_encoder()
        return await super().run(inp)


@workflow.defn(name=INGEST_BATCH_WORKFLOW)
class IngestBatchDeprecated(IngestBatch):
    """Step 2: every run takes the new path; the marker is still written for old workers."""

    @workflow.run
    async def run(self, inp: IngestBatchInput) -> IngestResult:
        workflow.deprecate_patch(PATCH)
        await check_encoder()
        return await super().run(inp)


def v1_history() -> WorkflowHistory:
    return WorkflowHistory.from_json("ingest-batch-v1", V1_HISTORY.read_text())


async def replay(workflow_class: type, history: WorkflowHistory) -> None:
    from workers.temporal_client import data_converter

    replayer = Replayer(
        workflows=[workflow_class, IngestAsset],
        data_converter=data_converter(),
        workflow_runner=RUNNER,
    )
    await replayer.replay_workflow(history)


async def test_patched_change_replays_the_history_recorded_before_it() -> None:
    await replay(IngestBatchPatched, v1_history())


async def test_the_same_change_without_patched_breaks_replay() -> None:
    with pytest.raises(NondeterminismError, match="(?i)activity"):
        await replay(IngestBatchUnguarded, v1_history())


async def test_deprecated_patch_needs_all_pre_patch_runs_closed() -> None:
    with pytest.raises(NondeterminismError):
        await replay(IngestBatchDeprecated, v1_history())


async def test_new_runs_take_the_patched_path_and_record_the_marker(
    worker: Workers, client: Client, tenant: str, tmp_path: Path
) -> None:
    """A real run of the patched workflow (its own task queue, the real CPU activities in
    this process, the shared encode worker), then replay of its history by each version."""
    from settings import get_settings
    from starters.synthetic_corpus import write_corpus
    from workers.roles import cpu_role

    write_corpus(tmp_path / "c", per_class=1, seed=77)
    queue = f"versioning-{uuid.uuid4().hex[:8]}"
    content = cpu_role(get_settings())
    async with Worker(
        client,
        task_queue=queue,
        workflows=[IngestBatchPatched],
        activities=list(content.activities),
        activity_executor=ThreadPoolExecutor(4),
        workflow_runner=RUNNER,
    ):
        handle = await client.start_workflow(
            INGEST_BATCH_WORKFLOW,
            IngestBatchInput(tenant=tenant, sources=[(tmp_path / "c").as_uri()], batch_size=18),
            id=f"versioning/{tenant}",
            task_queue=queue,
            result_type=IngestResult,
        )
        result = await asyncio.wait_for(handle.result(), timeout=120)
    assert result.ingested == 18
    history = await handle.fetch_history()
    markers = [e for e in history.events if e.event_type == EventType.EVENT_TYPE_MARKER_RECORDED]
    assert markers and markers[0].marker_recorded_event_attributes.marker_name == "core_patch"
    scheduled = [
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]
    assert scheduled[0] == DESCRIBE_ENCODER  # the new path ran first
    await replay(IngestBatchPatched, history)
    await replay(IngestBatchDeprecated, history)
    # Rolling back to the pre-patch code is not safe once patched runs exist.
    with pytest.raises(NondeterminismError):
        await replay(IngestBatch, history)
