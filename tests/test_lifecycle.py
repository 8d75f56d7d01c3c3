"""Re-index with zero downtime, rollback, incremental re-index, Forget, Schedules and
WatchPrefix, against the real servers (GCS events: tests/test_events.py)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from temporalio.client import Client, WorkflowHandle

from activities.store import index_versions, registry
from starters.ask import ask
from starters.ingest import start_ingest
from starters.lifecycle import (
    create_schedule,
    list_schedules,
    schedule_id,
    start_forget,
    start_reindex,
    start_watch,
)
from starters.synthetic_corpus import CLASSES, caption_for, render, write_corpus
from tests.conftest import ServerStack, Workers
from tests.helpers import (
    assert_replays,
    audit_events,
    engine,
    grant_root,
    milvus_pks,
    registry_rows,
    store,
    wait_searchable,
)
from workflows.contracts import (
    QUERY_TASK_QUEUE,
    TASK_QUEUE,
    AskFilters,
    AskInput,
    ForgetInput,
    IngestResult,
    ReindexInput,
    ReindexProgress,
    ReindexResult,
    WatchPrefixInput,
    asset_id_for,
)

PHASES = ["preparing", "embedding", "verifying", "swapping", "done"]  # ReindexProgress.phase


async def ingest(client: Client, tenant: str, sources: list[str], **kw) -> IngestResult:  # type: ignore[no-untyped-def]
    handle = await start_ingest(client, tenant, sources, **kw)
    return await asyncio.wait_for(handle.result(), timeout=180)


def pks_in(collection: str, tenant: str) -> set[str]:
    rows = store().client.query(
        collection,
        filter=f'tenant == "{tenant}"',
        output_fields=["pk"],
        consistency_level="Strong",
        limit=16384,
    )
    return {r["pk"] for r in rows}


class Shared:
    tenant = f"life-{uuid.uuid4().hex[:6]}"
    late_asset = ""
    victim_asset = ""
    corpus: Path = Path()
    versions: tuple[int, int] = (0, 0)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def corpus(
    worker: Workers, client: Client, tmp_path_factory: pytest.TempPathFactory
) -> type[Shared]:
    root = tmp_path_factory.mktemp("life")
    write_corpus(root / "main", per_class=2, seed=51)
    result = await ingest(client, Shared.tenant, [str(root / "main")])
    assert result.ingested == 36
    wait_searchable(Shared.tenant, 36)
    Shared.corpus = root
    return Shared


@dataclass
class AskRecord:
    """One Ask of the query loops: when it ran (monotonic seconds) and what it answered."""

    started: float
    ended: float
    index_version: int = 0
    sources: int = 0
    error: str = ""


async def ask_until(
    client: Client, tenant: str, queue: str, stop: asyncio.Event, records: list[AskRecord]
) -> None:
    """Ask one caption after another on ``queue`` until ``stop``; every Ask is recorded,
    failures included."""
    rng = random.Random(queue)
    while not stop.is_set():
        colour, shape = rng.choice(CLASSES)
        started = time.monotonic()
        try:
            result = await ask(
                client,
                AskInput(tenant, text=caption_for(colour, shape), generate=False, top_k=3),
                task_queue=queue,
            )
            records.append(
                AskRecord(started, time.monotonic(), result.index_version, len(result.sources))
            )
        except Exception as e:  # every failure counts
            records.append(AskRecord(started, time.monotonic(), error=repr(e)))


@dataclass
class ProgressSnapshot:
    at: float  # monotonic seconds when the answer arrived
    progress: ReindexProgress


async def watch_progress(
    handle: WorkflowHandle[Any, ReindexResult], result: asyncio.Future[ReindexResult]
) -> list[ProgressSnapshot]:
    """The Reindex ``progress`` query, asked over and over until the run ends."""
    seen: list[ProgressSnapshot] = []
    while not result.done():
        progress = await handle.query("progress", result_type=ReindexProgress)
        seen.append(ProgressSnapshot(time.monotonic(), progress))
        await asyncio.sleep(0.05)
    return seen


def finished_at(task: asyncio.Future[Any]) -> list[float]:
    """A list that receives the monotonic time at which ``task`` completes."""
    when: list[float] = []
    task.add_done_callback(lambda _: when.append(time.monotonic()))
    return when


# Asks that must be answered while the new version is being built and swapped in, counted
# only from those that started after it began and ended before the run finished. The run
# embeds in batches of 4, one at a time, so it lasts seconds: the three query loops answered
# ~95 Asks in it on 2 cores with two CPU-bound processes beside, and 0 when Asks waited for
# the swap (the old test's `asks >= 5` over the whole test passed either way).
MIN_ASKS_DURING_REINDEX = 10


async def test_full_reindex_changes_model_and_dimension_with_zero_downtime(
    corpus: type[Shared], client: Client
) -> None:
    """Asks on both queues keep being answered, none failed or empty, from the first page of
    the new version being built until the alias swap, and after it from the new version;
    the ``progress`` query follows the run through its phases."""
    tenant = corpus.tenant
    before = registry.active_index(engine())
    assert before is not None and before.dim == 64
    late = corpus.corpus / "late"
    late.mkdir()
    render("red", "circle", random.Random(5)).save(late / "late-red-circle.png")
    corpus.late_asset = asset_id_for(tenant, (late / "late-red-circle.png").resolve().as_uri())
    victim = (corpus.corpus / "main" / "blue-square-000.png").resolve().as_uri()
    corpus.victim_asset = asset_id_for(tenant, victim)

    stop = asyncio.Event()
    records: list[AskRecord] = []
    loops = [
        asyncio.create_task(ask_until(client, tenant, queue, stop, records))
        for queue in (TASK_QUEUE, QUERY_TASK_QUEUE, TASK_QUEUE)
    ]
    handle = await start_reindex(
        client,
        ReindexInput(mode="full", model="mmrag-tiny-wide", batch_size=4, max_concurrent_batches=1),
    )
    result_task = asyncio.ensure_future(handle.result())
    ended = finished_at(result_task)
    progress_task = asyncio.create_task(watch_progress(handle, result_task))
    # An ingest and a forget while the re-index runs: both must be right in the new version.
    await ingest(client, tenant, [str(late)])
    forget = await start_forget(
        client, ForgetInput(tenant, asset_id=corpus.victim_asset, reason="t-1")
    )
    await asyncio.wait_for(forget.result(), timeout=60)
    result = await asyncio.wait_for(result_task, timeout=300)
    snapshots = await progress_task
    await asyncio.sleep(3)  # queries keep running across the swap and the alias cache expiry
    stop.set()
    await asyncio.gather(*loops)

    failed = [r for r in records if r.error or not r.sources]
    assert failed == [], (len(failed), failed[:3])
    # The run was building from the first page it counted until it returned.
    counted = [s.at for s in snapshots if s.progress.total > 0]
    assert counted, [s.progress for s in snapshots]
    building = counted[0]
    during = [r for r in records if building <= r.started and r.ended <= ended[0]]
    assert len(during) >= MIN_ASKS_DURING_REINDEX, (len(during), len(records))
    assert before.version in {r.index_version for r in during}  # the old version served
    # Every Ask was answered by the old version or the new one, and both answered.
    assert {r.index_version for r in records} == {before.version, result.index_version}

    phases = [s.progress.phase for s in snapshots]
    assert "embedding" in phases and phases == sorted(phases, key=PHASES.index), set(phases)
    dones = [s.progress.done for s in snapshots]
    assert dones == sorted(dones) and any(0 < d < result.embedded for d in dones), dones
    final = await handle.query("progress", result_type=ReindexProgress)
    assert (final.phase, final.target_version) == ("done", result.index_version)
    assert (final.done, final.failed) == (result.embedded + result.failed, result.failed)
    # Its history replays on today's code (and is the committed full Reindex one).
    await assert_replays(await handle.fetch_history(), "reindex_full_v1.json")
    assert result.swapped and result.previous_version == before.version
    after = registry.active_index(engine())
    assert after is not None and after.version == result.index_version and after.dim == 96
    corpus.versions = (before.version, after.version)
    new_pks = pks_in(after.collection, tenant)
    assert f"{corpus.late_asset}:image" in new_pks
    assert f"{corpus.victim_asset}:image" not in new_pks
    assert len(new_pks) == 36  # 36 + late - victim
    live = [r for r in registry_rows(tenant) if r.status == "ingested"]
    assert len(live) == 36 and {r.index_version for r in live} == {after.version}

    fresh = await ask(client, AskInput(tenant, text="a red circle", generate=False))
    assert fresh.encoder_model == "mmrag-tiny-wide" and fresh.index_version == after.version
    gone = await ask(
        client,
        AskInput(
            tenant, text="x", generate=False, filters=AskFilters(asset_ids=[corpus.victim_asset])
        ),
    )
    assert gone.sources == []


async def test_rollback_restores_the_previous_version_with_every_write(
    corpus: type[Shared], client: Client
) -> None:
    old, new = corpus.versions
    assert old and new, "runs after the full re-index test"
    handle = await start_reindex(client, ReindexInput(mode="rollback", grace_period_hours=0))
    result = await asyncio.wait_for(handle.result(), timeout=60)
    assert (result.index_version, result.previous_version) == (old, new)
    await assert_replays(await handle.fetch_history(), "reindex_rollback_v1.json")
    active = registry.active_index(engine())
    assert active is not None and active.version == old and active.dim == 64
    pks = pks_in(active.collection, corpus.tenant)
    assert f"{corpus.late_asset}:image" in pks  # ingested while v-old was active
    assert f"{corpus.victim_asset}:image" not in pks  # forgotten in every version
    await asyncio.sleep(2.5)  # the encoders' alias cache
    answer = await ask(
        client, AskInput(corpus.tenant, text="a red circle on a white background", generate=False)
    )
    assert answer.encoder_model == "mmrag-tiny"
    assert answer.sources[0].uri.rsplit("/", 1)[-1].startswith(("red-circle-", "late-red-circle"))


async def test_incremental_reindex_picks_up_changed_objects(
    corpus: type[Shared], client: Client
) -> None:
    path = corpus.corpus / "main" / "green-circle-001.png"
    render("yellow", "triangle", random.Random(3)).save(path)
    os.utime(path, ns=(1, 2 * 10**18))
    before = audit_events(corpus.tenant)
    handle = await start_reindex(client, ReindexInput(mode="incremental", tenant=corpus.tenant))
    result = await asyncio.wait_for(handle.result(), timeout=120)
    assert (result.embedded, result.failed, result.swapped) == (1, 0, False)
    row = next(r for r in registry_rows(corpus.tenant) if r.uri == path.resolve().as_uri())
    assert row.generation.startswith(str(2 * 10**18))
    new_events = [e for e in audit_events(corpus.tenant) if e.id not in {b.id for b in before}]
    assert [e.action for e in new_events] == ["asset.ingest"]
    # Nothing changed since: a second run re-embeds nothing.
    again = await start_reindex(client, ReindexInput(mode="incremental", tenant=corpus.tenant))
    assert (await asyncio.wait_for(again.result(), timeout=120)).embedded == 0


async def test_reindex_progress_counts_up_to_the_totals(
    worker: Workers, client: Client, tmp_path: Path
) -> None:
    """`mmrag reindex --wait` shows the ``progress`` query: done and failed move while the
    run embeds, never backwards, and end equal to the run's totals."""
    tenant = f"progress-{uuid.uuid4().hex[:6]}"
    files = [path for path, _ in write_corpus(tmp_path / "p", per_class=1, seed=81)]
    assert (await ingest(client, tenant, [str(tmp_path / "p")])).ingested == 18
    changed = files[:12]  # a new generation each; the first one no longer decodes
    changed[0].write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    for path in changed:
        os.utime(path, ns=(1, 3 * 10**18))
    handle = await start_reindex(
        client,
        ReindexInput(mode="incremental", tenant=tenant, batch_size=1, max_concurrent_batches=1),
    )
    result_task = asyncio.ensure_future(handle.result())
    snapshots = [s.progress for s in await watch_progress(handle, result_task)]
    result = await asyncio.wait_for(result_task, timeout=120)
    assert (result.embedded, result.failed) == (11, 1)

    assert snapshots and all(p.mode == "incremental" and p.tenant == tenant for p in snapshots)
    for counts in ([p.done for p in snapshots], [p.failed for p in snapshots]):
        assert counts == sorted(counts), counts  # never backwards
    assert {p.total for p in snapshots if p.total} == {18}
    moving = {p.done for p in snapshots if 0 < p.done < 18}
    assert len(moving) >= 2, [p.done for p in snapshots]  # seen part way, more than once
    final = await handle.query("progress", result_type=ReindexProgress)
    assert (final.done, final.total, final.failed) == (18, 18, result.failed)
    assert final.phase == "done"
    assert final.done == 6 + result.embedded + result.failed  # 6 unchanged
    assert final.rate_per_s > 0 and final.eta_s == 0


def test_overlapping_reindexes_of_one_scope_are_refused(test_stack) -> None:  # type: ignore[no-untyped-def]
    eng = engine()
    t = f"lock-{uuid.uuid4().hex[:6]}"
    index_versions.begin_run(eng, f"w1-{t}", t, "incremental", 1)
    index_versions.begin_run(eng, f"w1-{t}", t, "incremental", 1)  # idempotent for the same run
    with pytest.raises(index_versions.ReindexConflict, match="already running"):
        index_versions.begin_run(eng, f"w2-{t}", t, "incremental", 1)
    with pytest.raises(index_versions.ReindexConflict):
        index_versions.begin_run(eng, f"w3-{t}", "*", "full", 1)
    index_versions.begin_run(eng, f"w4-{t}", t + "-other", "incremental", 1)
    index_versions.finish_run(eng, f"w1-{t}", "succeeded")
    index_versions.finish_run(eng, f"w4-{t}", "succeeded")
    index_versions.begin_run(eng, f"w5-{t}", t, "incremental", 1)
    index_versions.finish_run(eng, f"w5-{t}", "succeeded")


async def test_forget_removes_everywhere_and_blocks_reingest(
    worker: Workers, client: Client, tmp_path: Path
) -> None:
    tenant = f"forget-{uuid.uuid4().hex[:6]}"
    write_corpus(tmp_path / "p", per_class=1, seed=61)
    await ingest(client, tenant, [str(tmp_path / "p")], tags={"person": "jane"})
    write_corpus(tmp_path / "q", per_class=1, seed=62)
    await ingest(client, tenant, [str(tmp_path / "q")])
    target = (tmp_path / "q" / "red-circle-000.png").resolve()
    asset_id = asset_id_for(tenant, target.as_uri())

    reason = "GDPR ticket 42 from jane.doe@example.com"
    one = await start_forget(
        client, ForgetInput(tenant, asset_id=asset_id, reason=reason, delete_object=True)
    )
    result = await asyncio.wait_for(one.result(), timeout=60)
    assert (result.forgotten, result.objects_deleted) == (1, 1)
    assert not target.exists()
    assert f"{asset_id}:image" not in milvus_pks(tenant)
    row = next(r for r in registry_rows(tenant) if r.asset_id == asset_id)
    assert (row.status, row.uri, row.tags) == ("forgotten", "", {})
    tombstones = [e for e in audit_events(tenant) if e.action == "asset.forget"]
    assert len(tombstones) == 1 and tombstones[0].uri == ""
    assert "jane.doe@example.com" not in json.dumps(tombstones[0].details)

    # Idempotent: again, nothing new is written.
    again = await start_forget(client, ForgetInput(tenant, asset_id=asset_id, reason=reason))
    await asyncio.wait_for(again.result(), timeout=60)
    assert len([e for e in audit_events(tenant) if e.action == "asset.forget"]) == 1

    # By metadata: every asset tagged person=jane; a re-ingest skips them unless allowed.
    by_tag = await start_forget(
        client, ForgetInput(tenant, tags={"person": "jane"}, reason="ticket 43")
    )
    assert (await asyncio.wait_for(by_tag.result(), timeout=60)).forgotten == 18
    assert len(milvus_pks(tenant)) == 17
    skipped = await ingest(client, tenant, [str(tmp_path / "p")], tags={"person": "jane"})
    assert (skipped.ingested, skipped.skipped) == (0, 18)
    assert len(milvus_pks(tenant)) == 17
    back = await ingest(client, tenant, [str(tmp_path / "p")], allow_forgotten=True)
    assert back.ingested == 18 and len(milvus_pks(tenant)) == 35


async def test_schedules_create_list_trigger_pause_delete(
    worker: Workers, client: Client, tmp_path: Path
) -> None:
    tenant = f"sched-{uuid.uuid4().hex[:6]}"
    write_corpus(tmp_path / "s", per_class=1, seed=71)
    await ingest(client, tenant, [str(tmp_path / "s")])
    handle = await create_schedule(client, "incremental", tenant, cron="0 3 * * *", paused=True)
    try:
        rows = {r.id: r for r in await list_schedules(client)}
        assert handle.id == schedule_id("incremental", tenant)
        for _ in range(50):  # list_schedules is eventually consistent
            if handle.id in rows:
                break
            await asyncio.sleep(0.2)
            rows = {r.id: r for r in await list_schedules(client)}
        assert rows[handle.id].paused
        await handle.trigger()
        workflow_id = ""
        for _ in range(100):
            desc = await handle.describe()
            if desc.info.recent_actions:
                workflow_id = desc.info.recent_actions[-1].action.workflow_id
                break
            await asyncio.sleep(0.2)
        assert workflow_id.startswith(f"reindex/incremental/{tenant}/scheduled")
        result = await asyncio.wait_for(
            client.get_workflow_handle(workflow_id).result(), timeout=60
        )
        assert result["tenant"] == tenant and result["failed"] == 0
        await handle.unpause()
        assert not (await handle.describe()).schedule.state.paused
    finally:
        await handle.delete()
    with pytest.raises(Exception, match="not found"):
        await handle.describe()


async def test_watch_prefix_ingests_only_new_objects(
    worker: Workers, client: Client, tmp_path: Path, test_stack: ServerStack
) -> None:
    tenant = f"watch-{uuid.uuid4().hex[:6]}"
    gcs = storage.Client(project="test", credentials=AnonymousCredentials())
    bucket = gcs.create_bucket(f"wp-{uuid.uuid4().hex[:8]}")
    grant_root(test_stack.state_dir, tenant, f"gs://{bucket.name}/")
    files = write_corpus(tmp_path / "w", per_class=1, seed=91)
    for path, _ in files[:3]:
        bucket.blob(f"cam/{path.name}").upload_from_filename(str(path))
    prefix = f"gs://{bucket.name}/cam/"
    first = await start_watch(client, WatchPrefixInput(tenant, prefix, interval_s=0))
    r1 = await asyncio.wait_for(first.result(), timeout=60)
    assert (r1.ingested, r1.unchanged) == (3, 0)
    bucket.blob(f"cam/{files[3][0].name}").upload_from_filename(str(files[3][0]))
    second = await start_watch(client, WatchPrefixInput(tenant, prefix, interval_s=0))
    r2 = await asyncio.wait_for(second.result(), timeout=60)
    assert (r2.ingested, r2.unchanged) == (1, 3)


def test_reconciliation_sees_rows_inserted_a_moment_before(
    test_stack: object, monkeypatch: pytest.MonkeyPatch, tenant: str
) -> None:
    """Re-index reconciliation reads (tenant, asset) -> generation; a read that missed the
    latest insert (pymilvus's query_iterator on Milvus 2.3 did) would re-encode or drop it."""
    import numpy as np

    from activities.store import vectors
    from activities.store.vectors import ChunkRow

    monkeypatch.setattr(vectors, "GENERATION_PAGE", 3)  # several pages of 3 rows
    s = store()
    collection = f"mmrag_gen_{uuid.uuid4().hex[:8]}"
    s.ensure_collection(collection, 8)
    try:
        expected: dict[tuple[str, str], str] = {}
        for round_ in range(3):
            rows = [
                ChunkRow(
                    f"a{round_}-{i}",
                    t,
                    "file:///x.png",
                    "image/png",
                    "image",
                    1,
                    generation=f"g{i}",
                )
                for i, t in enumerate([tenant, tenant, tenant, "other-" + tenant])
            ]
            vecs = np.random.default_rng(round_).random((len(rows), 8), dtype=np.float32)
            s.replace_assets(collection, tenant, [r.asset_id for r in rows], rows, vecs)
            expected.update({(r.tenant, r.asset_id): r.generation for r in rows})
            assert s.asset_generations(collection) == expected  # read right after the insert
            mine = {k: v for k, v in expected.items() if k[0] == tenant}
            assert s.asset_generations(collection, tenant) == mine
    finally:
        s.drop(collection)


def test_a_missing_alias_reads_as_nothing_indexed(test_stack: object) -> None:
    """encode_query answers "nothing indexed" only for a missing alias; an unreachable Milvus
    raises instead (tests/test_faults.py: asks across a Milvus restart)."""
    assert store().alias_model(f"mmrag_missing_{uuid.uuid4().hex[:8]}") is None
