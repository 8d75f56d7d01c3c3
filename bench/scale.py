"""Filtered vector search at scale: latency and recall@10 of each index type against exact search.

Bulk-loads clustered synthetic 512-d vectors into the embedded Milvus through the product's
own store (``VectorStore.ensure_collection`` with an ``IndexConfig``, ``replace_assets``),
then for each index build (HNSW: M, efConstruction; IVF_SQ8 and IVF_PQ: nlist) and each
search breadth (HNSW ef; IVF nprobe) runs filtered top-10 searches through
``VectorStore.search`` with the product's filter compiler (tenant + media type, as an Ask
does) and compares the hits with exact search (numpy brute force over the same rows and
filter). Milvus is restarted after each build, so its RSS after loading is that index's
serving memory, not what the build left behind. Starts Milvus alone on free ports and stops
it at the end.

    .venv/bin/python bench/scale.py [--vectors 1000000] [--tenants 1] [--queries 200]
        [--hnsw 16:200] [--ef 32,64,128,256] [--ivf sq8:1024,pq:1024:64] [--nprobe 8,16,32,64]

Data: ``--vectors`` points around ``max(100, vectors/1000)`` cluster centres, each cluster a
random 32-d subspace plus isotropic noise (real embeddings have a low intrinsic dimension;
isotropic 512-d noise would make every index look worse than it is on CLIP vectors), unit
length (COSINE). 60 % of rows are images, the rest PDF pages and video frames; the search
filter keeps images. ``--tenants N`` spreads rows over N tenants with Zipf sizes (tenant i
holds a share proportional to 1/(i+1)) and reports large / medium / small tenants apart.

The last line of output is one line of JSON with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

# The repository root replaces the script's own directory on the path: bench/ holds a
# module named http.py, which would shadow the standard library's http package.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from activities.store.vectors import (  # noqa: E402
    ChunkRow,
    IndexConfig,
    VectorStore,
    compile_filters,
)
from stack.services import Stack, StackPorts  # noqa: E402

DIM = 512
TOP_K = 10
MEDIA = np.array(["image", "pdf", "video"])
MEDIA_P = [0.6, 0.3, 0.1]
CHUNK = {"image": "image", "pdf": "page:1", "video": "frame:0.000"}
COLLECTION = "scale_v1"
INSERT_BATCH = 5000


# -- data ------------------------------------------------------------------------------------
class Clusters:
    """The generative model: centres plus a local 32-d subspace each, and isotropic noise."""

    def __init__(self, n_clusters: int, seed: int, sub_dim: int = 32) -> None:
        rng = np.random.default_rng(seed)
        self.centres = rng.standard_normal((n_clusters, DIM), dtype=np.float32)
        self.centres /= np.linalg.norm(self.centres, axis=1, keepdims=True)
        # Spread inside a cluster ~0.5 of the centre's norm, noise ~0.1.
        bases = rng.standard_normal((n_clusters, sub_dim, DIM), dtype=np.float32)
        self.bases = bases * np.float32(0.5 / np.sqrt(DIM))
        self.sub_dim = sub_dim

    def sample(self, cluster: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = np.empty((len(cluster), DIM), dtype=np.float32)
        order = np.argsort(cluster, kind="stable")
        clusters, starts = np.unique(cluster[order], return_index=True)
        for c, rows in zip(clusters, np.split(order, starts[1:]), strict=True):
            z = rng.standard_normal((len(rows), self.sub_dim), dtype=np.float32) / np.sqrt(
                self.sub_dim
            )
            noise = rng.standard_normal((len(rows), DIM), dtype=np.float32) * (0.1 / np.sqrt(DIM))
            out[rows] = self.centres[c] + z @ self.bases[c] + noise
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out


def tenant_sizes(n: int, tenants: int) -> np.ndarray:
    """Zipf shares (1/(i+1)), at least one row each, summing to ``n``."""
    weights = 1.0 / np.arange(1, tenants + 1)
    sizes = np.maximum(1, np.floor(weights / weights.sum() * n)).astype(np.int64)
    sizes[0] += n - sizes.sum()
    return sizes


def make_data(n: int, tenants: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    model = Clusters(max(100, n // 1000), seed)
    cluster = rng.integers(0, len(model.centres), size=n)
    vectors = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, 100_000):  # bounded temporaries
        vectors[start : start + 100_000] = model.sample(cluster[start : start + 100_000], rng)
    tenant = rng.permutation(np.repeat(np.arange(tenants), tenant_sizes(n, tenants)))
    media = rng.choice(len(MEDIA), size=n, p=MEDIA_P)
    return {"vectors": vectors, "tenant": tenant, "media": media, "model": model, "rng": rng}


def tenant_name(i: int) -> str:
    return f"t{i:04d}"


# -- queries and ground truth ----------------------------------------------------------------
def query_plan(data: dict[str, Any], tenants: int, n_queries: int) -> list[dict[str, Any]]:
    """Queries near random centres; with several tenants, a third each for the ten largest
    tenants, tenants ranked ~100th and the smallest ones (the long tail)."""
    rng = data["rng"]
    model: Clusters = data["model"]
    vectors = model.sample(rng.integers(0, len(model.centres), size=n_queries), rng)
    if tenants == 1:
        groups = [("all", np.zeros(n_queries, dtype=np.int64))]
    else:
        third = n_queries // 3
        large = rng.integers(0, min(10, tenants), size=third)
        mid_lo = min(tenants - 1, 90)
        medium = rng.integers(mid_lo, min(tenants, mid_lo + 20), size=third)
        small = rng.integers(max(0, tenants - 100), tenants, size=n_queries - 2 * third)
        groups = [("large", large), ("medium", medium), ("small", small)]
    plan = []
    i = 0
    for label, members in groups:
        for t in members:
            plan.append({"group": label, "tenant": int(t), "vector": vectors[i]})
            i += 1
    return plan


def ground_truth(data: dict[str, Any], plan: list[dict[str, Any]]) -> None:
    """Exact filtered top-10 by brute force: the tenant's image rows, highest cosine."""
    vectors, tenant, media = data["vectors"], data["tenant"], data["media"]
    image = media == 0
    order = np.argsort(tenant, kind="stable")
    bounds = np.searchsorted(tenant[order], np.arange(tenant.max() + 2))
    by_tenant: dict[int, list[int]] = {}
    for qi, query in enumerate(plan):
        by_tenant.setdefault(query["tenant"], []).append(qi)
    for t, queries in by_tenant.items():
        rows = order[bounds[t] : bounds[t + 1]]
        rows = rows[image[rows]]
        q = np.stack([plan[i]["vector"] for i in queries])
        best_scores = np.empty((len(queries), 0), dtype=np.float32)
        best_rows = np.empty((len(queries), 0), dtype=np.int64)
        for start in range(0, len(rows), 100_000):
            block = rows[start : start + 100_000]
            scores = np.concatenate([best_scores, q @ vectors[block].T], axis=1)
            k = min(TOP_K, scores.shape[1])
            keep = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            held = best_rows.shape[1]
            best_scores = np.take_along_axis(scores, keep, 1)
            from_block = block[np.maximum(keep - held, 0)]
            from_best = (
                np.take_along_axis(best_rows, np.minimum(keep, max(held - 1, 0)), 1)
                if held
                else from_block
            )
            best_rows = np.where(keep < held, from_best, from_block)
        for j, qi in enumerate(queries):
            plan[qi]["truth"] = {asset_id(int(r)) for r in best_rows[j]}


def asset_id(row: int) -> str:
    return f"a{row:09d}"


# -- Milvus ----------------------------------------------------------------------------------
def milvus_memory(stack: Stack) -> dict[str, float]:
    """Milvus's resident and peak memory now, GiB (standalone: one process, builds included)."""
    pid = stack.status()["milvus"]["pid"]
    fields: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = round(int(value.split()[0]) / 2**20, 3)
    return {"rss_gib": fields["VmRSS"], "peak_gib": fields["VmHWM"]}


def load(store: VectorStore, data: dict[str, Any]) -> float:
    """Insert every row through ``replace_assets``; returns rows/s."""
    vectors, tenant, media = data["vectors"], data["tenant"], data["media"]
    n = len(vectors)
    start = time.perf_counter()
    for lo in range(0, n, INSERT_BATCH):
        hi = min(n, lo + INSERT_BATCH)
        rows = [
            ChunkRow(
                asset_id=asset_id(i),
                tenant=tenant_name(int(tenant[i])),
                uri=f"gs://bench/{i}.jpg",
                media_type=str(MEDIA[media[i]]),
                chunk=CHUNK[str(MEDIA[media[i]])],
                created_at=1_700_000_000 + i,
            )
            for i in range(lo, hi)
        ]
        # No asset ids to delete first: a bulk load of new assets (the delete half of
        # delete + insert is measured by bench/ingest.py).
        store.replace_assets(COLLECTION, "", [], rows, vectors[lo:hi])
        if (lo // INSERT_BATCH) % 20 == 0:
            print(f"  inserted {hi:,} rows, {hi / (time.perf_counter() - start):,.0f} rows/s")
    return n / (time.perf_counter() - start)


def wait_indexed(store: VectorStore, n: int, timeout: float = 4 * 3600) -> None:
    deadline = time.monotonic() + timeout
    while True:
        info = store.client.describe_index(COLLECTION, "vector")
        if info.get("indexed_rows", 0) >= n and not info.get("pending_index_rows", 0):
            return
        if info.get("state") == "Failed":
            raise RuntimeError(f"index build failed: {info}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"index not built after {timeout} s: {info}")
        time.sleep(2)


def build(store: VectorStore, stack: Stack, config: IndexConfig, n: int, first: bool) -> float:
    """(Re)build the vector index with ``config``; returns the build time in seconds.

    The first build is the one ``ensure_collection`` asked for; it runs as sealed
    segments appear, so its time counts from the flush."""
    start = time.perf_counter()
    if first:
        store.client.flush(COLLECTION)
    else:
        store.client.release_collection(COLLECTION)
        store.client.drop_index(COLLECTION, "vector")
        index = store.client.prepare_index_params()
        config.add_to(index, DIM)
        store.client.create_index(COLLECTION, index)
    wait_indexed(store, n)
    return time.perf_counter() - start


def restart_and_load(store: VectorStore, stack: Stack) -> float:
    """Restart Milvus (clean memory), load the collection; returns the load time."""
    stack.stop_service("milvus")
    stack.start_service("milvus")
    start = time.perf_counter()
    store.client.load_collection(COLLECTION)
    return time.perf_counter() - start


def run_searches(
    store: VectorStore, plan: list[dict[str, Any]], media_filter: str
) -> dict[str, Any]:
    """Filtered top-10 searches one at a time, as an Ask makes them; latency and recall."""
    for q in plan[:10]:  # warm-up (caches, connections)
        store.search(
            COLLECTION, q["vector"].tolist(), tenant_name(q["tenant"]), TOP_K, media_filter
        )
    per_group: dict[str, dict[str, list[float]]] = {}
    for q in plan:
        vector = q["vector"].tolist()
        t0 = time.perf_counter()
        hits = store.search(COLLECTION, vector, tenant_name(q["tenant"]), TOP_K, media_filter)
        ms = (time.perf_counter() - t0) * 1000
        found = {h["asset_id"] for h in hits}
        # A tenant with no image rows has nothing to find: an empty answer is all of it.
        recall = len(found & q["truth"]) / len(q["truth"]) if q["truth"] else 1.0
        group = per_group.setdefault(q["group"], {"ms": [], "recall": []})
        group["ms"].append(ms)
        group["recall"].append(recall)
    all_ms = [m for g in per_group.values() for m in g["ms"]]
    all_recall = [r for g in per_group.values() for r in g["recall"]]
    out = summary(all_ms, all_recall)
    if len(per_group) > 1:
        out["groups"] = {k: summary(g["ms"], g["recall"]) for k, g in per_group.items()}
    return out


def summary(ms: list[float], recall: list[float]) -> dict[str, Any]:
    ordered = sorted(ms)
    return {
        "p50_ms": round(statistics.median(ordered), 2),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 2),
        "recall10": round(statistics.fmean(recall), 4),
    }


# -- the run ---------------------------------------------------------------------------------
def index_configs(args: argparse.Namespace) -> list[tuple[IndexConfig, str, list[int]]]:
    """(build config, search knob, values) in build order."""
    base = IndexConfig(partition_key=args.tenants > 1 or args.partition_key)
    out: list[tuple[IndexConfig, str, list[int]]] = []
    for spec in filter(None, args.hnsw.split(",")):
        m, ef_construction = (int(x) for x in spec.split(":"))
        config = replace(base, index_type="HNSW", hnsw_m=m, hnsw_ef_construction=ef_construction)
        out.append((config, "hnsw_ef", ints(args.ef)))
    for spec in filter(None, args.ivf.split(",")):
        kind, nlist, *pq_m = spec.split(":")
        index_type = {"sq8": "IVF_SQ8", "pq": "IVF_PQ", "flat": "IVF_FLAT"}[kind]
        m = int(pq_m[0]) if pq_m else args.pq_m
        config = replace(base, index_type=index_type, ivf_nlist=int(nlist), ivf_pq_m=m)
        out.append((config, "ivf_nprobe", ints(args.nprobe)))
    return out


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--tenants", type=int, default=1)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--hnsw", default="16:200", help="M:efConstruction builds, commas")
    parser.add_argument("--ef", default="32,64,128,256")
    parser.add_argument(
        "--ivf", default="sq8:1024,pq:1024", help="sq8|pq|flat:nlist[:pq m], commas"
    )
    parser.add_argument("--nprobe", default="8,16,32,64")
    parser.add_argument("--pq-m", type=int, default=64)
    parser.add_argument("--partition-key", action="store_true", help="also with one tenant")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    configs = index_configs(args)
    t0 = time.perf_counter()
    data = make_data(args.vectors, args.tenants, args.seed)
    plan = query_plan(data, args.tenants, args.queries)
    ground_truth(data, plan)
    print(
        f"data: {args.vectors:,} x {DIM} in {len(data['model'].centres)} clusters, "
        f"{args.tenants} tenants, {len(plan)} queries with exact top-{TOP_K}: "
        f"{time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    media_filter = compile_filters(media_types=["image"])
    results: list[dict[str, Any]] = []
    report: dict[str, Any] = {
        "vectors": args.vectors,
        "dim": DIM,
        "tenants": args.tenants,
        "queries": len(plan),
        "filter": f"tenant == <t> and ({media_filter})",
        "cores": os.cpu_count(),
    }
    with tempfile.TemporaryDirectory(prefix="mmrag-scale-") as tmp:
        stack = Stack(Path(tmp) / "state", StackPorts.free(), services=("milvus",))
        try:
            uri = stack.up()["milvus_uri"]
            first_config = configs[0][0]
            store = VectorStore(uri, "", first_config)
            store.ensure_collection(COLLECTION, DIM, model={})
            report["insert_rows_per_s"] = round(load(store, data), 1)
            print(f"inserted at {report['insert_rows_per_s']:,} rows/s", flush=True)
            report["memory_after_insert"] = milvus_memory(stack)
            for i, (config, knob, values) in enumerate(configs):
                build_s = build(store, stack, config, args.vectors, first=i == 0)
                build_memory = milvus_memory(stack)
                load_s = restart_and_load(store, stack)
                memory = milvus_memory(stack)
                segments = len(store.client.list_loaded_segments(COLLECTION) or [])
                print(
                    f"{config.index_type} {config.build_params(DIM)}: built in {build_s:.1f} s "
                    f"(peak {build_memory['peak_gib']} GiB), loaded in {load_s:.1f} s, "
                    f"RSS {memory['rss_gib']} GiB, {segments} segments",
                    flush=True,
                )
                for value in values:
                    store.index = (
                        replace(config, hnsw_ef=value)
                        if knob == "hnsw_ef"
                        else replace(config, ivf_nprobe=value)
                    )
                    figures = run_searches(store, plan, media_filter)
                    row = {
                        "index": config.index_type,
                        "build": config.build_params(DIM),
                        "search": {knob.split("_")[-1]: value},
                        **figures,
                        "build_s": round(build_s, 1),
                        "build_peak_gib": build_memory["peak_gib"],
                        "rss_gib": memory["rss_gib"],
                        "segments": segments,
                    }
                    results.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            stack.down()
    report["results"] = results
    good = [r for r in results if r["recall10"] >= 0.95]
    best = min(good, key=lambda r: r["p50_ms"]) if good else None
    report["best_at_recall_0_95"] = best
    report["goal_met"] = bool(best and best["p50_ms"] <= 25)
    report["elapsed_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
