"""Ingest workflows: ``IngestAsset`` (one object) and ``IngestBatch`` (folders and prefixes).

Both run the same steps: resolve the active index version, scan (list + cheap checks +
registry comparison) on ``mmrag``, encode + store in GPU-sized batches on
``mmrag-gpu-encode``, then record registry rows and audit rows on ``mmrag``.

One module of ~450 lines: both workflows run the same step functions, and their patch ids
(which keep recorded histories replaying) must sit next to the steps they guard.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from workflows.activities.captions import (
        CaptionInput,
        PlanCaptionsInput,
        StoreCaptionsInput,
        caption_media,
        plan_captions,
        store_captions,
    )
    from workflows.activities.ingest import (
        CreateIndexInput,
        EncodeBatchInput,
        RecordOutcomesInput,
        RetagInput,
        ScanPageInput,
        ScanPageResult,
        create_first_index,
        describe_encoder,
        encode_batch,
        record_outcomes,
        resolve_index,
        retag_assets,
        scan_page,
    )
    from workflows.activities.limits import Knobs
    from workflows.common import (
        ASSET_ID_KEY,
        DB_RETRY,
        ENCODE_RETRY,
        INDEX_VERSION_KEY,
        LIVENESS_TIMEOUT,
        OUTCOME_KEY,
        TENANT_KEY,
        source_attribute,
    )
    from workflows.contracts import (
        ENCODE_TASK_QUEUE,
        FAILED,
        GENERATE_TASK_QUEUE,
        INGEST_ASSET_WORKFLOW,
        INGEST_BATCH_WORKFLOW,
        INGESTED,
        MAX_REPORTED_FAILURES,
        RETAGGED,
        SKIPPED,
        AssetOutcome,
        IndexTarget,
        IngestAssetInput,
        IngestBatchInput,
        IngestProgress,
        IngestResult,
        IngestTotals,
        ObjectRef,
    )
    from workflows.limits import BAD_INPUT, bounded_knobs, refuse_if, tags_problem
    from workflows.priorities import tenant_turns

# Pages processed per run before continuing as new: keeps histories far below the
# suggested limit even for very large buckets.
PAGES_PER_RUN = 20
# Patch id: an unchanged object ingested with other tags is retagged (retag_assets) since
# issue 18; runs from before compared generations only and replay without the step.
RETAG_UNCHANGED = "retag-unchanged-objects"
# Patch id: ingested images and keyframes are captioned after their batch is recorded
# (activities/captions.py) since issue 15; runs from before replay without the step.
CAPTION_PICTURES = "caption-pictures"
# Captions are optional: a few tries, then the ingest goes on without them.
CAPTION_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=4,
    non_retryable_error_types=["CaptionsUnavailable", "LlmUnavailable", "PermanentLlmError"],
)


async def active_or_first_index() -> IndexTarget:
    """The active index version, creating version 1 from the encoder's model if none exists."""
    target = await workflow.execute_activity(
        resolve_index,
        start_to_close_timeout=timedelta(seconds=30),
        retry_policy=DB_RETRY,
        summary="active index version",
    )
    if target is not None:
        return target
    info = await workflow.execute_activity(
        describe_encoder,
        task_queue=ENCODE_TASK_QUEUE,
        start_to_close_timeout=timedelta(minutes=10),  # may load the model the first time
        retry_policy=ENCODE_RETRY,
        summary="encoder model and dimension",
    )
    return await workflow.execute_activity(
        create_first_index,
        CreateIndexInput(
            model=info.model, pretrained=info.pretrained, dim=info.dim, checkpoint=info.checkpoint
        ),
        start_to_close_timeout=timedelta(minutes=2),
        retry_policy=DB_RETRY,
        summary="create index version 1",
    )


async def scan(
    tenant: str,
    source: str,
    token: str,
    page_size: int,
    index: IndexTarget,
    force: bool,
    single_object: bool = False,
    allow_forgotten: bool = False,
    tags: dict[str, str] | None = None,
) -> ScanPageResult:
    return await workflow.execute_activity(
        scan_page,
        ScanPageInput(
            tenant,
            source,
            token,
            page_size,
            index.version,
            force,
            single_object,
            allow_forgotten,
            tags,
        ),
        start_to_close_timeout=timedelta(minutes=5),
        retry_policy=DB_RETRY,
        summary=f"list + check {source}",
    )


async def retag(
    tenant: str, index: IndexTarget, page: ScanPageResult, tags: dict[str, str]
) -> list[AssetOutcome]:
    """Retag what the scan found unchanged but tagged otherwise; what lost its vectors on
    the way (a worker killed mid-rewrite) joins ``page.to_encode``."""
    if not page.retag:
        return []
    done = await workflow.execute_activity(
        retag_assets,
        RetagInput(tenant, index, page.retag, tags, page.extra_targets),
        start_to_close_timeout=timedelta(minutes=5),
        retry_policy=DB_RETRY,
        summary=f"new tags for {len(page.retag)} unchanged objects",
    )
    page.to_encode.extend(done.to_encode)
    return done.outcomes


async def encode_and_record(
    tenant: str,
    index: IndexTarget,
    objects: list[ObjectRef],
    tags: dict[str, str],
    heartbeat_timeout: timedelta,
    extra_targets: list[IndexTarget],
) -> list[AssetOutcome]:
    outcomes = await workflow.execute_activity(
        encode_batch,
        EncodeBatchInput(
            tenant=tenant, index=index, objects=objects, tags=tags, extra_targets=extra_targets
        ),
        task_queue=ENCODE_TASK_QUEUE,
        start_to_close_timeout=timedelta(minutes=30),
        heartbeat_timeout=heartbeat_timeout,
        retry_policy=ENCODE_RETRY,
        summary=f"encode {len(objects)} objects",
        priority=tenant_turns(tenant),
    )
    await record(tenant, index, objects, outcomes, tags)
    if workflow.patched(CAPTION_PICTURES):
        await caption(tenant, objects, outcomes)
    return outcomes


async def caption(tenant: str, objects: list[ObjectRef], outcomes: list[AssetOutcome]) -> None:
    """Captions for the batch's ingested images and keyframes, when the cpu worker has a
    caption model configured (plan_captions says none otherwise, without I/O): cached
    captions are copied, the rest asked of the vision model on the generate queue. A model
    that fails costs only the captions (logged); the batch's outcomes stand."""
    ingested = {o.asset_id for o in outcomes if o.status == INGESTED}
    pictures = [
        o
        for o in objects
        if o.asset_id in ingested and o.media_type.startswith(("image/", "video/"))
    ]
    if not pictures:
        return
    plan = await workflow.execute_local_activity(
        plan_captions,
        PlanCaptionsInput(tenant, pictures),
        start_to_close_timeout=timedelta(minutes=2),
        retry_policy=DB_RETRY,
        summary="captions to make (local)",
    )
    if not plan.items:
        return
    try:
        made = await workflow.execute_activity(
            caption_media,
            CaptionInput(tenant, plan.model, plan.items),
            task_queue=GENERATE_TASK_QUEUE,
            start_to_close_timeout=timedelta(minutes=10),
            heartbeat_timeout=LIVENESS_TIMEOUT,
            retry_policy=CAPTION_RETRY,
            summary=f"caption {len(plan.items)} pictures",
        )
    except ActivityError as e:
        workflow.logger.warning("captions not made for this batch: %s", e.cause or e)
        return
    if made.captions:
        await workflow.execute_local_activity(
            store_captions,
            StoreCaptionsInput(tenant, made.captions),
            start_to_close_timeout=timedelta(minutes=1),
            retry_policy=DB_RETRY,
            summary="store captions (local)",
        )


async def record(
    tenant: str,
    index: IndexTarget,
    objects: list[ObjectRef],
    outcomes: list[AssetOutcome],
    tags: dict[str, str],
) -> None:
    if not any(o.status in (INGESTED, FAILED) for o in outcomes):
        return
    await workflow.execute_activity(
        record_outcomes,
        RecordOutcomesInput(tenant, index.version, objects, outcomes, tags),
        start_to_close_timeout=timedelta(minutes=2),
        retry_policy=DB_RETRY,
        summary=f"registry + audit for {len(outcomes)} assets",
    )


def count(totals: IngestTotals, outcomes: list[AssetOutcome]) -> None:
    for o in outcomes:
        totals.seen += 1
        if o.status == INGESTED:
            totals.ingested += 1
            totals.vectors += o.chunks
        elif o.status == FAILED:
            totals.failed += 1
            if len(totals.failures) < MAX_REPORTED_FAILURES:
                totals.failures.append(o)
        elif o.status == SKIPPED:
            totals.skipped += 1
        elif o.status == RETAGGED:
            totals.retagged += 1
        else:
            totals.unchanged += 1


def result_of(tenant: str, index: IndexTarget, totals: IngestTotals) -> IngestResult:
    return IngestResult(
        tenant=tenant,
        index_version=index.version,
        seen=totals.seen,
        ingested=totals.ingested,
        unchanged=totals.unchanged,
        failed=totals.failed,
        vectors=totals.vectors,
        failures=totals.failures,
        skipped=totals.skipped,
        retagged=totals.retagged,
    )


def outcome_label(totals: IngestTotals) -> str:
    return "completed_with_failures" if totals.failed else "completed"


@workflow.defn(name=INGEST_BATCH_WORKFLOW)
class IngestBatch:
    """Ingest every object under some sources, page by page, in GPU-sized batches."""

    def __init__(self) -> None:
        self._totals = IngestTotals()
        self._input: IngestBatchInput | None = None
        self._source_index = 0
        self._in_flight = 0

    @workflow.run
    async def run(self, inp: IngestBatchInput) -> IngestResult:
        self._input = inp
        self._totals = inp.totals
        refuse_if(tags_problem(inp.tags), BAD_INPUT)
        retags = workflow.patched(RETAG_UNCHANGED)
        knobs = await bounded_knobs(
            Knobs(
                page_size=inp.page_size,
                batch_size=inp.batch_size,
                max_concurrent_batches=inp.max_concurrent_batches,
                heartbeat_timeout_s=inp.encode_heartbeat_timeout_s,
            )
        )
        index = await active_or_first_index()
        workflow.upsert_search_attributes(
            [
                TENANT_KEY.value_set(inp.tenant),
                source_attribute(inp.tenant, inp.sources),
                INDEX_VERSION_KEY.value_set(index.version),
                OUTCOME_KEY.value_set("running"),
            ]
        )
        # Bounded by the worker (>= 1); older histories replay with the caller's values.
        batch_size = knobs.batch_size or 32
        heartbeat = timedelta(seconds=knobs.heartbeat_timeout_s)
        slots = asyncio.Semaphore(max(1, knobs.max_concurrent_batches))

        async def batch(objects: list[ObjectRef], extra: list[IndexTarget]) -> None:
            async with slots:
                self._in_flight += len(objects)
                try:
                    outcomes = await encode_and_record(
                        inp.tenant, index, objects, inp.tags, heartbeat, extra
                    )
                finally:
                    self._in_flight -= len(objects)
                count(self._totals, outcomes)

        pages = 0
        for self._source_index in range(inp.cursor_source, len(inp.sources)):
            source = inp.sources[self._source_index]
            token = inp.cursor_page_token if self._source_index == inp.cursor_source else ""
            while True:
                page = await scan(
                    inp.tenant,
                    source,
                    token,
                    knobs.page_size,
                    index,
                    inp.force,
                    allow_forgotten=inp.allow_forgotten,
                    tags=inp.tags if retags else None,
                )
                await record(inp.tenant, index, [], page.rejected, inp.tags)
                count(self._totals, page.unchanged + page.rejected)
                count(self._totals, await retag(inp.tenant, index, page, inp.tags))
                chunks = [
                    page.to_encode[i : i + batch_size]
                    for i in range(0, len(page.to_encode), batch_size)
                ]
                await asyncio.gather(*(batch(c, page.extra_targets) for c in chunks))
                pages += 1
                token = page.next_token
                if not token:
                    break
                if pages >= PAGES_PER_RUN or workflow.info().is_continue_as_new_suggested():
                    workflow.continue_as_new(
                        replace(
                            inp,
                            cursor_source=self._source_index,
                            cursor_page_token=token,
                            totals=self._totals,
                        )
                    )
        workflow.upsert_search_attributes([OUTCOME_KEY.value_set(outcome_label(self._totals))])
        return result_of(inp.tenant, index, self._totals)

    @workflow.query(name="progress")
    def progress(self) -> IngestProgress:
        inp = self._input
        t = self._totals
        sources = inp.sources if inp else []
        return IngestProgress(
            tenant=inp.tenant if inp else "",
            source=sources[self._source_index] if self._source_index < len(sources) else "",
            sources_done=self._source_index,
            sources_total=len(sources),
            seen=t.seen,
            ingested=t.ingested,
            unchanged=t.unchanged,
            failed=t.failed,
            in_flight=self._in_flight,
        )


@workflow.defn(name=INGEST_ASSET_WORKFLOW)
class IngestAsset:
    """Ingest one object: the entry point for event-driven ingest of a single upload."""

    @workflow.run
    async def run(self, inp: IngestAssetInput) -> IngestResult:
        refuse_if(tags_problem(inp.tags), BAD_INPUT)
        retags = workflow.patched(RETAG_UNCHANGED)
        index = await active_or_first_index()
        workflow.upsert_search_attributes(
            [
                TENANT_KEY.value_set(inp.tenant),
                source_attribute(inp.tenant, [inp.uri]),
                INDEX_VERSION_KEY.value_set(index.version),
            ]
        )
        totals = IngestTotals()
        page = await scan(
            inp.tenant,
            inp.uri,
            "",
            1,
            index,
            inp.force,
            single_object=True,
            allow_forgotten=inp.allow_forgotten,
            tags=inp.tags if retags else None,
        )
        await record(inp.tenant, index, [], page.rejected, inp.tags)
        count(totals, page.unchanged + page.rejected)
        retagged = await retag(inp.tenant, index, page, inp.tags)
        count(totals, retagged)
        asset_ids = [o.asset_id for o in page.to_encode + page.unchanged + page.rejected + retagged]
        if asset_ids and asset_ids[0]:
            workflow.upsert_search_attributes([ASSET_ID_KEY.value_set(asset_ids[0])])
        if page.to_encode:
            outcomes = await encode_and_record(
                inp.tenant,
                index,
                page.to_encode[:1],
                inp.tags,
                timedelta(seconds=30),
                page.extra_targets,
            )
            count(totals, outcomes)
        workflow.upsert_search_attributes([OUTCOME_KEY.value_set(outcome_label(totals))])
        return result_of(inp.tenant, index, totals)
