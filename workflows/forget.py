"""``Forget``: remove a person's media from every place it lives, leave only a tombstone.

Vectors go from every index version (active, building, retired), the object optionally
from storage, and the registry row keeps only the asset id and a ``forgotten`` status,
so the same object is not ingested again unless explicitly allowed. Idempotent: running
it again finds nothing new to remove and writes no second tombstone.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from workflows.activities.lifecycle import (
        ForgetPageInput,
        forget_page,
    )
    from workflows.common import (
        ASSET_ID_KEY,
        DB_RETRY,
        LIVENESS_TIMEOUT,
        OUTCOME_KEY,
        TENANT_KEY,
    )
    from workflows.contracts import FORGET_WORKFLOW, ForgetInput, ForgetResult


@workflow.defn(name=FORGET_WORKFLOW)
class Forget:
    @workflow.run
    async def run(self, inp: ForgetInput) -> ForgetResult:
        if not (inp.asset_id or inp.uri_prefix or inp.tags):
            raise ApplicationError(
                "Forget needs an asset_id, a uri_prefix or tags to match; it never forgets a "
                "whole tenant by accident",
                type="BadForget",
                non_retryable=True,
            )
        attributes = [TENANT_KEY.value_set(inp.tenant)]
        if inp.asset_id:
            attributes.append(ASSET_ID_KEY.value_set(inp.asset_id))
        workflow.upsert_search_attributes(attributes)
        result = ForgetResult(tenant=inp.tenant, forgotten=0, objects_deleted=0)
        after = ""
        while True:
            page = await workflow.execute_activity(
                forget_page,
                ForgetPageInput(
                    inp.tenant,
                    inp.asset_id,
                    inp.uri_prefix,
                    inp.tags,
                    inp.reason,
                    inp.delete_object,
                    inp.allow_reingest,
                    inp.if_generation,
                    after,
                ),
                start_to_close_timeout=timedelta(minutes=5),
                heartbeat_timeout=LIVENESS_TIMEOUT,  # a killed worker's page is retried soon
                retry_policy=DB_RETRY,
                summary="delete vectors everywhere, tombstone",
            )
            result.forgotten += page.forgotten
            result.objects_deleted += page.objects_deleted
            result.objects_kept += page.objects_kept
            result.index_versions = sorted(set(result.index_versions) | set(page.versions))
            after = page.next_after
            if not after:
                break
        workflow.upsert_search_attributes([OUTCOME_KEY.value_set("forgotten")])
        return result
