"""Faults in the middle of work: each server restarted during a batch ingest and during
asks, a worker stopped with SIGTERM or killed with SIGKILL in the middle of an activity, an
encode queue nobody serves. Counts must come out exact: lost = 0, duplicated = 0."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import psutil
import pytest
from temporalio.api.enums.v1 import EventType, PendingActivityState
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ActivityError, TimeoutError, TimeoutType

from starters.ask import ask
from starters.background import WorkerProcess
from starters.ingest import start_ingest
from starters.lifecycle import start_forget, start_reindex
from starters.synthetic_corpus import CLASSES, caption_for, write_corpus
from tests.conftest import ServerStack, Workers
from tests.helpers import (
    assets_locked,
    audit_counts,
    milvus_pks,
    registry_rows,
    wait_searchable,
)
from tests.llm_server import LlmTestServer
from workflows.activities.ask import ENCODE_QUERY, GENERATE
from workflows.activities.ingest import RECORD_OUTCOMES
from workflows.activities.lifecycle import FORGET_PAGE
from workflows.contracts import (
    ASK_WORKFLOW,
    ENCODE_TASK_QUEUE,
    GENERATE_TASK_QUEUE,
    QUERY_TASK_QUEUE,
    TASK_QUEUE,
    AskInput,
    AskResult,
    ForgetInput,
    ReindexInput,
)


async def wait_for_progress(handle, at_least: int) -> None:  # type: ignore[no-untyped-def]
    for _ in range(1500):
        progress = await handle.query("progress")
        if progress["ingested"] >= at_least:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the ingest made no progress")


async def wait_started(handle: WorkflowHandle, activity_type: str, timeout: float = 90) -> None:  # type: ignore[type-arg]
    """Until ``activity_type`` of this workflow runs on a worker (picked up, not finished)."""
    started = PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
    for _ in range(int(timeout / 0.1)):
        description = await handle.describe()
        for pending in description.raw_description.pending_activities:
            if pending.activity_type.name == activity_type and pending.state == started:
                return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{activity_type} never started")


async def retried_after_heartbeat_timeout(handle: WorkflowHandle, activity_type: str) -> bool:  # type: ignore[type-arg]
    """Whether an attempt of ``activity_type`` was retried because its heartbeats stopped
    (its worker died), not after its start-to-close timeout of minutes."""
    scheduled: dict[int, str] = {}
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            attrs = event.activity_task_scheduled_event_attributes
            scheduled[event.event_id] = attrs.activity_type.name
        elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            started = event.activity_task_started_event_attributes
            timeout = started.last_failure.timeout_failure_info.timeout_type
            if (
                scheduled.get(started.scheduled_event_id) == activity_type
                and started.attempt >= 2
                and timeout == TimeoutType.HEARTBEAT
            ):
                return True
    return False


async def kill_and_replace(test_stack: ServerStack, workers: Workers, role: str) -> None:
    """SIGKILL the shared ``role`` worker and start a replacement with the same environment,
    as a supervisor (systemd, Kubernetes) would; later tests use the replacement."""
    victim: WorkerProcess = getattr(workers, role)
    env = psutil.Process(victim.proc.pid).environ()
    env.pop("MMRAG_METRICS_PORT", None)  # the replacement gets a port of its own
    victim.kill()
    setattr(workers, role, await asyncio.to_thread(test_stack.start_worker, role, **env))


def assert_exact(tenant: str, n: int) -> None:
    pks = milvus_pks(tenant)
    assert len(pks) == len(set(pks)) == n, "lost or duplicated vectors"
    assert len(registry_rows(tenant)) == n
    assert audit_counts(tenant) == {"asset.ingest": n}


async def test_sigterm_encode_worker_finishes_its_batch(
    test_stack: ServerStack, worker: Workers, client: Client, tmp_path: Path
) -> None:
    tenant = f"sigterm-{uuid.uuid4().hex[:6]}"
    write_corpus(tmp_path / "c", per_class=10, seed=23, size=256)  # 180 images
    worker.encode.stop()
    victim = test_stack.start_worker("encode")
    handle = await start_ingest(client, tenant, [str(tmp_path / "c")], batch_size=30)
    await wait_for_progress(handle, 30)
    code = await asyncio.to_thread(victim.stop, 30)  # SIGTERM: graceful shutdown
    assert code == 0, victim.tail()
    worker.encode = test_stack.start_worker("encode")
    result = await asyncio.wait_for(handle.result(), timeout=180)
    assert (result.ingested, result.failed) == (180, 0)
    assert_exact(tenant, 180)


@pytest.mark.parametrize("server", ["postgres", "temporal", "milvus"])
async def test_server_restart_mid_ingest_loses_nothing(
    test_stack: ServerStack, worker: Workers, client: Client, tmp_path: Path, server: str
) -> None:
    tenant = f"restart-{server}-{uuid.uuid4().hex[:6]}"
    write_corpus(tmp_path / "c", per_class=8, seed=29, size=192)  # 144 images
    handle = await start_ingest(client, tenant, [str(tmp_path / "c")], batch_size=16)
    await wait_for_progress(handle, 16)
    await asyncio.to_thread(test_stack.stack.stop_service, server)
    await asyncio.sleep(2)
    await asyncio.to_thread(test_stack.stack.start_service, server)
    result = await asyncio.wait_for(handle.result(), timeout=300)
    assert (result.ingested, result.failed) == (144, 0), result.failures[:3]
    assert_exact(tenant, 144)
    assert worker.alive(), "workers must reconnect by themselves"
    # Queries work again after the restart.
    wait_searchable(tenant, 144)
    answer = await ask(client, AskInput(tenant, text="a red circle", generate=False))
    assert answer.sources


@pytest.mark.parametrize("server", ["temporal", "postgres", "milvus"])
async def test_asks_in_flight_finish_after_a_server_restart(
    test_stack: ServerStack, worker: Workers, client: Client, tmp_path: Path, server: str
) -> None:
    """Asks started before a server stops (and, for Milvus, while it is down) complete once
    it is back, each with the right top source: none is lost."""
    tenant = f"ask-restart-{server}-{uuid.uuid4().hex[:6]}"
    write_corpus(tmp_path / "c", per_class=1, seed=31)
    ingest = await start_ingest(client, tenant, [str(tmp_path / "c")])
    await asyncio.wait_for(ingest.result(), timeout=120)
    wait_searchable(tenant, 18)
    classes = [CLASSES[i % len(CLASSES)] for i in range(0, 24, 3)]

    async def start(colour: str, shape: str) -> WorkflowHandle[object, AskResult]:
        return await client.start_workflow(
            ASK_WORKFLOW,
            AskInput(tenant, text=caption_for(colour, shape), generate=False),
            id=f"ask-restart-{server}-{uuid.uuid4().hex}",
            task_queue=TASK_QUEUE,
            result_type=AskResult,
        )

    asked = list(classes)
    handles = [await start(*c) for c in classes]
    await asyncio.to_thread(test_stack.stack.stop_service, server)
    try:  # whatever fails here, the server comes back for the tests after this one
        if server == "milvus":
            asked += classes[:4]
            handles += [await start(*c) for c in classes[:4]]  # started during the outage
        else:
            await asyncio.sleep(1)
    finally:
        await asyncio.to_thread(test_stack.stack.start_service, server)
    results = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), timeout=120)
    for (colour, shape), result in zip(asked, results, strict=True):
        top = result.sources[0].uri.rsplit("/", 1)[-1]
        assert top.startswith(f"{colour}-{shape}-"), (colour, shape, top)
    assert worker.alive()


async def kill_mid_answer(
    test_stack: ServerStack,
    workers: Workers,
    client: Client,
    llm: LlmTestServer,
    corpus: Path,
    role: str,
    queue: str,
    colour: str,
    shape: str,
) -> WorkflowHandle:  # type: ignore[type-arg]
    """Ingest a corpus, start an Ask on ``queue`` and SIGKILL the ``role`` worker (replaced at
    once) while the slowed LLM has the request; checks the Ask answers right, audited once."""
    tenant = f"kill-{role}-{uuid.uuid4().hex[:6]}"
    write_corpus(corpus, per_class=1, seed=37)
    ingest = await start_ingest(client, tenant, [str(corpus)])
    await asyncio.wait_for(ingest.result(), timeout=120)
    wait_searchable(tenant, 18)
    before = llm.request_count
    llm.set_mode("slow", delay=1.5)
    try:
        handle = await client.start_workflow(
            ASK_WORKFLOW,
            AskInput(tenant, text=caption_for(colour, shape)),
            id=f"kill-{role}-{uuid.uuid4().hex}",
            task_queue=queue,
            result_type=AskResult,
        )
        await wait_started(handle, GENERATE)
        for _ in range(300):  # until the LLM has the request
            if llm.request_count > before:
                break
            await asyncio.sleep(0.02)
        await kill_and_replace(test_stack, workers, role)
    finally:
        llm.set_mode("ok")
    result = await asyncio.wait_for(handle.result(), timeout=120)
    assert (result.answer_kind, result.degraded) == ("generated", False), result.answer
    assert result.sources[0].uri.rsplit("/", 1)[-1].startswith(f"{colour}-{shape}-")
    assert audit_counts(tenant)["query.ask"] == 1
    assert workers.alive()
    return handle


async def test_sigkill_generate_worker_mid_answer(
    test_stack: ServerStack, worker: Workers, client: Client, llm: LlmTestServer, tmp_path: Path
) -> None:
    """The generate worker dies while the LLM is answering: the replacement answers the same
    Ask, which is audited once."""
    await kill_mid_answer(
        test_stack, worker, client, llm, tmp_path / "c", "generate", TASK_QUEUE, "blue", "square"
    )


async def test_sigkill_query_worker_mid_ask(
    test_stack: ServerStack, worker: Workers, client: Client, llm: LlmTestServer, tmp_path: Path
) -> None:
    """The query worker, which holds an Ask on mmrag-query in its cache, dies while the LLM
    answers: the replacement replays the history (query encoded locally, recorded by its
    marker) without a nondeterminism error and finishes the Ask, audited once."""
    handle = await kill_mid_answer(
        test_stack,
        worker,
        client,
        llm,
        tmp_path / "c",
        "query",
        QUERY_TASK_QUEUE,
        "red",
        "triangle",
    )
    events = (await handle.fetch_history()).events
    assert EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED not in [e.event_type for e in events]
    queues = [
        e.activity_task_scheduled_event_attributes.task_queue.name
        for e in events
        if e.HasField("activity_task_scheduled_event_attributes")
    ]
    assert ENCODE_TASK_QUEUE not in queues and queues.count(GENERATE_TASK_QUEUE) == 1


async def test_sigkill_cpu_worker_mid_reindex(
    test_stack: ServerStack, worker: Workers, client: Client, tmp_path: Path
) -> None:
    """The cpu worker (workflows and registry writes) dies while an incremental re-index
    records a batch: the replacement finishes it; each asset is re-embedded and audited once."""
    tenant = f"kill-reindex-{uuid.uuid4().hex[:6]}"
    files = write_corpus(tmp_path / "c", per_class=2, seed=41)  # 36 images
    ingest = await start_ingest(client, tenant, [str(tmp_path / "c")])
    assert (await asyncio.wait_for(ingest.result(), timeout=120)).ingested == 36
    for path, _caption in files:  # a new generation of every object
        path.touch()
    with assets_locked(tenant):  # the first batch's registry write waits here
        handle = await start_reindex(
            client,
            ReindexInput(mode="incremental", tenant=tenant, batch_size=4, max_concurrent_batches=1),
        )
        await wait_started(handle, RECORD_OUTCOMES)
        await kill_and_replace(test_stack, worker, "cpu")
    result = await asyncio.wait_for(handle.result(), timeout=180)
    assert (result.embedded, result.failed) == (36, 0)
    assert await retried_after_heartbeat_timeout(handle, RECORD_OUTCOMES)
    pks = milvus_pks(tenant)
    assert len(pks) == len(set(pks)) == 36, "lost or duplicated vectors"
    generations = {r.uri: r.generation for r in registry_rows(tenant)}
    assert len(generations) == 36
    for path, _caption in files:
        assert generations[path.resolve().as_uri()].startswith(str(path.stat().st_mtime_ns))
    assert audit_counts(tenant) == {"asset.ingest": 72}  # ingest + re-index, once each
    assert worker.alive()


async def test_sigkill_cpu_worker_mid_forget(
    test_stack: ServerStack, worker: Workers, client: Client, tmp_path: Path
) -> None:
    """The cpu worker dies in the middle of a Forget page (vectors deleted, tombstones not
    yet written): the retried page finishes it with one tombstone per asset."""
    tenant = f"kill-forget-{uuid.uuid4().hex[:6]}"
    write_corpus(tmp_path / "c", per_class=2, seed=43)  # 36 images
    ingest = await start_ingest(client, tenant, [str(tmp_path / "c")])
    assert (await asyncio.wait_for(ingest.result(), timeout=120)).ingested == 36
    prefix = (tmp_path / "c").resolve().as_uri()
    with assets_locked(tenant):  # the page's registry update waits here
        handle = await start_forget(client, ForgetInput(tenant, uri_prefix=prefix, reason="t-8"))
        await wait_started(handle, FORGET_PAGE)
        await kill_and_replace(test_stack, worker, "cpu")
    result = await asyncio.wait_for(handle.result(), timeout=120)
    assert result.forgotten == 36
    assert await retried_after_heartbeat_timeout(handle, FORGET_PAGE)
    assert milvus_pks(tenant) == []
    assert {r.status for r in registry_rows(tenant)} == {"forgotten"}
    assert audit_counts(tenant) == {"asset.ingest": 36, "asset.forget": 36}
    assert worker.alive()


async def test_unserved_encode_queue_fails_an_ask_fast_and_retryably(
    test_stack: ServerStack, worker: Workers, client: Client
) -> None:
    """No encode worker polls (all dead or busy): the Ask fails with a ScheduleToStart
    timeout of its encode step after ``encode_schedule_to_start_s``, not a silent wait;
    the same Ask succeeds once a worker is back."""
    tenant = f"no-encoder-{uuid.uuid4().hex[:6]}"
    query = AskInput(tenant, text="a red circle", generate=False, encode_schedule_to_start_s=2)
    await asyncio.to_thread(worker.encode.stop, 30)
    try:
        with pytest.raises(WorkflowFailureError) as failure:
            await asyncio.wait_for(ask(client, query), timeout=60)
    finally:
        worker.encode = await asyncio.to_thread(test_stack.start_worker, "encode")
    step = failure.value.cause
    assert isinstance(step, ActivityError) and step.activity_type == ENCODE_QUERY, step
    assert isinstance(step.cause, TimeoutError), step.cause
    assert step.cause.type == TimeoutType.SCHEDULE_TO_START
    retried = await asyncio.wait_for(ask(client, query), timeout=60)
    assert retried.answer_kind == "none"  # a tenant with nothing ingested, answered
