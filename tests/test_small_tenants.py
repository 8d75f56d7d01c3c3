"""A small tenant's search finds its true nearest rows even beside a big tenant.

Milvus 2.3.5's filtered HNSW search returns fewer hits than exist when the filter keeps a
tiny share of an indexed segment (milvus-io/milvus#28603, #33933): a tenant with 30 rows
sharing a partition with a tenant of 20,000 got 1-7 of its 10 nearest rows (measured).
``VectorStore.search`` notices the short answer and ranks the tenant's rows exactly.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from activities.store.vectors import ChunkRow, IndexConfig, VectorStore, compile_filters
from settings import get_settings
from tests.conftest import ServerStack

DIM = 64
BIG_ROWS = 20_000
SMALL_ROWS = 30
TOP_K = 10
QUERIES = 20


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def rows_for(tenant: str, n: int, media: str = "image") -> list[ChunkRow]:
    return [
        ChunkRow(
            asset_id=f"{tenant}-{i}",
            tenant=tenant,
            uri=f"file:///data/{tenant}/{i}.jpg",
            media_type=media if i % 3 else "pdf",  # a third are PDF pages: filters apply
            chunk="image" if i % 3 else "page:1",
            created_at=1,
        )
        for i in range(n)
    ]


def exact_top(vectors: np.ndarray, rows: list[ChunkRow], query: np.ndarray, k: int) -> list[str]:
    scores = vectors @ query
    return [rows[i].pk for i in np.argsort(-scores)[:k]]


@pytest.fixture(scope="module")
def crowded(test_stack: ServerStack) -> Iterator[dict[str, object]]:
    """One big tenant (clustered vectors) and one of 30 random rows in one partition, indexed."""
    uri = get_settings().milvus_endpoint()
    store = VectorStore(uri, index=IndexConfig(partition_key=True, partitions=1))
    collection = f"small_{uuid.uuid4().hex[:10]}"
    store.ensure_collection(collection, DIM)
    rng = np.random.default_rng(1)
    centres = unit(rng.standard_normal((50, DIM)))
    big = unit(centres[rng.integers(0, 50, BIG_ROWS)] + 0.1 * rng.standard_normal((BIG_ROWS, DIM)))
    big_rows = rows_for("big", BIG_ROWS)
    for lo in range(0, BIG_ROWS, 5000):
        store.replace_assets(collection, "big", [], big_rows[lo : lo + 5000], big[lo : lo + 5000])
    small_rows = rows_for("small", SMALL_ROWS)
    small = unit(rng.standard_normal((SMALL_ROWS, DIM)))
    store.replace_assets(collection, "small", [], small_rows, small)
    store.client.flush(collection)
    deadline = time.monotonic() + 300
    while True:  # the HNSW index built over the sealed segment: the case that misses
        info = store.client.describe_index(collection, "vector")
        if info.get("indexed_rows", 0) >= BIG_ROWS and not info.get("pending_index_rows"):
            break
        assert time.monotonic() < deadline, f"index not built: {info}"
        time.sleep(1)
    near = centres[rng.integers(0, 50, QUERIES)]  # queries in the big tenant's clusters
    queries = unit(near + 0.1 * rng.standard_normal((QUERIES, DIM)))
    yield {
        "uri": uri,
        "collection": collection,
        "rows": small_rows,
        "vectors": small,
        "queries": queries,
    }
    store.drop(collection)


def test_the_index_alone_misses_a_small_tenants_rows(crowded: dict[str, object]) -> None:
    """The bug reproduced: with the exact fallback off, Milvus returns short answers."""
    store = VectorStore(str(crowded["uri"]), index=IndexConfig(exact_max_rows=0))
    queries: np.ndarray = crowded["queries"]  # type: ignore[assignment]
    returned = [
        len(store.search(str(crowded["collection"]), q.tolist(), "small", TOP_K, strong=True))
        for q in queries
    ]
    assert min(returned) < TOP_K, returned


def test_a_small_tenant_gets_its_exact_top_k(crowded: dict[str, object]) -> None:
    store = VectorStore(str(crowded["uri"]), index=IndexConfig())
    rows: list[ChunkRow] = crowded["rows"]  # type: ignore[assignment]
    vectors: np.ndarray = crowded["vectors"]  # type: ignore[assignment]
    queries: np.ndarray = crowded["queries"]  # type: ignore[assignment]
    for q in queries:
        hits = store.search(str(crowded["collection"]), q.tolist(), "small", TOP_K, strong=True)
        assert [h["pk"] for h in hits] == exact_top(vectors, rows, q, TOP_K)
        # Same hit shape as the index's: what Ask cites, and the cosine similarity.
        first, by_pk = hits[0], {r.pk: r for r in rows}
        assert (first["asset_id"], first["uri"]) == (
            by_pk[str(first["pk"])].asset_id,
            by_pk[str(first["pk"])].uri,
        )
        assert {"media_type", "chunk", "created_at", "tags", "snippet"} <= set(first)
        assert first["score"] == pytest.approx(float(np.max(vectors @ q)), abs=1e-4)


def test_the_exact_ranking_keeps_the_askers_filters(crowded: dict[str, object]) -> None:
    store = VectorStore(str(crowded["uri"]), index=IndexConfig())
    rows: list[ChunkRow] = crowded["rows"]  # type: ignore[assignment]
    vectors: np.ndarray = crowded["vectors"]  # type: ignore[assignment]
    images = [i for i, r in enumerate(rows) if r.media_type == "image"]
    only_images = compile_filters(media_types=["image"])
    for q in crowded["queries"]:  # type: ignore[attr-defined]
        hits = store.search(
            str(crowded["collection"]), q.tolist(), "small", TOP_K, only_images, strong=True
        )
        expected = exact_top(vectors[images], [rows[i] for i in images], q, TOP_K)
        assert [h["pk"] for h in hits] == expected
        assert {h["media_type"] for h in hits} == {"image"}


def test_a_tenant_over_the_bound_keeps_the_index_answer(crowded: dict[str, object]) -> None:
    """MMRAG_EXACT_SEARCH_MAX_ROWS bounds the extra read: a tenant with more matching rows
    than that keeps what the index returned (never a read of a big tenant's rows)."""
    bounded = VectorStore(str(crowded["uri"]), index=IndexConfig(exact_max_rows=SMALL_ROWS - 1))
    off = VectorStore(str(crowded["uri"]), index=IndexConfig(exact_max_rows=0))
    for q in crowded["queries"]:  # type: ignore[attr-defined]
        args = (str(crowded["collection"]), q.tolist(), "small", TOP_K)
        assert [h["pk"] for h in bounded.search(*args, strong=True)] == [
            h["pk"] for h in off.search(*args, strong=True)
        ]
