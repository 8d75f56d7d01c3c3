"""What the lexical leg of an Ask costs, and which lexical ranking finds more, in one run.

Starts its own embedded stack (Temporal, Milvus, Postgres) in a temporary directory and
ingests, through ``IngestBatch`` and one product worker process, a labelled corpus it
generates: ``--docs`` three-page PDFs whose every page holds five paragraphs, one of them a
fact with an identifier (an invoice number, a part number, a locker), a name and plain
words, plus ``--images`` synthetic images. Each fact gets two questions: one that names its
identifier and one in plain words only. Then, all against the same data:

1. **Ranking** (the lexical leg alone, ``activities/store/lexical.py`` ``search``): recall@1,
   recall@5 and MRR of the fact's page for the shipped ranking (``RANK_SQL``: coverage of
   the question's words, digits counting double, then ``ts_rank``) and for ``ts_rank_cd``
   alone (``RANK_SQL_CD``), and the statement's own time (p50/p99).
2. **Retrieval in-process**: the product's ``AskActivities.retrieve`` (Milvus search, the
   one SQL statement, fusion, re-rank, prompt fusion) with ``MMRAG_LEXICAL`` on and off,
   question by question alternately, on vectors encoded once by the product's
   ``QueryEncodeActivities``; and recall@5 of the fact's page for each.
3. **Ask**: retrieval-only ``Ask`` workflows (``generate=False``) on the query queue,
   served by a product worker process (``mmrag worker --role all``) started with
   ``MMRAG_LEXICAL=true``, then one with ``false``, ``--rounds`` times alternately, fresh
   questions each round; p50/p99 end to end.

With ``--sweep`` it measures the fusion instead, on bench/quality.py's labelled corpus
(documents, scans, photos, frames; ingested once, OCR on): recall@5 and nDCG@5 per slice of
hybrid and hybrid + re-rank Asks for each ``MMRAG_FUSION_AGREEMENT`` value (one worker
process per value), beside the dense and lexical legs alone.

Every process it starts is stopped by pid and the temporary directory is removed. Run it
twice to see the noise of a shared machine (docs/retrieval.md has two runs):

    .venv/bin/python bench/lexical.py [--docs 60] [--images 60] [--rounds 2]
    .venv/bin/python bench/lexical.py --sweep [--scale 1.0] [--agreements 0,0.25,0.5,1]

The last line of output is one line of JSON with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from settings import get_settings  # noqa: E402
from workflows.contracts import QUERY_TASK_QUEUE, AskFilters, AskInput, asset_id_for  # noqa: E402

TENANT = "bench-lexical"
K = 5
_FIRST = [
    "Ada",
    "Bela",
    "Cora",
    "Dina",
    "Ewan",
    "Farid",
    "Gala",
    "Hugo",
    "Ines",
    "Jonas",
    "Kira",
    "Luca",
    "Mona",
    "Nils",
    "Olga",
    "Piet",
]
_LAST = [
    "Varga",
    "Okafor",
    "Lindqvist",
    "Moreau",
    "Tanaka",
    "Novak",
    "Silva",
    "Kowalski",
    "Haddad",
    "Berger",
    "Rossi",
]
_GOODS = [
    "copper valves",
    "steel brackets",
    "rubber seals",
    "glass panels",
    "oak pallets",
    "nylon straps",
    "brass fittings",
    "cedar planks",
    "cotton sacks",
    "zinc bolts",
    "ceramic tiles",
    "hemp rope",
]
_PLACES = ["north depot", "harbour gate", "east yard", "river dock", "hill store", "south annex"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_FILLER = [
    "The plant ran at full load through the week.",
    "Shift leaders logged inspections at every change.",
    "Maintenance replaced the worn belts on line two.",
    "The canteen menu changed on Monday as planned.",
    "Visitors signed in at the main reception desk.",
    "Forklift drivers completed their annual refresher.",
    "The roof survey found no new leaks this month.",
    "Energy use fell slightly after the lighting upgrade.",
]


@dataclass
class Question:
    text: str
    asset_id: str
    page: int
    kind: str  # "identifier" | "words"


def corpus(root: Path, docs: int, images: int, seed: int) -> tuple[list[Question], list[Path]]:
    """PDFs with one fact per page in a random paragraph, two questions per fact."""
    from starters.synthetic_corpus import PdfPage, write_corpus, write_pdf

    rng = random.Random(seed)
    combos = [(g, p, d) for g in _GOODS for p in _PLACES for d in _DAYS]
    rng.shuffle(combos)  # each (goods, place, day) once: a words-only question has one answer
    questions: list[Question] = []
    (root / "docs").mkdir(parents=True)
    for d in range(docs):
        pages = []
        facts = []
        for page in range(1, 4):
            who = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
            goods, place, day = combos.pop()
            ident = f"{rng.choice('ABCDEFGH')}{rng.choice('KLMNPRST')}-{rng.randint(1000, 9999)}"
            fact = [f"Order {ident}: {who} signed for", f"the {goods} at the {place}", f"on {day}."]
            at = rng.randint(0, 4)
            lines: list[str] = []
            for n in range(5):
                lines += fact if n == at else rng.sample(_FILLER, 2)
                lines.append("")
            pages.append(PdfPage(lines))
            facts.append((page, ident, f"{goods} at the {place} on {day}"))
        path = write_pdf(root / "docs" / f"report-{d:03d}.pdf", pages)
        asset_id = asset_id_for(TENANT, path.resolve().as_uri())
        for page, ident, what in facts:
            questions.append(
                Question(f"Who signed for order {ident}?", asset_id, page, "identifier")
            )
            questions.append(Question(f"Who signed for the {what}?", asset_id, page, "words"))
    write_corpus(root / "images", per_class=max(1, images // 12), seed=seed)
    rng.shuffle(questions)
    return questions, [root / "docs", root / "images"]


def rank_of(q: Question, hits: list[tuple[str, str]]) -> int:
    """1-based rank of the fact's page among (asset_id, chunk) hits; 0: not found."""
    for i, (asset_id, chunk) in enumerate(hits, 1):
        if asset_id == q.asset_id and chunk.split(":")[:2] == ["page", str(q.page)]:
            return i
    return 0


def quality(ranks: list[int]) -> dict[str, float]:
    n = max(1, len(ranks))
    return {
        "recall_at_1": round(sum(1 for r in ranks if r == 1) / n, 3),
        "recall_at_5": round(sum(1 for r in ranks if 0 < r <= K) / n, 3),
        "mrr": round(sum(1 / r for r in ranks if r) / n, 3),
        "n": len(ranks),
    }


def by_kind(questions: list[Question], ranks: list[int]) -> dict[str, dict[str, float]]:
    out = {"all": quality(ranks)}
    for kind in ("identifier", "words"):
        out[kind] = quality([r for q, r in zip(questions, ranks, strict=True) if q.kind == kind])
    return out


def timing(values: list[float]) -> dict[str, float]:
    from bench.ask import summary

    return summary(values)


def ranking(questions: list[Question]) -> dict[str, Any]:
    """The lexical leg alone, each ranking on every question, alternately."""
    from activities.store import lexical
    from activities.store.registry import get_engine

    engine = get_engine(get_settings().database_endpoint())
    rankings = {"shipped": lexical.RANK_SQL, "ts_rank_cd": lexical.RANK_SQL_CD}
    ranks: dict[str, list[int]] = {name: [] for name in rankings}
    ms: dict[str, list[float]] = {name: [] for name in rankings}
    with engine.connect() as conn:
        for q in questions:
            for name, sql in rankings.items():
                t0 = time.perf_counter()
                found = lexical.search(conn, TENANT, q.text, AskFilters(), K * 4, rank_sql=sql)
                ms[name].append((time.perf_counter() - t0) * 1000)
                ranks[name].append(rank_of(q, [h.key for h in found.hits]))
        rows = conn.exec_driver_sql(
            "SELECT count(*), pg_total_relation_size('lexical_chunks') FROM lexical_chunks"
        ).one()
    return {
        name: {"quality": by_kind(questions, ranks[name]), "ms": timing(ms[name])}
        for name in rankings
    } | {"rows": int(rows[0]), "table_bytes": int(rows[1])}


def in_process(questions: list[Question]) -> dict[str, Any]:
    """``AskActivities.retrieve`` with the lexical leg on and off, question by question."""
    from activities.ask import AskActivities
    from activities.encode_query import QueryEncodeActivities
    from workflows.activities.ask import EncodeQueryInput, RetrieveInput

    settings = get_settings()
    encoder = QueryEncodeActivities(settings)
    modes = {
        "hybrid": AskActivities(settings.model_copy(update={"lexical": True})),
        "dense": AskActivities(settings.model_copy(update={"lexical": False})),
    }
    ms: dict[str, list[float]] = {m: [] for m in modes}
    ranks: dict[str, list[int]] = {m: [] for m in modes}
    for i, q in enumerate(questions):
        vec = encoder.encode_query(EncodeQueryInput(text=q.text, tenant=TENANT))
        inp = RetrieveInput(
            TENANT, q.text, vec.vector, vec.model, K, AskFilters(), True, 300,
            vec.collection, vec.index_version,
        )  # fmt: skip
        order = list(modes) if i % 2 == 0 else list(reversed(modes))
        for mode in order:
            t0 = time.perf_counter()
            out = modes[mode].retrieve(replace(inp))
            ms[mode].append((time.perf_counter() - t0) * 1000)
            ranks[mode].append(rank_of(q, [(s.asset_id, s.chunk) for s in out.sources]))
    return {
        m: {"quality": by_kind(questions, ranks[m]), "retrieve_ms": timing(ms[m])} for m in modes
    }


@contextmanager
def worker(state: Path, env: dict[str, str], lexical_on: bool) -> Iterator[None]:
    from starters.background import WorkerProcess

    extra = {"MMRAG_LEXICAL": "true" if lexical_on else "false"}
    proc = WorkerProcess.start(state, "all", {**env, **extra}, timeout=300)
    try:
        yield
    finally:
        proc.stop(timeout=30)


async def asks(questions: list[Question]) -> tuple[list[float], list[int]]:
    """Retrieval-only Asks on the query queue, one at a time: (ms, ranks)."""
    from starters.ask import ask
    from workers.temporal_client import connect

    client = await connect()
    ms, ranks = [], []
    for q in questions:
        t0 = time.perf_counter()
        result = await ask(client, AskInput(TENANT, text=q.text, top_k=K, generate=False),
                           QUERY_TASK_QUEUE)  # fmt: skip
        ms.append((time.perf_counter() - t0) * 1000)
        ranks.append(rank_of(q, [(s.asset_id, s.chunk) for s in result.sources]))
    return ms, ranks


async def ingest(paths: list[Path]) -> dict[str, Any]:
    from starters.demo import wait_searchable
    from starters.ingest import start_ingest
    from workers.temporal_client import connect

    client = await connect()
    t0 = time.perf_counter()
    vectors = failed = 0
    for path in paths:
        result = await (await start_ingest(client, TENANT, [str(path)])).result()
        vectors += result.vectors  # type: ignore[attr-defined]
        failed += result.failed  # type: ignore[attr-defined]
    await asyncio.to_thread(wait_searchable, TENANT, vectors, 60.0)
    return {"s": round(time.perf_counter() - t0, 1), "vectors": vectors, "failed": failed}


def run(args: argparse.Namespace, tmp: Path, env: dict[str, str]) -> dict[str, Any]:
    state = Path(env["MMRAG_STATE_DIR"])
    questions, paths = corpus(tmp / "corpus", args.docs, args.images, args.seed)
    print(f"corpus: {args.docs} PDFs x 3 pages, {len(questions)} questions", flush=True)
    with worker(state, env, True):
        ingested = asyncio.run(ingest(paths))
    print(f"ingest: {ingested}", flush=True)
    figures: dict[str, Any] = {"ingest": ingested, "questions": len(questions)}
    figures["ranking"] = ranking(questions)
    for name in ("shipped", "ts_rank_cd"):
        r = figures["ranking"][name]
        print(f"lexical ranking {name:10}: {r['quality']} {r['ms']}", flush=True)
    figures["in_process"] = in_process(questions)
    for mode, r in figures["in_process"].items():
        print(f"in-process retrieve {mode:6}: {r['quality']['all']} {r['retrieve_ms']}")
    per_round = max(1, len(questions) // (2 * args.rounds))
    ask_ms: dict[str, list[float]] = {"hybrid": [], "dense": []}
    ask_ranks: dict[str, list[int]] = {"hybrid": [], "dense": []}
    for r in range(args.rounds):
        for mode in ("hybrid", "dense") if r % 2 == 0 else ("dense", "hybrid"):
            start = (2 * r + (mode == "dense")) * per_round
            batch = questions[start : start + per_round]
            with worker(state, env, mode == "hybrid"):
                asyncio.run(asks(batch[:3]))  # warm-up: the worker's first Asks
                ms, ranks = asyncio.run(asks(batch))
            ask_ms[mode] += ms
            ask_ranks[mode] += ranks
            print(f"round {r + 1} Ask {mode}: p50 {statistics.median(ms):.1f} ms", flush=True)
    figures["ask"] = {
        m: {"ms": timing(ask_ms[m]), "recall_at_5": quality(ask_ranks[m])["recall_at_5"]}
        for m in ask_ms
    }
    hybrid, dense = figures["ask"]["hybrid"]["ms"], figures["ask"]["dense"]["ms"]
    ip = figures["in_process"]
    figures["lexical_leg_ms"] = {
        "ask_p50": round(hybrid["p50"] - dense["p50"], 1),
        "retrieve_p50": round(
            ip["hybrid"]["retrieve_ms"]["p50"] - ip["dense"]["retrieve_ms"]["p50"], 1
        ),
        "sql_p50": figures["ranking"]["shipped"]["ms"]["p50"],
    }
    print(f"Ask p50 hybrid {hybrid['p50']} ms, dense {dense['p50']} ms; lexical leg: "
          f"{figures['lexical_leg_ms']}")  # fmt: skip
    return figures


def sweep(args: argparse.Namespace, tmp: Path, env: dict[str, str]) -> dict[str, Any]:
    """Fusion variants on the quality bench's corpus (its own helpers, same labels)."""
    from bench import quality
    from bench.quality_corpus import SLICES, generate

    state = Path(env["MMRAG_STATE_DIR"])
    data = generate(tmp / "corpus", args.seed, args.scale)
    tenant = "ocr-on"
    print(f"corpus: {data.items} items, {len(data.questions)} questions", flush=True)
    with quality.worker(state, env, {"MMRAG_OCR_ENABLED": "true"}):
        ingested = asyncio.run(quality.ingest_all(data, tenant))
    print(f"ingest: {ingested['s']} s, {ingested['vectors']} vectors", flush=True)
    modes: dict[str, tuple[dict[str, str], bool, bool]] = {
        "dense": ({"MMRAG_LEXICAL": "false"}, False, False),
        "lexical": ({"MMRAG_FUSION_DENSE_WEIGHT": "0"}, False, True),
    }
    for a in args.agreements.split(","):
        extra = {"MMRAG_FUSION_AGREEMENT": a}
        modes[f"hybrid a={a}"] = (extra, False, False)
        modes[f"hybrid+rerank a={a}"] = (extra, True, False)
    out: dict[str, Any] = {}
    by_settings: dict[str, list[str]] = {}
    for mode, (extra, _, _) in modes.items():
        by_settings.setdefault(json.dumps(extra, sort_keys=True), []).append(mode)
    for key, names in by_settings.items():
        with quality.worker(state, env, {"MMRAG_OCR_ENABLED": "true", **json.loads(key)}):
            for mode in names:
                _, rerank, lexical_only = modes[mode]
                found = asyncio.run(quality.ask_all(data.questions, tenant, rerank, lexical_only))
                ranks = [
                    quality.first_right_rank(q, s, data.root)
                    for q, s in zip(data.questions, found, strict=True)
                ]
                slices = {
                    sl: quality.score(
                        [r for q, r in zip(data.questions, ranks, strict=True) if q.slice == sl]
                    )
                    for sl in SLICES
                }
                slices["all"] = quality.score(ranks)
                out[mode] = {sl: [v.recall, v.ndcg] for sl, v in slices.items()}
                cells = "  ".join(f"{sl} {v.recall:.2f}/{v.ndcg:.2f}" for sl, v in slices.items())
                print(f"{mode:22} {cells}", flush=True)
    return {"sweep": out, "questions": len(data.questions), "scale": args.scale}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--docs", type=int, default=60, help="three-page PDFs (2 questions/page)")
    parser.add_argument("--images", type=int, default=60, help="synthetic images beside them")
    parser.add_argument("--rounds", type=int, default=2, help="Ask rounds per mode")
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--sweep", action="store_true", help="fusion variants (quality corpus)")
    parser.add_argument("--scale", type=float, default=1.0, help="--sweep: corpus size factor")
    parser.add_argument("--agreements", default="0,0.25,0.5,1", help="--sweep: values to try")
    args = parser.parse_args(argv)

    from bench.ask import bench_env
    from stack.services import Stack, StackPorts

    tmp = Path(tempfile.mkdtemp(prefix="mmrag-bench-lexical-"))
    state = tmp / "state"
    stack = Stack(state, StackPorts.free())
    t0 = time.perf_counter()
    try:
        endpoints = stack.up()
        env = bench_env(state, endpoints, "http://127.0.0.1:9/v1", 2, 2)
        os.environ.update(env)
        get_settings.cache_clear()
        figures = sweep(args, tmp, env) if args.sweep else run(args, tmp, env)
    finally:
        stack.down()
        shutil.rmtree(tmp, ignore_errors=True)
    figures["total_s"] = round(time.perf_counter() - t0, 1)
    figures["bench"] = "lexical"
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
