"""The scale bench's small run, in CI: ``bench/scale.py``'s own data, ground truth, load and
search code on the session's real Milvus, with the product's default index settings.

The 1M-vector run takes about an hour on two cores (docs/performance.md records it and its
command); this run keeps the bench's code working and checks that the default index finds
the exact neighbours of filtered top-10 searches, for large and small tenants alike
(recall, never timing).
"""

from __future__ import annotations

import importlib.util
import sys
import uuid
from pathlib import Path
from types import ModuleType

from activities.store.vectors import IndexConfig, VectorStore, compile_filters
from settings import get_settings
from tests.conftest import ServerStack

BENCH = Path(__file__).resolve().parents[1] / "bench" / "scale.py"
VECTORS = 20_000
TENANTS = 40


def scale_bench() -> ModuleType:
    """bench/scale.py as a module (it puts the repository root first on sys.path when run
    as a script; the test's path is restored after the import)."""
    path = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location("bench_scale", BENCH)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = path
    return module


def test_the_default_index_finds_the_exact_top_10_for_every_tenant_size(
    test_stack: ServerStack,
) -> None:
    scale = scale_bench()
    scale.COLLECTION = f"scale_ci_{uuid.uuid4().hex[:8]}"
    data = scale.make_data(VECTORS, TENANTS, seed=11)
    plan = scale.query_plan(data, TENANTS, 90)
    scale.ground_truth(data, plan)
    config = IndexConfig.from_settings(get_settings())
    store = VectorStore(get_settings().milvus_endpoint(), "", config)
    store.ensure_collection(scale.COLLECTION, scale.DIM, model={})
    try:
        scale.load(store, data)
        scale.build(store, None, config, VECTORS, first=True)
        store.client.load_collection(scale.COLLECTION)
        figures = scale.run_searches(store, plan, compile_filters(media_types=["image"]))
    finally:
        store.drop(scale.COLLECTION)
    assert config.index_type == "HNSW" and config.partition_key
    assert figures["recall10"] >= 0.95, figures
    assert set(figures["groups"]) == {"large", "medium", "small"}
    for group, seen in figures["groups"].items():
        assert seen["recall10"] >= 0.9, (group, figures)
