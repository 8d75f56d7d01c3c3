"""``Ask``: query -> retrieval -> guarded, cited answer, durably and fast.

Two hops leave the workflow's queue, the ones the design needs: query encoding on
``mmrag-gpu-encode`` and generation on ``mmrag-gpu-generate``. The short steps
(search + re-rank + prompt fusion, and validation + citations + audit) are local
activities. When the LLM is throttled past its retries, or its circuit breaker is open,
the answer degrades to the sources with a clear message instead of failing or hanging.
A vector-store outage is waited out for up to ``VECTOR_STORE_WAIT``, then fails clearly.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from workflows.activity_payloads import (
        ENCODE_QUERY,
        FINALIZE_ANSWER,
        GENERATE,
        RETRIEVE,
        EncodeQueryInput,
        FinalAnswer,
        FinalizeInput,
        GenerateInput,
        Generation,
        QueryVector,
        Retrieval,
        RetrieveInput,
    )
    from workflows.common import INDEX_VERSION_KEY, LIVENESS_TIMEOUT, OUTCOME_KEY, TENANT_KEY
    from workflows.contracts import (
        ASK_WORKFLOW,
        ENCODE_TASK_QUEUE,
        GENERATE_TASK_QUEUE,
        AskInput,
        AskResult,
    )

UNAVAILABLE = "answer service temporarily unavailable"

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
        started = workflow.now()
        query = await workflow.execute_activity(
            ENCODE_QUERY,
            EncodeQueryInput(inp.text, inp.image_uri, inp.image_base64, inp.hybrid_weight),
            task_queue=ENCODE_TASK_QUEUE,
            start_to_close_timeout=timedelta(seconds=30),
            schedule_to_start_timeout=timedelta(seconds=inp.encode_schedule_to_start_s or 30),
            schedule_to_close_timeout=VECTOR_STORE_WAIT,
            retry_policy=VECTOR_STORE_RETRY,
            result_type=QueryVector,
            summary="encode query",
        )
        retrieval = await workflow.execute_local_activity(
            RETRIEVE,
            RetrieveInput(
                inp.tenant,
                inp.text,
                query.vector,
                query.model,
                inp.top_k,
                inp.filters,
                inp.rerank,
                inp.max_answer_tokens,
                query.collection,
                query.index_version,
            ),
            start_to_close_timeout=timedelta(seconds=10),
            schedule_to_close_timeout=VECTOR_STORE_WAIT,
            retry_policy=VECTOR_STORE_RETRY,
            result_type=Retrieval,
            summary="search + re-rank + prompt fusion",
        )
        stage_ms = {"encode": query.ms, "retrieve": retrieval.ms}
        answer, kind, llm_model = retrieval.extractive_answer, "extractive", ""
        degraded, reason, context = False, "", retrieval.context
        if not retrieval.sources:
            kind = "none"
        elif inp.generate:
            try:
                generation = await workflow.execute_activity(
                    GENERATE,
                    GenerateInput(
                        retrieval.system_prompt,
                        retrieval.user_prompt,
                        inp.max_answer_tokens,
                        [s.id for s in retrieval.sources],
                        [s.uri for s in retrieval.sources if s.media_type.startswith("image/")],
                        retrieval.fusion,
                    ),
                    task_queue=GENERATE_TASK_QUEUE,
                    start_to_close_timeout=timedelta(seconds=30),
                    schedule_to_close_timeout=timedelta(seconds=60),
                    # The worker heartbeats for it (workers/run.py): a killed generate
                    # worker's call is retried after 20 s, not after start_to_close.
                    heartbeat_timeout=LIVENESS_TIMEOUT,
                    retry_policy=LLM_RETRY,
                    result_type=Generation,
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
                degraded, reason = True, _degraded_reason(e)
                answer = f"{UNAVAILABLE}: {reason}. The most relevant sources are listed below."
                kind = "degraded"
        latency_ms = (workflow.now() - started).total_seconds() * 1000
        final = await workflow.execute_local_activity(
            FINALIZE_ANSWER,
            FinalizeInput(
                inp.tenant,
                inp.text,
                answer,
                kind,
                retrieval.sources,
                context,
                degraded,
                reason,
                latency_ms,
                retrieval.index_version,
            ),
            start_to_close_timeout=timedelta(seconds=10),
            retry_policy=QUICK_RETRY,
            result_type=FinalAnswer,
            summary="validate + cite + audit",
        )
        stage_ms["finalize"] = final.ms
        workflow.upsert_search_attributes(
            [
                TENANT_KEY.value_set(inp.tenant),
                INDEX_VERSION_KEY.value_set(retrieval.index_version),
                OUTCOME_KEY.value_set("degraded" if degraded else final.answer_kind),
            ]
        )
        return AskResult(
            answer=final.answer,
            sources=retrieval.sources,
            latency_ms=round((workflow.now() - started).total_seconds() * 1000, 1),
            stage_ms=stage_ms,
            degraded=degraded,
            degraded_reason=reason,
            answer_kind=final.answer_kind,
            index_version=retrieval.index_version,
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
