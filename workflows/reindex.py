"""``Reindex``: re-embed from the asset registry, verify, swap the alias with zero downtime.

full: a new index version (collection) with the target model is filled from the
registry in GPU-sized batches, reconciled against the registry until every live asset
has a vector of its current generation and nothing forgotten remains, then the query
alias moves to it in one step; the old version is kept for ``grace_period_hours`` for
``mmrag reindex rollback``. Ingests and forgets that happen meanwhile reach every
writable version, so nothing is lost or resurrected.

incremental: the active version is brought up to date for a tenant (or all): objects
whose generation changed, assets that failed, assets written by an older version.

rollback: the alias moves back to the most recently retired version.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from workflows.activities.ingest import (
        EncodeBatchInput,
        RecordOutcomesInput,
        encode_batch,
        record_outcomes,
        resolve_index,
    )
    from workflows.activities.lifecycle import (
        BeginReindexInput,
        FinishReindexInput,
        ModelSpec,
        ReconcileInput,
        ReconcileResult,
        ReindexItem,
        ReindexPageInput,
        SwapInput,
        begin_reindex,
        describe_model,
        finish_reindex,
        reconcile_index,
        reindex_page,
        swap_index,
    )
    from workflows.activities.limits import Knobs
    from workflows.common import (
        DB_RETRY,
        ENCODE_RETRY,
        INDEX_VERSION_KEY,
        LIVENESS_TIMEOUT,
        OUTCOME_KEY,
        TENANT_KEY,
    )
    from workflows.contracts import (
        ENCODE_TASK_QUEUE,
        FAILED,
        FULL,
        INCREMENTAL,
        MAX_REPORTED_FAILURES,
        REINDEX_WORKFLOW,
        AssetOutcome,
        IndexTarget,
        ReindexInput,
        ReindexProgress,
        ReindexResult,
    )
    from workflows.limits import bounded_knobs
    from workflows.priorities import tenant_turns

ROLLBACK = "rollback"
PAGE_SIZE = 256
PAGES_PER_RUN = 20
MAX_RECONCILE_ROUNDS = 5


@workflow.defn(name=REINDEX_WORKFLOW)
class Reindex:
    def __init__(self) -> None:
        self._inp = ReindexInput()
        self._knobs = Knobs()
        self._started: datetime | None = None
        self._done_this_run = 0

    @workflow.run
    async def run(self, inp: ReindexInput) -> ReindexResult:
        self._inp = inp
        self._started = workflow.now()
        if inp.mode not in (FULL, INCREMENTAL, ROLLBACK):
            raise ApplicationError(
                f"unknown mode {inp.mode!r}: use full, incremental or rollback",
                type="BadReindex",
                non_retryable=True,
            )
        self._knobs = await bounded_knobs(
            Knobs(batch_size=inp.batch_size, max_concurrent_batches=inp.max_concurrent_batches)
        )
        workflow.upsert_search_attributes(
            [
                TENANT_KEY.value_set(inp.tenant or "*"),
                OUTCOME_KEY.value_set("running"),
            ]
        )
        if inp.mode == ROLLBACK:
            return await self._rollback()
        target = await self._begin()
        inp.target_version = target.version
        workflow.upsert_search_attributes([INDEX_VERSION_KEY.value_set(target.version)])
        try:
            if inp.phase in ("", "embedding"):
                await self._embed_pages(target)  # may continue as new
            return await self._finish(target)
        except Exception:
            # A failed full run's building version stops receiving writes and is dropped
            # by the next run.
            failed_version = target.version if inp.mode == FULL else 0
            await workflow.execute_activity(
                finish_reindex,
                FinishReindexInput("failed", failed_version),
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=DB_RETRY,
                summary="record the failed run",
            )
            raise

    async def _begin(self) -> IndexTarget:
        inp = self._inp
        spec = ModelSpec(inp.model, inp.pretrained, inp.checkpoint)
        dim = 0
        if inp.mode == FULL and not inp.target_version:
            if not inp.model:  # same model as the active version: a rebuild
                active = await workflow.execute_activity(
                    resolve_index,
                    start_to_close_timeout=timedelta(seconds=30),
                    retry_policy=DB_RETRY,
                    summary="active index version",
                )
                assert active is not None, "a rebuild needs an active index version"
                spec = ModelSpec(active.model, active.pretrained, active.checkpoint)
            info = await workflow.execute_activity(
                describe_model,
                spec,
                task_queue=ENCODE_TASK_QUEUE,
                start_to_close_timeout=timedelta(minutes=10),
                heartbeat_timeout=LIVENESS_TIMEOUT,
                retry_policy=ENCODE_RETRY,
                summary=f"load {spec.model}",
            )
            dim = info.dim
        self._inp.phase = self._inp.phase or "embedding"
        return await workflow.execute_activity(
            begin_reindex,
            BeginReindexInput(inp.mode, inp.tenant, spec, dim, inp.target_version),
            start_to_close_timeout=timedelta(minutes=2),
            heartbeat_timeout=LIVENESS_TIMEOUT,
            retry_policy=DB_RETRY,
            summary="lock scope, create or pick the target version",
        )

    async def _embed_pages(self, target: IndexTarget) -> None:
        inp = self._inp
        pages = 0
        cursor = inp.cursor
        while True:
            page = await workflow.execute_activity(
                reindex_page,
                ReindexPageInput(inp.mode, inp.tenant, cursor, PAGE_SIZE, target),
                start_to_close_timeout=timedelta(minutes=5),
                heartbeat_timeout=LIVENESS_TIMEOUT,
                retry_policy=DB_RETRY,
                summary="next registry page",
            )
            if not cursor:
                inp.total = page.total
            inp.failed += len(page.failures)
            inp.still_failing += len(page.still_failing)
            inp.done += page.unchanged + len(page.failures) + len(page.still_failing)
            self._report(page.failures + page.still_failing)
            await self._embed(target, page.items, page.extra_targets)
            cursor = page.next_cursor
            pages += 1
            if not cursor:
                return
            if pages >= PAGES_PER_RUN or workflow.info().is_continue_as_new_suggested():
                workflow.continue_as_new(replace(inp, target_version=target.version, cursor=cursor))

    async def _embed(
        self, target: IndexTarget, items: list[ReindexItem], extra: list[IndexTarget]
    ) -> None:
        """Encode items grouped by (tenant, tags), a bounded number of batches at once."""
        inp = self._inp
        size = self._knobs.batch_size  # bounded by the worker; older histories: the caller's
        groups: dict[tuple[str, str], list[ReindexItem]] = {}
        for item in items:
            groups.setdefault((item.tenant, json.dumps(item.tags, sort_keys=True)), []).append(item)
        batches = [
            group[i : i + size]
            for group in groups.values()
            for i in range(0, len(group), max(1, size))
        ]
        slots = asyncio.Semaphore(max(1, self._knobs.max_concurrent_batches))

        async def one(batch: list[ReindexItem]) -> None:
            async with slots:
                tenant, tags = batch[0].tenant, batch[0].tags
                objects = [item.ref for item in batch]
                outcomes = await workflow.execute_activity(
                    encode_batch,
                    EncodeBatchInput(tenant, target, objects, tags, extra_targets=extra),
                    task_queue=ENCODE_TASK_QUEUE,
                    start_to_close_timeout=timedelta(minutes=30),
                    heartbeat_timeout=timedelta(seconds=30),
                    retry_policy=ENCODE_RETRY,
                    summary=f"re-embed {len(objects)} assets into v{target.version}",
                    priority=tenant_turns(tenant),
                )
                # Full: the registry moves to the new version at the swap; only failures are
                # recorded now. Incremental: this is an ingest of the changed objects.
                to_record = (
                    outcomes
                    if inp.mode == INCREMENTAL
                    else [o for o in outcomes if o.status == FAILED]
                )
                if to_record:
                    await workflow.execute_activity(
                        record_outcomes,
                        RecordOutcomesInput(tenant, target.version, objects, to_record, tags),
                        start_to_close_timeout=timedelta(minutes=2),
                        heartbeat_timeout=LIVENESS_TIMEOUT,
                        retry_policy=DB_RETRY,
                        summary=f"registry + audit for {len(to_record)} assets",
                    )
                inp.done += len(outcomes)
                inp.failed += sum(o.status == FAILED for o in outcomes)
                self._report(outcomes)
                inp.embedded += sum(o.status != FAILED for o in outcomes)
                self._done_this_run += len(outcomes)

        await asyncio.gather(*(one(b) for b in batches))

    async def _finish(self, target: IndexTarget) -> ReindexResult:
        inp = self._inp
        if inp.mode == INCREMENTAL:
            await workflow.execute_activity(
                finish_reindex,
                FinishReindexInput("succeeded"),
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=DB_RETRY,
                summary="record the successful run",
            )
            inp.phase = "done"
            workflow.upsert_search_attributes([OUTCOME_KEY.value_set("completed")])
            return self._result(target.version, target.version)
        inp.phase = "verifying"
        check = ReconcileResult()
        for _ in range(MAX_RECONCILE_ROUNDS):
            check = await workflow.execute_activity(
                reconcile_index,
                ReconcileInput(inp.tenant, target),
                start_to_close_timeout=timedelta(minutes=10),
                heartbeat_timeout=LIVENESS_TIMEOUT,
                retry_policy=DB_RETRY,
                summary=f"verify v{target.version} against the registry",
            )
            if not check.to_embed:
                break
            await self._embed(target, check.to_embed, [])
        else:
            raise ApplicationError(
                f"index v{target.version} did not converge with the registry after "
                f"{MAX_RECONCILE_ROUNDS} rounds ({len(check.to_embed)} assets still differ); "
                "the alias was not swapped",
                type="VerificationFailed",
            )
        inp.phase = "swapping"
        swap = await workflow.execute_activity(
            swap_index,
            SwapInput(target.version, inp.grace_period_hours),
            start_to_close_timeout=timedelta(minutes=2),
            heartbeat_timeout=LIVENESS_TIMEOUT,
            retry_policy=DB_RETRY,
            summary=f"swap alias to v{target.version}",
        )
        inp.phase = "done"
        workflow.upsert_search_attributes([OUTCOME_KEY.value_set("swapped")])
        return self._result(
            swap.active_version, swap.previous_version, check.registry_assets, swapped=True
        )

    async def _rollback(self) -> ReindexResult:
        swap = await workflow.execute_activity(
            swap_index,
            SwapInput(0, self._inp.grace_period_hours),  # 0: the rollback target
            start_to_close_timeout=timedelta(minutes=2),
            heartbeat_timeout=LIVENESS_TIMEOUT,
            retry_policy=DB_RETRY,
            summary="roll the alias back",
        )
        workflow.upsert_search_attributes([OUTCOME_KEY.value_set("rolled_back")])
        self._inp.phase = "done"
        return self._result(swap.active_version, swap.previous_version, swapped=True)

    def _result(
        self, active: int, previous: int, verified: int = 0, swapped: bool = False
    ) -> ReindexResult:
        inp = self._inp
        return ReindexResult(
            mode=inp.mode,
            tenant=inp.tenant,
            index_version=active,
            previous_version=previous,
            embedded=inp.embedded,
            failed=inp.failed,
            verified_assets=verified,
            swapped=swapped,
            failures=inp.failures,
            still_failing=inp.still_failing,
        )

    def _report(self, outcomes: list[AssetOutcome]) -> None:
        """Keep what failed, with its reason, for the result (carried across continue-as-new,
        at most MAX_REPORTED_FAILURES): a count alone tells no one what to fix."""
        room = MAX_REPORTED_FAILURES - len(self._inp.failures)
        self._inp.failures.extend([o for o in outcomes if o.status == FAILED][: max(0, room)])

    @workflow.query(name="progress")
    def progress(self) -> ReindexProgress:
        inp = self._inp
        elapsed = (workflow.now() - self._started).total_seconds() if self._started else 0.0
        rate = self._done_this_run / elapsed if elapsed > 0 else 0.0
        remaining = max(0, inp.total - inp.done)
        return ReindexProgress(
            mode=inp.mode,
            tenant=inp.tenant,
            phase=inp.phase or "preparing",
            target_version=inp.target_version,
            done=inp.done,
            total=inp.total,
            failed=inp.failed,
            rate_per_s=round(rate, 2),
            eta_s=round(remaining / rate, 1) if rate > 0 else -1.0,
        )
