"""What the Ask and load benches share: the tiny model's environment, the bench tenant and
its corpus (synthetic images through ``IngestBatch`` plus bulk random vectors), a stream of
never-repeated questions, and nearest-rank percentiles. Not a copy of any product code:
``bench/ask.py`` and ``bench/load.py`` measure the product's own workflows and activities.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

from activities.clip import TINY_MODEL_DIR
from settings import get_settings
from workflows.contracts import asset_id_for

TENANT = "bench"
TINY_ENV = {
    "MMRAG_CLIP_MODEL": "mmrag-tiny",
    "MMRAG_CLIP_PRETRAINED": "",
    "MMRAG_CLIP_CHECKPOINT": str(TINY_MODEL_DIR / "mmrag-tiny.pt"),
    "MMRAG_DEVICE": "cpu",
}
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle")
TEMPLATES = (
    "a {c} {s}",
    "show me the {c} {s}",
    "which picture has a {c} {s} in it",
    "find a {c} {s} on a white background",
    "{c} {s} image",
    "is there a {c} {s} here",
    "photo of one {c} {s}",
    "where is the {c} {s}",
)


def stack_env(state: Path, endpoints: dict[str, str]) -> dict[str, str]:
    """What every bench's processes need to reach its own stack: the state directory, the
    Temporal address, and the corpus beside the state dir as every tenant's storage root."""
    return {
        "MMRAG_STATE_DIR": str(state),
        "MMRAG_STORAGE_ROOTS": json.dumps({"*": [state.parent.as_uri()]}),
        "TEMPORAL_ADDRESS": endpoints["temporal_address"],
    }


def bench_env(
    state: Path, endpoints: dict[str, str], llm_url: str, torch_threads: int, grace_s: int
) -> dict[str, str]:
    """The environment of a benchmark's workers (and its own process): the tiny model, the
    bench stack, the LLM test server; Temporal profile variables of the caller removed."""
    env = {
        **os.environ,
        **TINY_ENV,
        "MMRAG_TORCH_THREADS": str(torch_threads),
        **stack_env(state, endpoints),
        "MMRAG_GRACEFUL_SHUTDOWN_SECONDS": str(grace_s),
        "TEMPORAL_NAMESPACE": "default",
        "OPENAI_BASE_URL": llm_url,
        "OPENAI_API_KEY": "bench-key",
        "MMRAG_LLM_MODEL": "bench-llm",
    }
    for inherited in ("TEMPORAL_PROFILE", "TEMPORAL_API_KEY", "TEMPORAL_CONFIG_FILE"):
        env.pop(inherited, None)
        os.environ.pop(inherited, None)
    return env


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (p99 of 50 values is the slowest one)."""
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(statistics.median(values), 1),
        "p99": round(pct(values, 99), 1),
        "mean": round(statistics.fmean(values), 1),
        "n": len(values),
    }


def stage_medians(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for r in rows for k in r})
    return {k: round(statistics.median([r[k] for r in rows if k in r]), 1) for k in keys}


class Questions:
    """A never-repeating stream of natural questions (encode and prompt caches stay cold)."""

    def __init__(self) -> None:
        self.n = 0

    def next(self) -> str:
        n = self.n
        self.n += 1
        c, s = COLOURS[n % 6], SHAPES[(n // 6) % 3]
        t = TEMPLATES[(n // 18) % len(TEMPLATES)]
        return f"{t.format(c=c, s=s)} (query {n})"


async def index_corpus(client: Any, tmp: Path, images_per_class: int, vectors: int) -> dict:
    """Real images through IngestBatch (creates index v1), then bulk random unit vectors."""
    import numpy as np

    from activities.store import registry
    from activities.store.vectors import ChunkRow, get_store
    from starters.ingest import start_ingest
    from starters.synthetic_corpus import write_corpus

    corpus = tmp / "corpus"
    write_corpus(corpus, per_class=images_per_class, seed=7)
    t = time.perf_counter()
    handle = await start_ingest(client, TENANT, [str(corpus)], tags={"set": "real"})
    result = await handle.result()
    if result.failed or not result.ingested:
        raise RuntimeError(f"ingest failed: {result}")
    ingest_s = time.perf_counter() - t
    settings = get_settings()
    index = registry.active_index(registry.get_engine(settings.database_endpoint()))
    assert index is not None
    store = get_store(settings.milvus_endpoint(), settings.milvus_token.get_secret_value())
    rng = np.random.default_rng(11)
    t = time.perf_counter()
    now = int(time.time())
    batch = 5000
    for start in range(0, vectors, batch):
        n = min(batch, vectors - start)
        vec = rng.standard_normal((n, index.dim)).astype(np.float32)
        vec /= np.linalg.norm(vec, axis=1, keepdims=True)
        rows = []
        for i in range(start, start + n):
            colour, shape = COLOURS[i % 6], SHAPES[(i // 6) % 3]
            uri = f"gs://bench-bucket/photos/{i // 1000:03d}/{colour}-{shape}-{i:06d}.jpg"
            rows.append(
                ChunkRow(
                    asset_id=asset_id_for(TENANT, uri),
                    tenant=TENANT,
                    uri=uri,
                    media_type="image/jpeg",
                    chunk="image",
                    created_at=now - int(rng.integers(0, 400 * 86400)),
                    tags={"set": "bulk", "team": f"t{i % 7}"},
                )
            )
        store.replace_assets(index.collection, TENANT, [], rows, vec)
    store.client.flush(index.collection)
    total = store.count(index.collection, TENANT, strong=True)
    insert_s = time.perf_counter() - t
    indexed = _wait_indexed(store, index.collection, total)
    searchable_s = _wait_searchable(store, index.collection, total, index.dim)
    return {
        "collection": index.collection,
        "dim": index.dim,
        "real_images": result.ingested,
        "vectors_total": total,
        "ingest_s": round(ingest_s, 1),
        "bulk_insert_s": round(insert_s, 1),
        "hnsw_indexed_rows": indexed,
        "searchable_after_s": searchable_s,
    }


def _wait_searchable(
    store: Any, collection: str, total: int, dim: int, timeout: float = 90
) -> float:
    """Asks read with Bounded consistency: wait until a Bounded count and search see it all."""
    started = time.monotonic()
    probe = [1.0 / math.sqrt(dim)] * dim
    while True:
        seen = store.count(collection, TENANT, strong=False)
        hits = store.search(collection, probe, TENANT, 5)
        if seen >= total and len(hits) == 5:
            return round(time.monotonic() - started, 1)
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"after {timeout} s a Bounded read sees {seen}/{total} rows")
        time.sleep(0.5)


def _wait_indexed(store: Any, collection: str, total: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    indexed = -1
    while time.monotonic() < deadline:
        try:
            info = store.client.describe_index(collection, "vector")
            indexed = int(info.get("indexed_rows", -1))
        except Exception:  # noqa: BLE001 - describe_index shape varies; it is informative only
            return -1
        if indexed >= total:
            break
        time.sleep(0.5)
    return indexed
