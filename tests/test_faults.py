"""Faults in the middle of work: each server restarted during a batch ingest, a worker
stopped with SIGTERM. Counts must come out exact: lost = 0, duplicated = 0."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from temporalio.client import Client

from starters.ask import ask
from starters.ingest import start_ingest
from starters.synthetic_corpus import write_corpus
from tests.conftest import ServerStack, Workers
from tests.helpers import audit_counts, milvus_pks, registry_rows, wait_searchable
from workflows.contracts import AskInput


async def wait_for_progress(handle, at_least: int) -> None:  # type: ignore[no-untyped-def]
    for _ in range(1500):
        progress = await handle.query("progress")
        if progress["ingested"] >= at_least:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the ingest made no progress")


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


@pytest.mark.parametrize("server", ["temporal", "postgres"])
async def test_asks_in_flight_finish_after_a_server_restart(
    test_stack: ServerStack, worker: Workers, client: Client, tmp_path: Path, server: str
) -> None:
    """Asks started just before a server stops complete once it is back: none is lost."""
    tenant = f"ask-restart-{server}-{uuid.uuid4().hex[:6]}"
    write_corpus(tmp_path / "c", per_class=1, seed=31)
    ingest = await start_ingest(client, tenant, [str(tmp_path / "c")])
    await asyncio.wait_for(ingest.result(), timeout=120)
    wait_searchable(tenant, 18)
    from workflows.contracts import ASK_WORKFLOW, TASK_QUEUE, AskResult

    handles = [
        await client.start_workflow(
            ASK_WORKFLOW,
            AskInput(tenant, text=f"a red circle number {i}", generate=False),
            id=f"ask-restart-{server}-{uuid.uuid4().hex}",
            task_queue=TASK_QUEUE,
            result_type=AskResult,
        )
        for i in range(8)
    ]
    await asyncio.to_thread(test_stack.stack.stop_service, server)
    await asyncio.sleep(1)
    await asyncio.to_thread(test_stack.stack.start_service, server)
    results = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), timeout=120)
    assert all(r.sources for r in results)
    assert worker.alive()
