"""``WatchPrefix``: ingest what is new or changed under a prefix, for buckets without
notifications.

Each pass runs ``IngestBatch`` on the prefix as a child workflow; the asset registry is the
cursor (unchanged generations are skipped without re-encoding), so a pass costs a listing
and a registry lookup per page. With ``interval_s`` it sleeps between passes and continues
as new after each, so its history never grows; run it with 0 from a Temporal Schedule
instead if you prefer.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from workflows.activities.limits import Knobs
    from workflows.common import TENANT_KEY, source_attribute
    from workflows.contracts import (
        INGEST_BATCH_WORKFLOW,
        WATCH_PREFIX_WORKFLOW,
        IngestBatchInput,
        IngestResult,
        WatchPrefixInput,
    )
    from workflows.limits import BAD_INPUT, bounded_knobs, refuse_if, tags_problem


@workflow.defn(name=WATCH_PREFIX_WORKFLOW)
class WatchPrefix:
    @workflow.run
    async def run(self, inp: WatchPrefixInput) -> IngestResult:
        refuse_if(tags_problem(inp.tags), BAD_INPUT)
        # At least MMRAG_MIN_WATCH_INTERVAL_S between passes (0 stays one pass).
        interval_s = (await bounded_knobs(Knobs(interval_s=inp.interval_s))).interval_s
        workflow.upsert_search_attributes(
            [
                TENANT_KEY.value_set(inp.tenant),
                source_attribute(inp.tenant, [inp.prefix]),
            ]
        )
        result = await workflow.execute_child_workflow(
            INGEST_BATCH_WORKFLOW,
            IngestBatchInput(tenant=inp.tenant, sources=[inp.prefix], tags=inp.tags),
            id=f"{workflow.info().workflow_id}/pass-{inp.passes}",
            result_type=IngestResult,
            static_summary=f"pass {inp.passes} over {inp.prefix}",
        )
        if interval_s <= 0:
            return result
        await workflow.sleep(timedelta(seconds=interval_s))
        workflow.continue_as_new(replace(inp, passes=inp.passes + 1))
