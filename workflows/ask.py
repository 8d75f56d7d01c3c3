"""``Ask``: query -> retrieval -> guarded, cited answer, durably and fast.

Two hops leave the workflow's queue, the ones the design needs: query encoding on
``mmrag-gpu-encode`` and generation on ``mmrag-gpu-generate``. Started on
``QUERY_TASK_QUEUE`` instead, the Ask runs on the query role's worker, which holds the CLIP
model, and encodes and searches in one local activity: no cross-queue hop before generation
(bench/ask.py prices it); the choice is recorded in the history, so it replays. The short
steps (search + re-rank + prompt fusion, and validation + citations + audit) are local
activities; an Ask that does not generate does them in one. When the LLM is throttled
past its retries, or its circuit breaker is open, the answer degrades to the sources with
a clear message instead of failing or hanging. A vector-store outage is waited out for up
to ``VECTOR_STORE_WAIT``, then fails clearly.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from workflows.activities.ask import (
        EncodeAndRetrieveInput,
        EncodeQueryInput,
        FinalAnswer,
        FinalizeInput,
        GenerateInput,
        QueryVector,
        Retrieval,
        RetrieveAndAnswerInput,
        RetrievedAnswer,
        RetrieveInput,
        encode_and_retrieve,
        encode_query,
        finalize_answer,
        generate,
        retrieve,
        retrieve_and_answer,
    )
    from workflows.common import INDEX_VERSION_KEY, LIVENESS_TIMEOUT, OUTCOME_KEY, TENANT_KEY
    from workflows.contracts import (
        ASK_WORKFLOW,
        ENCODE_TASK_QUEUE,
        GENERATE_TASK_QUEUE,
        MEDIA_TYPES,
        QUERY_TASK_QUEUE,
        AskInput,
        AskResult,
        Source,
    )
    from workflows.limits import BAD_QUERY, filters_problem, refuse_if
    from workflows.priorities import tenant_turns

UNAVAILABLE = "answer service temporarily unavailable"
# Patch id: retrieval-only Asks answer in one local activity (retrieve_and_answer) since
# 2026-11-27; histories from before replay through retrieve + finalize_answer.
RETRIEVAL_ONLY_IN_ONE_STEP = "retrieval-only-in-one-step"
# Stages whose times add up to the Ask's: workflow time does not advance while local
# activities run inside one workflow task, so latency_ms is at least their sum.
TIMED_STAGES = ("encode", "retrieve", "generate", "finalize")
# Marker id: this Ask ran on QUERY_TASK_QUEUE and encoded its query locally.
ENCODED_ON_QUERY_WORKER = "encoded-on-query-worker"

QUICK_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200),
    maximum_interval=timedelta(seconds=2),
    maximum_attempts=5,
    non_retryable_error_types=["BadQuery"],
)
# Reads of the vector store (encode_query reads the alias, retrieve searches) wait out a
# Milvus restart instead of failing the Ask (restart to first search took ~35 s on the
# test stack); VECTOR_STORE_WAIT bounds it, then the Ask fails with Milvus's own error.
VECTOR_STORE_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200),
    maximum_interval=timedelta(seconds=5),
    non_retryable_error_types=["BadQuery"],
)
VECTOR_STORE_WAIT = timedelta(seconds=90)
LLM_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=500),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=4),
    maximum_attempts=4,
    non_retryable_error_types=["LlmUnavailable", "PermanentLlmError"],
)


@workflow.defn(name=ASK_WORKFLOW)
class Ask:
    @workflow.run
    async def run(self, inp: AskInput) -> AskResult:
        if not inp.text.strip() and not inp.image_uri and not inp.image_base64:
            raise ApplicationError(
                "an Ask needs text, an image (image_uri or image_base64), or both",
                type="BadQuery",
                non_retryable=True,
            )
        # Fail now, not after 90 s of retries, and never answer another question than asked.
        refuse_if(filters_problem(inp.filters) or _ask_problem(inp), BAD_QUERY)
        started = workflow.now()
        encode_input = encode_query_input(inp)
        if _encodes_locally():
            step = await workflow.execute_local_activity(
                encode_and_retrieve,
                EncodeAndRetrieveInput(
                    encode_input, retrieve_input(inp), not inp.generate, _ms_since(started)
                ),
                start_to_close_timeout=timedelta(seconds=30),
                schedule_to_close_timeout=VECTOR_STORE_WAIT,
                retry_policy=VECTOR_STORE_RETRY,
                summary="encode query + search + re-rank + prompt fusion (local)",
            )
            query = step.query
            if step.answered is not None:
                return _answered(inp, started, query, step.answered)
            assert step.retrieval is not None, "encode_and_retrieve returns one of the two"
            retrieval = step.retrieval
        else:
            query = await workflow.execute_activity(
                encode_query,
                encode_input,
                task_queue=ENCODE_TASK_QUEUE,
                start_to_close_timeout=timedelta(seconds=30),
                schedule_to_start_timeout=timedelta(seconds=inp.encode_schedule_to_start_s or 30),
                schedule_to_close_timeout=VECTOR_STORE_WAIT,
                retry_policy=VECTOR_STORE_RETRY,
                summary="encode query",
                priority=tenant_turns(inp.tenant),
            )
            if not inp.generate and workflow.patched(RETRIEVAL_ONLY_IN_ONE_STEP):
                done = await workflow.execute_local_activity(
                    retrieve_and_answer,
                    RetrieveAndAnswerInput(retrieve_input(inp, query), _ms_since(started)),
                    start_to_close_timeout=timedelta(seconds=10),
                    schedule_to_close_timeout=VECTOR_STORE_WAIT,
                    retry_policy=VECTOR_STORE_RETRY,
                    summary="search + re-rank + extractive answer + cite + audit",
                )
                return _answered(inp, started, query, done)
            retrieval = await workflow.execute_local_activity(
                retrieve,
                retrieve_input(inp, query),
                start_to_close_timeout=timedelta(seconds=10),
                schedule_to_close_timeout=VECTOR_STORE_WAIT,
                retry_policy=VECTOR_STORE_RETRY,
                summary="search + re-rank + prompt fusion",
            )
        stage_ms = {"encode": query.ms, "retrieve": retrieval.ms}
        answer, kind, llm_model = retrieval.extractive_answer, "extractive", ""
        reason, context = "", retrieval.context
        if not retrieval.sources:
            kind = "none"
        elif inp.generate:
            try:
                generation = await workflow.execute_activity(
                    generate,
                    generate_input(inp, retrieval),
                    task_queue=GENERATE_TASK_QUEUE,
                    start_to_close_timeout=timedelta(seconds=30),
                    schedule_to_close_timeout=timedelta(seconds=60),
                    # The worker heartbeats for it (workers/run.py): a killed generate
                    # worker's call is retried after 20 s, not after start_to_close.
                    heartbeat_timeout=LIVENESS_TIMEOUT,
                    retry_policy=LLM_RETRY,
                    summary="LLM generation",
                )
                stage_ms["generate"] = generation.ms
                if generation.summaries:  # sources over the per-chunk cap: how they were cut
                    methods = list(generation.summaries.values())
                    stage_ms["summarize"] = generation.summarize_ms
                    stage_ms["summarized_llm"] = float(methods.count("llm"))
                    stage_ms["summarized_extractive"] = float(methods.count("extractive"))
                if generation.kind == "generated":  # else no LLM is configured: extractive
                    answer, kind, llm_model = generation.text, generation.kind, generation.model
                    context = generation.context or retrieval.context
            except ActivityError as e:
                reason = _degraded_reason(e)
                answer, kind = degraded_answer(reason), "degraded"
        final = await workflow.execute_local_activity(
            finalize_answer,
            finalize_input(inp, retrieval, answer, kind, context, reason, _ms_since(started)),
            start_to_close_timeout=timedelta(seconds=10),
            retry_policy=QUICK_RETRY,
            summary="validate + cite + audit",
        )
        return _result(
            inp,
            started,
            query,
            retrieval.index_version,
            retrieval.sources,
            final,
            stage_ms,
            reason,
            llm_model,
        )


def _ask_problem(inp: AskInput) -> str:
    """What to fix in an Ask the workers would otherwise answer differently than asked
    (``top_k`` 0 raised to 1, a media type the index never holds matching nothing)."""
    if inp.top_k < 1:
        return (
            f"top_k={inp.top_k}: ask for 1 or more sources (default 5; the workers cap it "
            "at MMRAG_MAX_TOP_K)"
        )
    for media_type in inp.filters.media_types:
        if media_type not in MEDIA_TYPES:
            return (
                f"filters.media_types: {media_type!r} is not a type mmrag indexes; use one "
                f"of {', '.join(MEDIA_TYPES)}"
            )
    return ""


def _encodes_locally() -> bool:
    """Whether this Ask encodes its query by a local activity: decided by the queue it
    first runs on, and recorded in its history as a patch marker, so that replay takes the
    same path wherever it happens (a worker's task queue is what ``workflow.info()``
    reports, and the Replayer's is its own)."""
    if workflow.info().task_queue == QUERY_TASK_QUEUE or workflow.unsafe.is_replaying():
        return workflow.patched(ENCODED_ON_QUERY_WORKER)
    return False


# -- each step's input, from the Ask's: one definition for the workflow and for bench/ask.py,
# whose in-process baseline calls the same activity code with the same payloads.
def encode_query_input(inp: AskInput) -> EncodeQueryInput:
    return EncodeQueryInput(
        text=inp.text,
        image_uri=inp.image_uri,
        image_base64=inp.image_base64,
        hybrid_weight=inp.hybrid_weight,
        tenant=inp.tenant,
    )


def generate_input(inp: AskInput, retrieval: Retrieval) -> GenerateInput:
    return GenerateInput(
        system_prompt=retrieval.system_prompt,
        user_prompt=retrieval.user_prompt,
        max_tokens=inp.max_answer_tokens,
        source_ids=[s.id for s in retrieval.sources],
        image_uris=[s.uri for s in retrieval.sources if s.media_type.startswith("image/")],
        fusion=retrieval.fusion,
        tenant=inp.tenant,
    )


def finalize_input(
    inp: AskInput,
    retrieval: Retrieval,
    answer: str,
    kind: str,
    context: str,
    degraded_reason: str,
    latency_ms: float,
) -> FinalizeInput:
    return FinalizeInput(
        tenant=inp.tenant,
        question=inp.text,
        answer=answer,
        answer_kind=kind,
        sources=retrieval.sources,
        context=context,
        degraded=bool(degraded_reason),
        degraded_reason=degraded_reason,
        latency_ms=latency_ms,
        index_version=retrieval.index_version,
    )


def degraded_answer(reason: str) -> str:
    return f"{UNAVAILABLE}: {reason}. The most relevant sources are listed below."


def retrieve_input(inp: AskInput, query: QueryVector | None = None) -> RetrieveInput:
    """The search of this Ask; without ``query`` its vector is filled in where it is encoded."""
    return RetrieveInput(
        inp.tenant,
        inp.text,
        query.vector if query else [],
        query.model if query else "",
        inp.top_k,
        inp.filters,
        inp.rerank,
        inp.max_answer_tokens,
        query.collection if query else "",
        query.index_version if query else 0,
        has_image=bool(inp.image_uri or inp.image_base64),
        hybrid_weight=inp.hybrid_weight,
    )


def _answered(
    inp: AskInput, started: datetime, query: QueryVector, done: RetrievedAnswer
) -> AskResult:
    """The result of an Ask that did not generate (extractive answer or no match)."""
    stage_ms = {"encode": query.ms, "retrieve": done.retrieve_ms}
    return _result(
        inp, started, query, done.index_version, done.sources, done.final, stage_ms, "", ""
    )


def _ms_since(started: datetime) -> float:
    return (workflow.now() - started).total_seconds() * 1000


def _result(
    inp: AskInput,
    started: datetime,
    query: QueryVector,
    index_version: int,
    sources: list[Source],
    final: FinalAnswer,
    stage_ms: dict[str, float],
    degraded_reason: str,
    llm_model: str,
) -> AskResult:
    """The Ask's result, and its search attributes (tenant, index version, outcome)."""
    stage_ms["finalize"] = final.ms
    degraded = bool(degraded_reason)
    workflow.upsert_search_attributes(
        [
            TENANT_KEY.value_set(inp.tenant),
            INDEX_VERSION_KEY.value_set(index_version),
            OUTCOME_KEY.value_set("degraded" if degraded else final.answer_kind),
        ]
    )
    return AskResult(
        answer=final.answer,
        sources=sources,
        latency_ms=round(
            max(_ms_since(started), sum(stage_ms[k] for k in TIMED_STAGES if k in stage_ms)), 1
        ),
        stage_ms=stage_ms,
        degraded=degraded,
        degraded_reason=degraded_reason,
        answer_kind=final.answer_kind,
        index_version=index_version,
        encoder_model=query.model,
        llm_model=llm_model,
    )


def _degraded_reason(error: ActivityError) -> str:
    cause = error.cause
    if isinstance(cause, ApplicationError) and cause.type == "LlmUnavailable":
        return "the LLM circuit breaker is open after repeated failures"
    if isinstance(cause, ApplicationError) and cause.type == "PermanentLlmError":
        return f"the LLM rejected the request ({cause.message})"
    return "the LLM did not answer after retries"
