"""Ingest through the real Temporal dev server, Milvus, Postgres and the GCS emulator."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from temporalio.client import Client

from starters.ingest import start_ingest
from starters.synthetic_corpus import CLASSES, caption_for, write_corpus
from tests.conftest import TEST_MAX_OBJECT_BYTES, ServerStack, Workers
from tests.helpers import (
    audit_counts,
    audit_events,
    audit_private,
    engine,
    grant_root,
    milvus_pks,
    registry_rows,
    store,
    temporal_execute,
    wait_searchable,
    write_bad_corpus,
)
from workflows.contracts import IngestResult, asset_id_for


async def ingest(client: Client, tenant: str, sources: list[str], **kw) -> IngestResult:  # type: ignore[no-untyped-def]
    handle = await start_ingest(client, tenant, sources, **kw)
    return await asyncio.wait_for(handle.result(), timeout=180)


async def test_folder_ingest_is_complete_and_idempotent(
    worker: Workers, client: Client, tenant: str, tmp_path: Path
) -> None:
    files = write_corpus(tmp_path / "corpus", per_class=2, seed=11)
    result = await ingest(client, tenant, [str(tmp_path / "corpus")], tags={"team": "x"})
    assert (result.seen, result.ingested, result.unchanged, result.failed) == (36, 36, 0, 0)
    assert result.vectors == 36

    pks = milvus_pks(tenant)
    expected = sorted(f"{asset_id_for(tenant, p.resolve().as_uri())}:image" for p, _ in files)
    assert pks == expected
    rows = registry_rows(tenant)
    assert len(rows) == 36 and {r.status for r in rows} == {"ingested"}
    assert {r.tags["team"] for r in rows} == {"x"}
    assert audit_counts(tenant) == {"asset.ingest": 36}

    # The same ingest again: nothing re-encoded, nothing written, the same index.
    again = await ingest(client, tenant, [str(tmp_path / "corpus")], tags={"team": "x"})
    assert (again.ingested, again.unchanged, again.failed) == (0, 36, 0)
    assert milvus_pks(tenant) == expected
    assert audit_counts(tenant) == {"asset.ingest": 36}

    # A changed object is re-encoded in place: same key, one row, one new audit row.
    changed = files[0][0]
    changed.write_bytes(files[1][0].read_bytes())
    os.utime(changed, ns=(1, 10**18))
    third = await ingest(client, tenant, [str(tmp_path / "corpus")], tags={"team": "x"})
    assert (third.ingested, third.unchanged) == (1, 35)
    assert milvus_pks(tenant) == expected
    assert audit_counts(tenant) == {"asset.ingest": 37}


async def test_retrieval_quality_on_held_out_images(
    worker: Workers, client: Client, tenant: str, tmp_path: Path
) -> None:
    """Caption -> image through the real index: the right class must come back."""
    write_corpus(tmp_path / "held-out", per_class=3, seed=90210)
    result = await ingest(client, tenant, [str(tmp_path / "held-out")])
    assert result.ingested == 54
    wait_searchable(tenant, 54)
    from starters.search import nearest

    hits_at_5 = 0
    for colour, shape in CLASSES:
        hits = nearest(caption_for(colour, shape), tenant, top_k=5)
        assert hits, "search returned nothing"
        names = [str(h["uri"]).rsplit("/", 1)[-1] for h in hits]
        hits_at_5 += any(n.startswith(f"{colour}-{shape}-") for n in names)
    assert hits_at_5 / len(CLASSES) >= 0.85, f"recall@5 {hits_at_5}/{len(CLASSES)}"


async def test_bad_inputs_fail_alone_with_reasons(
    worker: Workers, client: Client, tenant: str, tmp_path: Path
) -> None:
    expected = write_bad_corpus(tmp_path / "bad", oversized_bytes=TEST_MAX_OBJECT_BYTES)
    write_corpus(tmp_path / "bad", per_class=1, seed=5)  # 18 good images in the same batch
    missing = str(tmp_path / "does-not-exist")
    result = await ingest(client, tenant, [str(tmp_path / "bad"), missing])

    assert result.ingested == 18
    assert result.failed == len(expected) + 1
    reasons = {f.uri.rsplit("/", 1)[-1]: f.reason for f in result.failures}
    for name, words in expected.items():
        assert words in reasons[name], f"{name}: {reasons[name]!r} lacks {words!r}"
    assert "no such file or directory" in reasons["does-not-exist"]

    # Every failed object is audited with its reason (sealed: readable until it is
    # forgotten), and none of them has a vector. The source that could not be listed has
    # no asset, so no key: its row keeps no URI or reason (the result above reports it).
    failed_events = [e for e in audit_events(tenant) if e.action == "asset.fail"]
    assert len(failed_events) == len(expected) + 1
    private = [audit_private(e) for e in failed_events if e.asset_id]
    assert {p["uri"].rsplit("/", 1)[-1] for p in private} == set(expected)
    assert all(p["reason"] for p in private)
    assert all(e.uri == "" and "reason" not in e.details for e in failed_events)
    assert len(milvus_pks(tenant)) == 18
    assert worker.alive(), "a bad file must never take a worker down"


async def test_gcs_prefix_ingest(
    worker: Workers, client: Client, tenant: str, tmp_path: Path, test_stack: ServerStack
) -> None:
    gcs = storage.Client(project="test", credentials=AnonymousCredentials())
    bucket = gcs.create_bucket(f"media-{tenant.lower()[-6:]}")
    grant_root(test_stack.state_dir, tenant, f"gs://{bucket.name}/")
    files = write_corpus(tmp_path / "gcs", per_class=1, seed=3)
    for path, _ in files[:10]:
        bucket.blob(f"photos/{path.name}").upload_from_filename(str(path))
    bucket.blob("other/ignored.png").upload_from_filename(str(files[10][0]))

    uri = f"gs://{bucket.name}/photos/"
    result = await ingest(client, tenant, [uri])
    assert (result.ingested, result.failed) == (10, 0)
    assert len(milvus_pks(tenant)) == 10
    assert all(r.uri.startswith(uri) for r in registry_rows(tenant))

    # Unchanged generations are skipped; an overwrite (new generation) is re-encoded.
    bucket.blob(f"photos/{files[0][0].name}").upload_from_filename(str(files[11][0]))
    again = await ingest(client, tenant, [uri])
    assert (again.ingested, again.unchanged) == (1, 9)
    assert len(milvus_pks(tenant)) == 10


async def test_tenants_are_isolated_across_reingest(
    worker: Workers, client: Client, tmp_path: Path
) -> None:
    """The same files in two tenants; a forced re-ingest must not leak rows across them."""
    corpus = tmp_path / "shared"
    write_corpus(corpus, per_class=1, seed=8)
    a, b = "iso-a-" + tmp_path.name[-6:], "iso-b-" + tmp_path.name[-6:]
    await ingest(client, a, [str(corpus)])
    await ingest(client, b, [str(corpus)])
    await ingest(client, a, [str(corpus)], force=True)
    wait_searchable(a, 18)
    pks_a, pks_b = milvus_pks(a), milvus_pks(b)
    assert len(pks_a) == len(pks_b) == 18 and not set(pks_a) & set(pks_b)
    from starters.search import nearest

    hits = nearest("a red circle on a white background", a, top_k=18)
    assert len(hits) == 18
    assert {h["asset_id"] for h in hits} == {p.split(":")[0] for p in pks_a}


async def test_killed_encode_worker_loses_and_duplicates_nothing(
    test_stack: ServerStack, worker: Workers, client: Client, tenant: str, tmp_path: Path
) -> None:
    """SIGKILL an encode worker in the middle of a batch ingest; a new one finishes it."""
    write_corpus(tmp_path / "big", per_class=12, seed=21, size=256)  # 216 images
    # The victim is the only encode worker while the batch starts.
    worker.encode.stop()
    victim = test_stack.start_worker("encode")
    handle = await start_ingest(
        client,
        tenant,
        [str(tmp_path / "big")],
        batch_size=24,
        max_concurrent_batches=2,
        encode_heartbeat_timeout_s=5,
    )
    # Kill it once some (not all) batches have landed.
    for _ in range(600):
        progress = await handle.query("progress")
        if progress["ingested"] >= 24:
            break
        await asyncio.sleep(0.02)
    assert progress["ingested"] < 216, "the batch finished before the kill: make it bigger"
    victim.kill()
    worker.encode = test_stack.start_worker("encode")
    result = await asyncio.wait_for(handle.result(), timeout=180)
    assert (result.ingested, result.failed) == (216, 0)
    pks = milvus_pks(tenant)
    assert len(pks) == len(set(pks)) == 216
    assert store().count(store_collection(), tenant) == 216
    assert audit_counts(tenant) == {"asset.ingest": 216}
    assert len(registry_rows(tenant)) == 216


def store_collection() -> str:
    from tests.helpers import collection

    return collection()


async def test_started_from_temporal_cli_with_json(
    worker: Workers, test_stack: ServerStack, tenant: str, tmp_path: Path
) -> None:
    """Another backend starts IngestBatch by name with JSON input and gets JSON back."""
    write_corpus(tmp_path / "cli", per_class=1, seed=4)
    payload = {"tenant": tenant, "sources": [(tmp_path / "cli").resolve().as_uri()]}
    result = temporal_execute(
        test_stack.endpoints["temporal_address"], "IngestBatch", payload, f"cli-{tenant}"
    )
    assert result["tenant"] == tenant
    assert (result["ingested"], result["failed"], result["vectors"]) == (18, 0, 18)
    assert len(milvus_pks(tenant)) == 18


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_log SET action = 'tampered'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
    ],
)
def test_audit_log_is_append_only(test_stack: ServerStack, statement: str) -> None:
    with engine().begin() as conn:
        conn.execute(
            text(
                "INSERT INTO audit_log (tenant, action, idempotency_key) "
                "VALUES ('audit-test', 'probe', :k) ON CONFLICT DO NOTHING"
            ),
            {"k": "probe/" + statement.split()[0]},
        )
    with pytest.raises(DBAPIError, match="append-only"), engine().begin() as conn:
        conn.execute(text(statement))
