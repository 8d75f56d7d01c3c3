"""Ask activities on the ``mmrag`` worker: retrieval (search, re-rank, prompt fusion) and
finalisation (validation, citations, audit). Both run as local activities: short steps
that should not pay a task-queue round trip each.

Retrieval is hybrid (docs/retrieval.md): the Milvus search (dense), then one SQL statement
that is both the lexical leg (Postgres full-text search, activities/store/lexical.py) and the
read of the dense candidates' stored words (full text, origin, caption), so an Ask pays one
Postgres round trip for both; the two ranked lists are fused by reciprocal rank fusion and
re-ranked (activities/rag/rerank.py)."""

from __future__ import annotations

import hashlib
import time

from sqlalchemy.orm import Session
from temporalio.exceptions import ApplicationError

from activities.media.formats import truncate_utf8
from activities.rag.fusion import SourceChunk, extractive_answer, fuse_prompt, redacted_chunk
from activities.rag.guardrails import I_DONT_KNOW, insert_citations, redact_pii, validate_answer
from activities.rag.rerank import (
    DENSE,
    LEXICAL,
    RERANK_POOL,
    SearchHit,
    fuse_rrf,
    rerank,
    with_stored,
)
from activities.runtime import metrics
from activities.runtime.bounds import clamp_top_k
from activities.runtime.metrics import ms_since
from activities.runtime.run_context import workflow_ids
from activities.store import lexical, registry
from activities.store.vectors import MAX_SNIPPET, BadFilter, compile_filters, get_store
from settings import Settings
from workflows.activities import ask as ask_stubs
from workflows.activities import implements
from workflows.activities.ask import (
    FinalAnswer,
    FinalizeInput,
    Fusion,
    FusionChunk,
    Retrieval,
    RetrieveAndAnswerInput,
    RetrievedAnswer,
    RetrieveInput,
)
from workflows.contracts import Source


class AskActivities:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @property
    def engine(self):  # type: ignore[no-untyped-def]
        return registry.get_engine(self.settings.database_endpoint())

    @implements(ask_stubs.retrieve)
    def retrieve(self, inp: RetrieveInput) -> Retrieval:
        started = time.perf_counter()
        if not inp.collection:
            return Retrieval(0, [], "", "", 0, "Nothing has been ingested yet.", ms_since(started))
        f = inp.filters
        try:
            expr = compile_filters(
                f.media_types, f.created_after, f.created_before, f.tags, f.asset_ids
            )
        except BadFilter as e:  # the Ask workflow refuses these first; direct callers here
            raise ApplicationError(str(e), type="BadQuery", non_retryable=True) from None
        top_k = clamp_top_k(inp.top_k, self.settings)  # at most MMRAG_MAX_TOP_K
        hits = self._candidates(inp, expr, top_k)
        sources = [
            Source(
                id=f"S{i}",
                asset_id=h.asset_id,
                uri=h.uri,
                score=round(h.score, 4),
                media_type=h.media_type,
                chunk=h.chunk,
                snippet=redact_pii(truncate_utf8(h.snippet, MAX_SNIPPET))[0],
            )
            for i, h in enumerate(hits, 1)
        ]
        chunks = [
            SourceChunk(
                id=s.id,
                asset_id=s.asset_id,
                uri=s.uri,
                chunk=s.chunk,
                media_type=s.media_type,
                score=s.score,
                snippet=redact_pii(h.snippet)[0],
                caption=h.caption,
                tags=list(h.tags),
                origin=h.origin,
            )
            for s, h in zip(sources, hits, strict=True)
        ]
        prompt = fuse_prompt(
            inp.question,
            chunks,
            token_budget=self.settings.prompt_token_budget,
            per_chunk_tokens=self.settings.prompt_chunk_tokens,
        )
        fusion = None
        if prompt.shortened and self.settings.llm_summarize_chunks:
            # Over-cap sources: the generate worker may summarise them with the LLM and fuse
            # again. Only redacted text goes in the payload (and so in the history).
            used = set(prompt.used)
            fusion = Fusion(
                question=prompt.question,
                sources=[
                    FusionChunk(r.id, r.media_type, r.chunk, r.caption, r.snippet, r.tags, r.origin)
                    for r in (redacted_chunk(c) for c in chunks if c.id in used)
                ],
                shortened=prompt.shortened,
                token_budget=self.settings.prompt_token_budget,
                per_chunk_tokens=self.settings.prompt_chunk_tokens,
            )
        metrics.observe("retrieval_seconds", time.perf_counter() - started)
        return Retrieval(
            index_version=inp.index_version,
            sources=sources,
            system_prompt=prompt.system,
            user_prompt=prompt.user,
            prompt_tokens=prompt.tokens,
            extractive_answer=extractive_answer(inp.question, chunks) if chunks else "",
            ms=ms_since(started),
            context=prompt.context,
            fusion=fusion,
        )

    def _candidates(self, inp: RetrieveInput, expr: str, top_k: int) -> list[SearchHit]:
        """The Ask's ``top_k`` hits: the dense search, the lexical leg and the dense
        candidates' stored words in one SQL statement, reciprocal rank fusion, then
        re-ranking."""
        s = self.settings
        share = inp.lexical_share  # 0 for an even or image-heavy image + text query
        use_lexical = s.lexical and share > 0 and bool(lexical.query_terms(inp.question))
        pool = top_k * RERANK_POOL if inp.rerank or use_lexical else top_k
        store = get_store(s.milvus_endpoint(), s.milvus_token.get_secret_value())
        dense = [
            SearchHit.from_milvus(h)
            for h in store.search(inp.collection, inp.vector, inp.tenant, pool, expr)
        ]
        found = lexical.LexicalResult([], {})
        if dense or use_lexical:
            try:
                with self.engine.connect() as conn:
                    found = lexical.search(
                        conn,
                        inp.tenant,
                        inp.question,
                        inp.filters,
                        pool if use_lexical else 0,
                        fetch=[h.key for h in dense],
                    )
            except lexical.BadLexicalFilter as e:  # compile_filters refused it first
                raise ApplicationError(str(e), type="BadQuery", non_retryable=True) from None
        dense = [with_stored(h, found.stored.get(h.key)) for h in dense]
        if use_lexical:
            hits = fuse_rrf(
                {DENSE: dense, LEXICAL: found.hits},
                {DENSE: s.fusion_dense_weight, LEXICAL: s.fusion_lexical_weight * share},
                s.rrf_k,
                s.fusion_agreement,
            )
        else:
            hits = dense  # scores stay CLIP cosines, as before hybrid retrieval
        if inp.rerank:
            hits = rerank(inp.question, hits)
        return hits[:top_k]

    @implements(ask_stubs.retrieve_and_answer)
    def retrieve_and_answer(self, inp: RetrieveAndAnswerInput) -> RetrievedAnswer:
        """``retrieve`` then ``finalize_answer`` for an Ask that does not generate: the
        extractive answer (or "no match"), cited and audited, in one call."""
        started = time.perf_counter()
        retrieval = self.retrieve(inp.retrieve)
        final = self.finalize_answer(
            FinalizeInput(
                inp.retrieve.tenant,
                inp.retrieve.question,
                retrieval.extractive_answer,
                "extractive" if retrieval.sources else "none",
                retrieval.sources,
                retrieval.context,
                False,
                "",
                inp.elapsed_ms + ms_since(started),
                retrieval.index_version,
            )
        )
        return RetrievedAnswer(retrieval.index_version, retrieval.sources, retrieval.ms, final)

    @implements(ask_stubs.finalize_answer)
    def finalize_answer(self, inp: FinalizeInput) -> FinalAnswer:
        """Validate a generated answer, insert citations, write the audit row (no raw PII).

        Every answer is PII-redacted here, whatever produced it: the LLM may reproduce
        personal data (from its own memory, or a source the retriever redacted differently),
        and what leaves this step is what the user sees. Redacted before validation, so the
        answer is checked in the form it is shown, against sources redacted the same way."""
        started = time.perf_counter()
        answer, kind = redact_pii(inp.answer)[0], inp.answer_kind
        source_ids = [s.id for s in inp.sources]
        if kind == "generated":
            check = validate_answer(answer, source_ids, inp.context)
            if check.ok:
                answer = insert_citations(answer, check.cited)
            else:
                answer, kind = insert_citations(I_DONT_KNOW, source_ids), "refused"
        elif kind == "none":
            answer = answer or "No indexed content matches this question and its filters."
        workflow_id, run_id = workflow_ids()
        with Session(self.engine) as session, session.begin():
            registry.write_audit(
                session,
                [
                    registry.AuditRecord(
                        tenant=inp.tenant,
                        action="query.ask",
                        idempotency_key=f"{run_id}/query.ask",
                        workflow_id=workflow_id,
                        run_id=run_id,
                        details={
                            "question_sha256": hashlib.sha256(inp.question.encode()).hexdigest(),
                            "sources": [s.asset_id for s in inp.sources],
                            "latency_ms": round(inp.latency_ms, 1),
                            "degraded": inp.degraded,
                            "degraded_reason": inp.degraded_reason,
                            "answer_kind": kind,
                            "index_version": inp.index_version,
                        },
                    )
                ],
            )
        metrics.answer(kind, inp.degraded)
        return FinalAnswer(answer=answer, answer_kind=kind, ms=ms_since(started))
