"""The lexical index: Postgres full-text search over every chunk's words (migration 0006).

Why Postgres and how (docs/retrieval.md has the measurements):

- **Exact tokens.** CLIP matches a part number, a name or an invoice id worst, and sees a
  page's text through a 77-token window; a lexical index finds them by their words.
- **In the stack already**, transactional with the registry and scaling with it; the
  embedded Milvus 2.3.5 has no BM25.
- **One row per chunk** that has any words, keyed like its Milvus row ``(tenant, asset_id,
  chunk)``: the passage or OCR text (``body``), a caption, the file name, the tags. Postgres
  keeps a weighted ``tsvector`` of them (text A, caption and tags B, file name C) in a
  generated column with a GIN index. Rows are copied from the Milvus rows an encode batch
  wrote, by the cpu worker that records the batch (:func:`index_assets`): the encode worker
  has no database login, and reading the rows back keeps both stores saying the same thing.
- **Queries are literals.** The question is cut into words here (:func:`query_terms`), each
  word a bound parameter of ``plainto_tsquery``, which reads no operator at all; the words
  are OR-ed, so a natural-language question matches a chunk holding some of its words.
  Nothing a caller sends is ever part of the SQL text.
- **Ranking** (:data:`RANK_SQL`): how many of the question's words a chunk holds (a word
  with a digit, such as a part number, counts double: it is what names one thing), then
  ``ts_rank`` with length normalisation to order chunks holding the same words. Chosen by
  measurement over ``ts_rank_cd`` alone (bench/lexical.py, docs/retrieval.md).
- **Tenant and filters in every WHERE**: the tenant always, and each structured filter
  compiled as the Milvus one is (``filters_problem`` validates both), so a lexical hit can
  never be one the vector search would have filtered out.

One module of ~410 lines: the table, its writers and its one query share the word rules
(``query_terms``, the weights), which must read the same on both sides.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import unquote

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection, Engine

from activities.rag.rerank import SearchHit
from activities.store import index_versions, registry
from workflows.contracts import FAILED, INGESTED, AskFilters, AssetOutcome
from workflows.limits import filters_problem

#: The text search configuration of the stored vectors (migrations/versions/0006_lexical.py).
TS_CONFIG = "english"
#: Words of a question used at most (the rest are ignored), and longest word kept.
MAX_TERMS = 32
MAX_TERM_CHARS = 64
#: A word: letters and digits, joined by ``-``, ``.``, ``/`` or ``_`` inside one token
#: ("AX-4421-B", "v2.3", "10/12"); Postgres's parser splits it as it splits stored text.
_TERM = re.compile(r"[^\W_]+(?:[-./_][^\W_]+)*")
_DIGIT = re.compile(r"\d")

lexical_chunks = sa.Table(
    "lexical_chunks",
    sa.MetaData(),
    sa.Column("tenant", sa.String(128), primary_key=True),
    sa.Column("asset_id", sa.String(64), primary_key=True),
    sa.Column("chunk", sa.String(255), primary_key=True),
    sa.Column("uri", sa.Text),
    sa.Column("media_type", sa.String(64)),
    sa.Column("created_at", sa.BigInteger),
    sa.Column("tags", ARRAY(sa.Text)),
    sa.Column("tag_text", sa.Text),
    sa.Column("name", sa.Text),
    sa.Column("body", sa.Text),
    sa.Column("origin", sa.String(16)),
    sa.Column("caption", sa.Text),
    sa.Column("content_hash", sa.String(128)),
    sa.Column("updated_at", sa.DateTime(timezone=True)),
)


class BadLexicalFilter(ValueError):
    """A filter value that would not compile to exactly the filter asked for."""


@dataclass
class LexicalRow:
    """One chunk's words as the lexical index stores them."""

    tenant: str
    asset_id: str
    chunk: str
    uri: str
    media_type: str
    created_at: int = 0
    tags: dict[str, str] = field(default_factory=dict)
    body: str = ""  # passage, page text or OCR text
    origin: str = ""  # "text-layer" | "ocr" | "" (activities/media/formats.py MediaChunk)
    caption: str = ""
    content_hash: str = ""

    def values(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "asset_id": self.asset_id,
            "chunk": self.chunk,
            "uri": self.uri,
            "media_type": self.media_type,
            "created_at": int(self.created_at),
            "tags": [f"{k}={v}" for k, v in sorted(self.tags.items())],
            "tag_text": " ".join(f"{k} {v}" for k, v in sorted(self.tags.items())),
            "name": file_name_words(self.uri),
            "body": self.body,
            "origin": self.origin,
            "caption": self.caption,
            "content_hash": self.content_hash,
        }


def file_name_words(uri: str) -> str:
    """The words of an object's file name ("IMG_2034-red car.jpg" -> "IMG 2034 red car")."""
    stem = PurePosixPath(unquote(uri.split("?", 1)[0])).stem
    return " ".join(re.split(r"[\W_]+", stem)).strip()


def origin_of(media_type: str, chunk: str, body: str) -> str:
    """Where a chunk's text came from, as far as its Milvus row tells: an image's or a
    frame's text is OCR (activities/media); a page's is its text layer or OCR, not told
    apart there, so "" (the prompt then calls it the page's text)."""
    if not body:
        return ""
    if chunk == "image" or chunk.startswith("frame:"):
        return "ocr"
    return ""


# -- writes --------------------------------------------------------------------------------
def replace_assets(
    conn: Connection,
    tenant: str,
    asset_ids: Sequence[str],
    rows: Iterable[LexicalRow],
    unchanged: Iterable[str] = (),
) -> int:
    """The lexical rows of these assets become exactly ``rows`` (re-ingest replaces, a failed
    asset loses its rows), in the caller's transaction. The ``unchanged`` assets (same
    object generation: a re-index, a retried batch) keep the captions of their chunks, so a
    caption is never redone for the same content; a changed object's are dropped with it.
    Returns how many rows were written."""
    if not asset_ids:
        return 0
    t = lexical_chunks
    same = list(set(unchanged) & set(asset_ids))
    kept = (
        {
            (r.asset_id, r.chunk): (r.caption, r.content_hash)
            for r in conn.execute(
                sa.select(t.c.asset_id, t.c.chunk, t.c.content_hash, t.c.caption).where(
                    t.c.tenant == tenant, t.c.asset_id.in_(same), t.c.caption != ""
                )
            )
        }
        if same
        else {}
    )
    conn.execute(sa.delete(t).where(t.c.tenant == tenant, t.c.asset_id.in_(list(asset_ids))))
    values = []
    for row in rows:
        if row.tenant != tenant or row.asset_id not in asset_ids:
            raise ValueError(f"lexical row {row.asset_id}:{row.chunk} is not in this batch")
        v = row.values()
        if not v["caption"] and (row.asset_id, row.chunk) in kept:
            v["caption"], v["content_hash"] = kept[(row.asset_id, row.chunk)]
        values.append(v)
    if values:
        conn.execute(sa.insert(t), values)
    return len(values)


def delete_assets(conn: Connection, tenant: str, asset_ids: Sequence[str]) -> int:
    """Remove every lexical row of these assets (Forget, removal by a re-index)."""
    if not asset_ids:
        return 0
    t = lexical_chunks
    result = conn.execute(
        sa.delete(t).where(t.c.tenant == tenant, t.c.asset_id.in_(list(asset_ids)))
    )
    return int(result.rowcount or 0)


def set_tags(conn: Connection, tenant: str, asset_ids: Sequence[str], tags: dict[str, str]) -> int:
    """New tags for every row of these assets, words and captions kept: an unchanged object
    ingested again with other tags (activities/ingest.py ``retag_assets``)."""
    if not asset_ids:
        return 0
    t = lexical_chunks
    values = LexicalRow(tenant, "", "", "", "", tags=tags).values()
    result = conn.execute(
        sa.update(t)
        .where(t.c.tenant == tenant, t.c.asset_id.in_(list(asset_ids)))
        .values(tags=values["tags"], tag_text=values["tag_text"], updated_at=sa.func.now())
    )
    return int(result.rowcount or 0)


def set_caption(
    engine: Engine, tenant: str, asset_id: str, chunk: str, caption: str, content_hash: str
) -> bool:
    """Store a caption for an image or keyframe chunk (the caption activity's result) and
    the hash of the content it describes; False when the chunk has no row (forgotten or
    re-ingested meanwhile: the caption is not wanted)."""
    t = lexical_chunks
    with engine.begin() as conn:
        result = conn.execute(
            sa.update(t)
            .where(t.c.tenant == tenant, t.c.asset_id == asset_id, t.c.chunk == chunk)
            .values(caption=caption, content_hash=content_hash, updated_at=sa.func.now())
        )
    return bool(result.rowcount)


def index_assets(
    engine: Engine,
    store: Any,
    collection: str,
    tenant: str,
    ingested: Sequence[str],
    failed: Sequence[str] = (),
    unchanged: Iterable[str] = (),
) -> int:
    """Copy the chunk rows an encode batch wrote for ``ingested`` assets from Milvus (Strong
    read of ``collection``) into the lexical index, replacing the assets' rows; ``failed``
    assets lose theirs, as they lost their vectors. Idempotent: a retried batch writes the
    same rows again; ``unchanged`` assets keep their captions (:func:`replace_assets`).
    ``store`` is a :class:`activities.store.vectors.VectorStore`."""
    chunk_rows = store.chunk_rows(collection, tenant, list(ingested)) if ingested else []
    rows = [
        LexicalRow(
            tenant=tenant,
            asset_id=r.asset_id,
            chunk=r.chunk,
            uri=r.uri,
            media_type=r.media_type,
            created_at=r.created_at,
            tags=dict(r.tags),
            body=r.snippet,
            origin=origin_of(r.media_type, r.chunk, r.snippet),
        )
        for r in chunk_rows
    ]
    with engine.begin() as conn:
        return replace_assets(conn, tenant, [*ingested, *failed], rows, unchanged)


def index_outcomes(
    engine: Engine, store: Any, index_version: int, tenant: str, outcomes: Sequence[AssetOutcome]
) -> int:
    """:func:`index_assets` for a recorded batch: its ingested assets' rows copied from the
    collection of ``index_version``, its failed assets' rows removed (record_outcomes, on
    the cpu worker, after every encode batch of an ingest or a re-index, before the registry
    records the batch: an asset whose generation the registry still holds is unchanged and
    keeps its captions)."""
    ingested = [o.asset_id for o in outcomes if o.status == INGESTED]
    known = registry.known_generations(engine, tenant, ingested)
    unchanged = [
        o.asset_id
        for o in outcomes
        if o.status == INGESTED
        and o.asset_id in known
        and known[o.asset_id].generation == o.generation
        and known[o.asset_id].status == INGESTED
    ]
    failed = [o.asset_id for o in outcomes if o.status == FAILED]
    if not ingested and not failed:
        return 0
    collection = next(
        (t.collection for t in index_versions.all_live(engine) if t.version == index_version),
        "",
    )
    if not collection:  # the version was dropped meanwhile: nothing to copy from
        ingested = []
    return index_assets(engine, store, collection, tenant, ingested, failed, unchanged)


# -- reads ---------------------------------------------------------------------------------
def query_terms(question: str) -> list[str]:
    """The words of a question the lexical leg searches for, in order, each once: letters
    and digits (and ``-./_`` inside a word), never an operator or quote."""
    seen: dict[str, None] = {}
    for match in _TERM.finditer(question.lower()):
        term = match.group(0)[:MAX_TERM_CHARS]
        if term not in seen:
            seen[term] = None
        if len(seen) >= MAX_TERMS:
            break
    return list(seen)


def _filter_sql(filters: AskFilters, params: dict[str, Any]) -> list[str]:
    """Structured filters as SQL clauses over bound parameters, validated as the Milvus
    filters are (workflows/limits.py): the same values pass or fail both."""
    problem = filters_problem(filters)
    if problem:
        raise BadLexicalFilter(problem)
    clauses: list[str] = []
    if filters.media_types:
        params["media_types"] = list(filters.media_types)
        clauses.append("c.media_type = ANY(:media_types)")
    if filters.created_after:
        params["created_after"] = int(filters.created_after)
        clauses.append("c.created_at >= :created_after")
    if filters.created_before:
        params["created_before"] = int(filters.created_before)
        clauses.append("c.created_at < :created_before")
    if filters.tags:
        params["tags"] = [f"{k}={v}" for k, v in sorted(filters.tags.items())]
        clauses.append("c.tags @> CAST(:tags AS text[])")
    if filters.asset_ids:
        params["asset_ids"] = list(filters.asset_ids)
        clauses.append("c.asset_id = ANY(:asset_ids)")
    return clauses


#: Coordination (weighted count of the question's words a chunk holds) + ``ts_rank`` with
#: length normalisation (32: rank / (rank + 1), so it only orders equal coverage).
RANK_SQL = "({coverage}) + ts_rank(c.document, q.query, 32)"
#: The alternative the bench measures against (docs/retrieval.md).
RANK_SQL_CD = "ts_rank_cd(c.document, q.query, 32)"

_COLUMNS = (
    "c.asset_id, c.chunk, c.uri, c.media_type, c.created_at, c.tags, c.body, c.origin, c.caption"
)


def _hit(row: Any, lexical_score: float | None, coverage: float = 0.0) -> SearchHit:
    return SearchHit(
        asset_id=row.asset_id,
        chunk=row.chunk,
        uri=row.uri,
        media_type=row.media_type,
        created_at=int(row.created_at),
        tags=list(row.tags or []),
        snippet=row.body,
        caption=row.caption,
        origin=row.origin,
        lexical_score=lexical_score,
        lexical_coverage=coverage,
    )


@dataclass
class LexicalResult:
    """One Ask's lexical leg: its ranked hits, and the stored words of the dense leg's
    candidates (keyed ``(asset_id, chunk)``) so their full text, origin and caption reach
    re-ranking and the prompt without a second round trip."""

    hits: list[SearchHit]
    stored: dict[tuple[str, str], SearchHit]


def search(
    conn: Connection,
    tenant: str,
    question: str,
    filters: AskFilters,
    limit: int,
    fetch: Sequence[tuple[str, str]] = (),
    *,
    rank_sql: str = RANK_SQL,
) -> LexicalResult:
    """The ``limit`` best chunks of ``tenant`` for ``question``'s words that pass
    ``filters``, and in the same statement the stored rows of ``fetch`` (the dense
    candidates). One SQL statement, every value a bound parameter."""
    params: dict[str, Any] = {"tenant": tenant, "limit": max(0, int(limit))}
    where = ["c.tenant = :tenant", *_filter_sql(filters, params)]
    terms = query_terms(question) if limit > 0 else []
    parts: list[str] = []
    if terms:
        groups, weights, full = [], [], []
        for i, term in enumerate(terms):
            params[f"t{i}"] = term
            one = f"plainto_tsquery('{TS_CONFIG}', :t{i})"
            weight = 2 if _DIGIT.search(term) else 1
            groups.append(one)
            weights.append(f"CASE WHEN c.document @@ {one} THEN {weight} ELSE 0 END")
            full.append(f"CASE WHEN numnode({one}) > 0 THEN {weight} ELSE 0 END")  # stop words: 0
        query = " || ".join(groups)
        coverage = " + ".join(weights)
        rank = rank_sql.format(coverage=coverage)
        parts.append(
            f"(SELECT 'l' AS leg, {_COLUMNS}, {rank} AS rank, "
            f"({coverage})::float / greatest(q.total, 1) AS coverage "
            f"FROM lexical_chunks c, (SELECT {query} AS query, {' + '.join(full)} AS total) q "
            f"WHERE {' AND '.join(where)} AND c.document @@ q.query "
            f"ORDER BY rank DESC, c.asset_id, c.chunk LIMIT :limit)"
        )
    if fetch:
        params["fetch_assets"] = [a for a, _ in fetch]
        params["fetch_chunks"] = [c for _, c in fetch]
        parts.append(
            f"(SELECT 'd' AS leg, {_COLUMNS}, 0.0 AS rank, 0.0 AS coverage FROM lexical_chunks c "
            "WHERE c.tenant = :tenant AND (c.asset_id, c.chunk) IN "
            "(SELECT * FROM unnest(CAST(:fetch_assets AS text[]), "
            "CAST(:fetch_chunks AS text[]))))"
        )
    if not parts:
        return LexicalResult([], {})
    hits: list[SearchHit] = []
    stored: dict[tuple[str, str], SearchHit] = {}
    for row in conn.execute(sa.text(" UNION ALL ".join(parts)), params):
        if row.leg == "l":
            hits.append(_hit(row, float(row.rank), float(row.coverage)))
        else:
            stored[(row.asset_id, row.chunk)] = _hit(row, None)
    return LexicalResult(hits, stored)
