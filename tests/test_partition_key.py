"""Tenant as Milvus's partition key, and the index settings, on the real Milvus.

New collections hash tenants over a few partitions (so tenants share partitions here: 2
partitions for 6 tenants); writes stay delete + insert. A re-ingest of one tenant must
leave every other tenant's rows and search results exactly as they were, in a new
collection (partition key) and in one created before it (tenant a plain field).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from activities.store.vectors import ChunkRow, IndexConfig, IndexSettingsError, VectorStore
from settings import get_settings
from tests.conftest import ServerStack

DIM = 8
TENANTS = [f"pk-tenant-{i}" for i in range(6)]


def rows_for(tenant: str, assets: int, chunks: int) -> list[ChunkRow]:
    return [
        ChunkRow(
            asset_id=f"{tenant}-a{a}",
            tenant=tenant,
            uri=f"file:///data/{tenant}/{a}.pdf",
            media_type="pdf",
            chunk=f"page:{c}",
            created_at=1,
        )
        for a in range(assets)
        for c in range(chunks)
    ]


def vectors(rows: list[ChunkRow], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((len(rows), DIM)).astype(np.float32)


def tenant_field(store: VectorStore, collection: str) -> dict[str, object]:
    fields = store.client.describe_collection(collection)["fields"]
    return next(f for f in fields if f["name"] == "tenant")


@pytest.fixture
def milvus(test_stack: ServerStack) -> str:
    return get_settings().milvus_endpoint()


@pytest.fixture
def collection(milvus: str) -> Iterator[str]:
    name = f"pk_{uuid.uuid4().hex[:10]}"
    yield name
    VectorStore(milvus).drop(name)


@pytest.mark.parametrize("partition_key", [True, False], ids=["partition-key", "plain-field"])
def test_reingest_of_one_tenant_leaves_the_others_intact(
    milvus: str, collection: str, partition_key: bool
) -> None:
    store = VectorStore(milvus, index=IndexConfig(partition_key=partition_key, partitions=2))
    store.ensure_collection(collection, DIM)
    assert tenant_field(store, collection).get("is_partition_key", False) is partition_key

    written = {}
    for i, tenant in enumerate(TENANTS):
        rows = rows_for(tenant, assets=4, chunks=2)
        written[tenant] = (rows, vectors(rows, seed=i))
        store.replace_assets(collection, tenant, [], rows, written[tenant][1])
    before = {t: store.pks(collection, t) for t in TENANTS}
    assert all(len(pks) == 8 for pks in before.values())

    # Re-ingest of tenant 0: assets 0-2 now one chunk each (new vectors), asset 3 failed.
    again = rows_for(TENANTS[0], assets=3, chunks=1)
    store.replace_assets(
        collection, TENANTS[0], [f"{TENANTS[0]}-a{a}" for a in range(4)], again, vectors(again, 99)
    )
    assert store.pks(collection, TENANTS[0]) == sorted(r.pk for r in again)
    for tenant in TENANTS[1:]:
        assert store.pks(collection, tenant) == before[tenant]
    assert store.count(collection) == 3 + 8 * (len(TENANTS) - 1)

    # A search as any tenant, with another tenant's exact vector, finds only its own rows.
    for tenant in TENANTS:
        probe = written[TENANTS[(TENANTS.index(tenant) + 1) % len(TENANTS)]][1][0]
        hits = store.search(collection, probe.tolist(), tenant, top_k=20, strong=True)
        own = set(store.pks(collection, tenant))
        assert {h["pk"] for h in hits} == own


def test_new_collections_take_the_index_and_partition_settings(
    milvus: str, collection: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MMRAG_INDEX_TYPE / MMRAG_IVF_* / MMRAG_MILVUS_PARTITIONS reach the collection Milvus builds,
    and searches on it use them."""
    for key, value in {
        "MMRAG_INDEX_TYPE": "IVF_SQ8",
        "MMRAG_IVF_NLIST": "16",
        "MMRAG_IVF_NPROBE": "16",
        "MMRAG_MILVUS_PARTITIONS": "4",
    }.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    try:
        store = VectorStore(milvus)
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    store.ensure_collection(collection, DIM)
    index = store.client.describe_index(collection, "vector")
    assert (index["index_type"], str(index["nlist"])) == ("IVF_SQ8", "16")
    assert tenant_field(store, collection)["is_partition_key"] is True
    assert len(store.client.list_partitions(collection)) == 4

    rows = rows_for("pk-settings", assets=64, chunks=1)
    vecs = vectors(rows, seed=3)
    store.replace_assets(collection, "pk-settings", [], rows, vecs)
    store.client.flush(collection)
    # nprobe 16 of nlist 16 searches every list: exact, so the row itself comes first.
    hits = store.search(collection, vecs[5].tolist(), "pk-settings", top_k=3, strong=True)
    assert hits[0]["pk"] == rows[5].pk


def test_an_ivf_pq_that_cannot_split_the_vector_names_the_setting() -> None:
    with pytest.raises(IndexSettingsError, match="MMRAG_IVF_PQ_M=48 must divide"):
        IndexConfig(index_type="IVF_PQ", ivf_pq_m=48).build_params(512)
