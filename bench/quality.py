"""Retrieval quality on a labelled corpus: recall@5 and nDCG@5 per retrieval mode, with and
without OCR, per slice (documents, scans, photos, frames), and what OCR costs at ingest.

Generates the corpus of ``bench/quality_corpus.py`` (~230 items: 3-page PDFs with a fact in
a deep paragraph, scanned pages as PNG and as PDFs with no text layer, slides,
screenshots, tagged photos, text-card videos; ~120 questions with one known answer
location each), starts its own embedded stack (Temporal, Milvus, Postgres) on free ports in
a temporary directory, and goes through the product's own workflows only:

1. a worker (every role, the tiny CLIP model) with ``MMRAG_OCR_ENABLED=false`` ingests the
   corpus for tenant ``ocr-off`` (one ``IngestBatch`` per folder; photos one album at a
   time, tagged ``album=NAME``); a worker with OCR on ingests it for tenant ``ocr-on``.
   Each ingest is timed: seconds per page (PDF page, image or keyframe) with and without OCR;
2. every question is asked (``Ask``, ``generate=False``, ``top_k=5``) of both tenants in
   four modes, each chosen by the product's real settings, one worker per setting:

   - dense only: ``MMRAG_LEXICAL=false``, ``rerank=False``;
   - lexical only: ``MMRAG_FUSION_DENSE_WEIGHT=0``, ``rerank=False``; a source the dense leg
     alone brought has a fused score of 0 and is not counted;
   - hybrid: the defaults (``MMRAG_LEXICAL=true``, both weights 1), ``rerank=False``;
   - hybrid + re-rank: the defaults, ``rerank=True`` (what an Ask does by default).

A hit is right when it is the question's asset and, for a PDF, a chunk of the right page
(``page:N`` or a passage ``page:N:p:K``), for a video a keyframe inside the card's time
span; any chunk of a right image. recall@5: share of questions with a right hit in the top
5; nDCG@5 with one relevant location: ``1 / log2(1 + rank)`` of the first right hit.

Goal (issue 15): hybrid + OCR recall@5 >= 0.90, at least +0.30 over dense only, and on every
slice the hybrid at least as good as the better of its two legs. A mode whose setting the
product does not have is reported as missing, never simulated. Everything it starts is
stopped by pid; the temporary directory is removed.

    .venv/bin/python bench/quality.py [--scale 1.0] [--seed 15] [--misses] [--keep DIR]
        [--setting MMRAG_X=VALUE ...]

The last line of output is one line of JSON with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The repository root instead of bench/ on the path: bench/http.py must not shadow the
# standard library's http when this file runs as a script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.quality_corpus import SLICES, Corpus, Question, generate  # noqa: E402
from settings import Settings, get_settings  # noqa: E402
from workflows.contracts import AskInput, Source  # noqa: E402

TENANTS = {"ocr-off": {"MMRAG_OCR_ENABLED": "false"}, "ocr-on": {"MMRAG_OCR_ENABLED": "true"}}
# mode -> (worker settings, AskInput.rerank, product settings it needs)
MODES: dict[str, tuple[dict[str, str], bool, tuple[str, ...]]] = {
    "dense": ({"MMRAG_LEXICAL": "false"}, False, ("lexical",)),
    "lexical": ({"MMRAG_FUSION_DENSE_WEIGHT": "0"}, False, ("lexical", "fusion_dense_weight")),
    "hybrid": ({}, False, ("lexical",)),
    "hybrid+rerank": ({}, True, ("lexical",)),
}
K = 5
CONCURRENT_ASKS = 4


def missing_settings() -> dict[str, list[str]]:
    """Mode (or "ocr") -> the product settings it needs that ``Settings`` lacks."""
    have = set(Settings.model_fields)
    out = {mode: [s for s in need if s not in have] for mode, (_, _, need) in MODES.items()}
    out["ocr"] = [s for s in ("ocr_enabled",) if s not in have]
    return {k: v for k, v in out.items() if v}


def first_right_rank(q: Question, sources: list[Source], corpus_root: Path) -> int:
    """1-based rank of the first source at the question's answer location, 0 if none."""
    want = (corpus_root / q.asset).resolve().as_uri()
    for rank, src in enumerate(sources[:K], 1):
        if src.uri != want:
            continue
        chunk = src.chunk
        if q.page:
            if chunk == f"page:{q.page}" or chunk.startswith(f"page:{q.page}:"):
                return rank
        elif q.frame_to >= 0:
            if chunk.startswith("frame:"):
                try:
                    t = float(chunk.split(":", 1)[1])
                except ValueError:
                    continue
                if q.frame_from <= t < q.frame_to:
                    return rank
        else:
            return rank
    return 0


@dataclass
class Score:
    recall: float
    ndcg: float
    n: int


def score(ranks: list[int]) -> Score:
    if not ranks:
        return Score(0.0, 0.0, 0)
    recall = sum(1 for r in ranks if r) / len(ranks)
    ndcg = sum(1 / math.log2(1 + r) for r in ranks if r) / len(ranks)
    return Score(round(recall, 3), round(ndcg, 3), len(ranks))


# -- the stack, workers, ingest and asks ------------------------------------------------------


@contextmanager
def worker(state: Path, env: dict[str, str], extra: dict[str, str]) -> Iterator[None]:
    """One worker process with every role and these extra settings, stopped by pid."""
    from starters.background import WorkerProcess

    proc = WorkerProcess.start(state, "all", {**env, **extra}, timeout=300)
    try:
        yield
    finally:
        proc.stop(timeout=30)


async def ingest_all(corpus: Corpus, tenant: str) -> dict[str, Any]:
    """Ingest every folder of the corpus for ``tenant``; seconds and outcome per folder."""
    from starters.demo import wait_searchable
    from starters.ingest import start_ingest
    from workers.temporal_client import connect

    client = await connect()
    out: dict[str, Any] = {"folders": {}, "vectors": 0, "failed": 0, "failures": []}
    started = time.perf_counter()
    for folder, tags in corpus.ingests:
        t0 = time.perf_counter()
        handle = await start_ingest(client, tenant, [str(corpus.root / folder)], tags=tags)
        result = await handle.result()
        out["folders"][folder] = {
            "s": round(time.perf_counter() - t0, 2),
            "ingested": result.ingested,
            "failed": result.failed,
            "vectors": result.vectors,
        }
        out["vectors"] += result.vectors
        out["failed"] += result.failed
        out["failures"] += [f"{f.uri}: {f.reason}"[:200] for f in result.failures][:5]
    out["s"] = round(time.perf_counter() - started, 2)
    await asyncio.to_thread(wait_searchable, tenant, out["vectors"], 60.0)
    return out


async def ask_all(
    questions: list[Question], tenant: str, rerank: bool, lexical_only: bool
) -> list[list[Source]]:
    """Every question asked of ``tenant`` (retrieval only); the top-5 sources of each."""
    from starters.ask import ask, ask_task_queue
    from workers.temporal_client import connect

    client = await connect()
    queue = await ask_task_queue(client)
    gate = asyncio.Semaphore(CONCURRENT_ASKS)

    async def one(q: Question) -> list[Source]:
        async with gate:
            inp = AskInput(tenant, text=q.question, top_k=K, rerank=rerank, generate=False)
            result = await ask(client, inp, queue)
        sources = result.sources
        if lexical_only:  # brought by the dense leg alone: weight 0, fused score 0
            sources = [s for s in sources if s.score > 0]
        return sources

    return list(await asyncio.gather(*(one(q) for q in questions)))


def table(results: dict[str, dict[str, dict[str, Score]]]) -> str:
    """mode x OCR rows, one recall@5 / nDCG@5 column per slice and overall."""
    cols = [*SLICES, "all"]
    lines = [f"{'mode':15} {'OCR':4} " + " ".join(f"{c:>13}" for c in cols)]
    lines.append(f"{'':20} " + " ".join(f"{'R@5  nDCG@5':>13}" for _ in cols))
    for mode, by_tenant in results.items():
        for tenant, slices in by_tenant.items():
            cells = " ".join(f"{slices[c].recall:5.2f} {slices[c].ndcg:6.2f} " for c in cols)
            lines.append(f"{mode:15} {tenant.removeprefix('ocr-'):4} {cells}")
    return "\n".join(lines)


def goals(results: dict[str, dict[str, dict[str, Score]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "hybrid" not in results or "dense" not in results:
        return {"evaluated": False}
    # The hybrid as an Ask runs it by default: fused, then re-ranked (and fused alone).
    for name in ("hybrid", "hybrid+rerank"):
        if name not in results:
            continue
        on = results[name]["ocr-on"]
        dense = results["dense"]["ocr-on"]["all"].recall
        entry: dict[str, Any] = {
            "recall": on["all"].recall,
            "recall_ge_0.90": on["all"].recall >= 0.90,
            "gain_over_dense": round(on["all"].recall - dense, 3),
            "gain_ge_0.30": on["all"].recall - dense >= 0.30 - 1e-9,
        }
        if "lexical" in results:
            worse = {}
            for tenant in results[name]:
                for sl in SLICES:
                    best_leg = max(
                        results["dense"][tenant][sl].recall, results["lexical"][tenant][sl].recall
                    )
                    if results[name][tenant][sl].recall < best_leg:
                        worse[f"{tenant}/{sl}"] = (results[name][tenant][sl].recall, best_leg)
            entry["slices_below_best_leg"] = worse
            entry["every_slice_ge_best_leg"] = not worse
        checks = ("recall_ge_0.90", "gain_ge_0.30", "every_slice_ge_best_leg")
        entry["met"] = all(entry.get(c, False) for c in checks)
        out[name] = entry
    return out


async def run(args: argparse.Namespace, tmp: Path, env: dict[str, str]) -> dict[str, Any]:
    state = Path(env["MMRAG_STATE_DIR"])
    t0 = time.perf_counter()
    corpus = generate(tmp / "corpus", args.seed, args.scale)
    print(
        f"corpus: {corpus.items} items, {corpus.pages} pages/images/keyframes, "
        f"{len(corpus.questions)} questions ({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    missing = missing_settings()
    for what, names in missing.items():
        print(f"NOT MEASURED: {what} needs product settings {names}, which do not exist yet")
    tenants = {"ocr-off": TENANTS["ocr-off"]} if "ocr" in missing else TENANTS
    ingest: dict[str, Any] = {}
    for tenant, extra in tenants.items():
        with worker(state, env, extra):
            print(f"ingest for tenant {tenant} ({extra})...", flush=True)
            ingest[tenant] = await ingest_all(corpus, tenant)
            print(
                f"  {ingest[tenant]['s']} s, {ingest[tenant]['vectors']} vectors, "
                f"{ingest[tenant]['failed']} failed {ingest[tenant]['failures'][:3]}",
                flush=True,
            )
    results: dict[str, dict[str, dict[str, Score]]] = {}
    by_settings: dict[str, list[str]] = {}
    for mode, (extra, _, _) in MODES.items():
        if mode not in missing:
            by_settings.setdefault(json.dumps(extra, sort_keys=True), []).append(mode)
    for key, modes in by_settings.items():
        with worker(state, env, json.loads(key)):
            for mode in modes:
                extra, rerank, _ = MODES[mode]
                results[mode] = {}
                for tenant in tenants:
                    t1 = time.perf_counter()
                    found = await ask_all(corpus.questions, tenant, rerank, mode == "lexical")
                    ranks = [
                        first_right_rank(q, s, corpus.root)
                        for q, s in zip(corpus.questions, found, strict=True)
                    ]
                    slices = {
                        sl: score(
                            [
                                r
                                for q, r in zip(corpus.questions, ranks, strict=True)
                                if q.slice == sl
                            ]
                        )
                        for sl in SLICES
                    }
                    slices["all"] = score(ranks)
                    results[mode][tenant] = slices
                    print(
                        f"  {mode:14} {tenant}: recall@5 {slices['all'].recall:.2f} "
                        f"nDCG@5 {slices['all'].ndcg:.2f} "
                        f"({len(ranks)} asks, {time.perf_counter() - t1:.0f} s)",
                        flush=True,
                    )
                    if args.misses and tenant == "ocr-on":
                        for q, r, s in zip(corpus.questions, ranks, found, strict=True):
                            if not r:
                                got = [f"{Path(x.uri).name}#{x.chunk}" for x in s]
                                print(f"    miss {q.id} {q.question!r}: {got}")
    print()
    print(table(results))
    cost = {}
    for tenant, figures in ingest.items():
        cost[tenant] = {
            "s_per_page": round(figures["s"] / corpus.pages, 3),
            "s_per_page_by_folder": {
                folder: round(v["s"] / max(1, corpus.pages_by_folder[folder]), 3)
                for folder, v in figures["folders"].items()
            },
        }
    print()
    for tenant, c in cost.items():
        by = ", ".join(f"{f} {v}" for f, v in c["s_per_page_by_folder"].items() if "/" not in f)
        print(
            f"ingest {tenant}: {c['s_per_page']} s per page (PDF page, image or keyframe); "
            f"by folder: {by}, photos {c['s_per_page_by_folder'].get('photos/harbour')}"
        )
    g = goals(results)
    print()
    print(f"goals: {json.dumps(g)}")
    return {
        "bench": "quality",
        "seed": args.seed,
        "scale": args.scale,
        "settings": args.setting,
        "items": corpus.items,
        "pages": corpus.pages,
        "questions": len(corpus.questions),
        "questions_by_slice": {
            sl: sum(1 for q in corpus.questions if q.slice == sl) for sl in SLICES
        },
        "not_measured": missing,
        "recall_at_5": {
            m: {t: {sl: v.recall for sl, v in s.items()} for t, s in r.items()}
            for m, r in results.items()
        },
        "ndcg_at_5": {
            m: {t: {sl: v.ndcg for sl, v in s.items()} for t, s in r.items()}
            for m, r in results.items()
        },
        "ingest": {t: {**cost[t], "failed": ingest[t]["failed"]} for t in ingest},
        "goals": g,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--scale", type=float, default=1.0, help="corpus size factor")
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--misses", action="store_true", help="list every missed question")
    parser.add_argument("--keep", type=Path, help="copy the corpus here before cleaning up")
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="MMRAG_X=VALUE",
        help="a product setting for every worker (say MMRAG_RRF_K=20); repeatable",
    )
    args = parser.parse_args(argv)

    from bench.ask import bench_env
    from stack.services import Stack, StackPorts

    tmp = Path(tempfile.mkdtemp(prefix="mmrag-bench-quality-"))
    state = tmp / "state"
    stack = Stack(state, StackPorts.free())
    t0 = time.perf_counter()
    try:
        endpoints = stack.up()
        # Generation is never called (retrieval-only Asks): no LLM server is started.
        env = bench_env(state, endpoints, "http://127.0.0.1:9/v1", args.torch_threads, 2)
        env.update(dict(kv.split("=", 1) for kv in args.setting))
        os.environ.update(env)
        get_settings.cache_clear()
        print(f"stack up in {time.perf_counter() - t0:.1f} s ({state})", flush=True)
        figures = asyncio.run(run(args, tmp, env))
        if args.keep:
            shutil.copytree(tmp / "corpus", args.keep, dirs_exist_ok=True)
    finally:
        stack.down()
        shutil.rmtree(tmp, ignore_errors=True)
    figures["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
