"""Lifecycle activities on the ``mmrag`` queue: re-index bookkeeping and verification,
alias swaps, dropping expired versions, and forgetting assets everywhere they live."""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.clip.model_policy import ModelNotAllowedError, check_model
from activities.rag.guardrails import redact_pii
from activities.runtime.run_context import workflow_ids
from activities.store import index_versions, lexical, registry
from activities.store.objects import ObjectMissingError, store_for
from activities.store.roots import OutsideRootsError, StorageRoots, TenantRoots
from activities.store.vectors import VectorStore, get_store, model_of
from settings import Settings
from workflows.activities import implements
from workflows.activities import lifecycle as lifecycle_stubs
from workflows.activities.lifecycle import (
    BeginReindexInput,
    FinishReindexInput,
    ForgetPageInput,
    ForgetPageResult,
    ReconcileInput,
    ReconcileResult,
    ReindexItem,
    ReindexPage,
    ReindexPageInput,
    SwapInput,
    SwapResult,
)
from workflows.contracts import (
    FAILED,
    FULL,
    INCREMENTAL,
    STILL_FAILING,
    AssetOutcome,
    IndexTarget,
)


class LifecycleActivities:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stat_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="stat")
        self.roots = StorageRoots.from_settings(settings.storage_roots, settings.state_dir)

    @property
    def engine(self):  # type: ignore[no-untyped-def]
        return registry.get_engine(self.settings.database_endpoint())

    @property
    def store(self) -> VectorStore:
        s = self.settings
        return get_store(s.milvus_endpoint(), s.milvus_token.get_secret_value())

    # -- re-index -------------------------------------------------------------------
    @implements(lifecycle_stubs.begin_reindex)
    def begin_reindex(self, inp: BeginReindexInput) -> IndexTarget:
        """Drop expired versions, take the scope's lock, and pick the target version."""
        workflow_id = workflow_ids()[0]
        self._drop_expired(workflow_id)
        scope = inp.tenant or "*"
        if inp.mode == INCREMENTAL:
            target = registry.active_index(self.engine)
            if target is None:
                raise ApplicationError(
                    "nothing is indexed yet: ingest first",
                    type="NothingIndexed",
                    non_retryable=True,
                )
        elif inp.target_version:
            live = [
                t for t in index_versions.all_live(self.engine) if t.version == inp.target_version
            ]
            if not live:  # continuation state a caller made up
                raise ApplicationError(
                    f"index version {inp.target_version} is not live: leave target_version out",
                    type="BadReindex",
                    non_retryable=True,
                )
            target = live[0]
        else:
            if inp.tenant:
                raise ApplicationError(
                    "a full re-index builds a new index version for every tenant: leave the "
                    "tenant empty (use mode incremental for one tenant)",
                    type="BadReindex",
                    non_retryable=True,
                )
            try:
                check_model(self.settings, inp.spec.model, inp.spec.pretrained, inp.spec.checkpoint)
            except ModelNotAllowedError as e:
                raise ApplicationError(str(e), type="ModelNotAllowed", non_retryable=True) from e
            target = index_versions.create_version(
                self.engine,
                self.settings.collection_prefix,
                inp.spec.model,
                inp.spec.pretrained,
                inp.spec.checkpoint,
                inp.dim,
                actor=workflow_id,
            )
        self.store.ensure_collection(target.collection, target.dim, model=model_of(target))
        try:
            index_versions.begin_run(self.engine, workflow_id, scope, inp.mode, target.version)
        except index_versions.ReindexConflict as e:
            if inp.mode == FULL and not inp.target_version:
                index_versions.mark(self.engine, [target.version], "failed", workflow_id)
            raise ApplicationError(str(e), type="ReindexConflict", non_retryable=True) from e
        return target

    def _drop_expired(self, actor: str) -> None:
        expired = index_versions.expired(self.engine)
        for target in expired:
            self.store.drop(target.collection)
        if expired:
            index_versions.mark(self.engine, [t.version for t in expired], "dropped", actor)

    @implements(lifecycle_stubs.reindex_page)
    def reindex_page(self, inp: ReindexPageInput) -> ReindexPage:
        """One page of the registry in scope: what to re-embed (full: everything live;
        incremental: changed objects, failed assets, assets of an older version)."""
        index_versions.touch_run(self.engine, workflow_ids()[0])
        statuses = (registry.INGESTED,) if inp.mode == FULL else (registry.INGESTED, FAILED)
        assets, cursor = registry.live_assets_page(
            self.engine, inp.tenant, inp.cursor, inp.page_size, statuses
        )
        page = ReindexPage(next_cursor=cursor)
        if not inp.cursor:
            page.total = registry.count_assets(self.engine, inp.tenant, statuses)
        tags = registry.tags_by_key(self.engine, [(a.tenant, a.ref.asset_id) for a in assets])
        if inp.mode == FULL:
            page.items = [
                ReindexItem(a.tenant, a.ref, tags.get((a.tenant, a.ref.asset_id), {}))
                for a in assets
            ]
            return page
        page.extra_targets = [
            t for t in index_versions.writable(self.engine) if t.version != inp.target.version
        ]
        known = registry.statuses_by_key(self.engine, [(a.tenant, a.ref.asset_id) for a in assets])
        stats = self._stat_pool.map(lambda a: _stat(a, self.roots.for_tenant(a.tenant)), assets)
        for asset, current in zip(assets, stats, strict=True):
            key = (asset.tenant, asset.ref.asset_id)
            status, version = known[key]
            if isinstance(current, str):
                page.failures.append(
                    AssetOutcome(asset.ref.uri, asset.ref.asset_id, FAILED, reason=current)
                )
                continue
            current.asset_id = asset.ref.asset_id
            current.media_type = asset.ref.media_type
            changed = current.generation != asset.ref.generation
            if not changed and status == FAILED and version == inp.target.version:
                # It failed on these very bytes for this version (unsupported, corrupt):
                # encoding it again fails again. Listed, retried once the object changes.
                page.still_failing.append(
                    AssetOutcome(
                        asset.ref.uri,
                        asset.ref.asset_id,
                        FAILED,
                        generation=asset.ref.generation,
                        reason=asset.reason,
                        note=STILL_FAILING,
                    )
                )
            elif changed or status == FAILED or version != inp.target.version:
                page.items.append(ReindexItem(asset.tenant, current, tags.get(key, {})))
            else:
                page.unchanged += 1
        return page

    @implements(lifecycle_stubs.reconcile_index)
    def reconcile_index(self, inp: ReconcileInput) -> ReconcileResult:
        """Compare the target collection with the registry: delete vectors of assets that
        are no longer live (forgotten during the run), and list assets to (re-)embed
        because they are missing or hold an older generation."""
        index_versions.touch_run(self.engine, workflow_ids()[0])
        live = registry.live_generations(self.engine, inp.tenant)
        indexed = self.store.asset_generations(inp.target.collection, inp.tenant)
        extra = [key for key in indexed if key not in live]
        by_tenant: dict[str, list[str]] = defaultdict(list)
        for tenant, asset_id in extra:
            by_tenant[tenant].append(asset_id)
        for tenant, ids in by_tenant.items():
            for i in range(0, len(ids), 1000):
                self.store.delete_assets(
                    inp.target.collection, tenant, ids[i : i + 1000], strong=True
                )
                with self.engine.begin() as conn:  # no longer live: no lexical hits either
                    lexical.delete_assets(conn, tenant, ids[i : i + 1000])
        stale = [key for key, gen in live.items() if indexed.get(key) != gen][: inp.limit]
        items = registry.items_by_key(self.engine, stale)
        return ReconcileResult(
            to_embed=items,
            deleted=len(extra),
            registry_assets=len(live),
            index_assets=len(indexed) - len(extra),
        )

    @implements(lifecycle_stubs.swap_index)
    def swap_index(self, inp: SwapInput) -> SwapResult:
        """Point the query alias at the new version and retire the old one, in one step."""
        workflow_id = workflow_ids()[0]
        grace = timedelta(hours=inp.grace_period_hours)
        try:
            version = inp.version or index_versions.rollback_target(self.engine).version
        except LookupError as e:
            raise ApplicationError(str(e), type="NothingToRollBack", non_retryable=True) from e
        swap = index_versions.swap(self.engine, version, grace, actor=workflow_id)
        self.store.point_alias(self.settings.collection_prefix, swap.active.collection)
        index_versions.finish_run(self.engine, workflow_id, "succeeded")
        return SwapResult(swap.previous.version if swap.previous else 0, swap.active.version)

    @implements(lifecycle_stubs.finish_reindex)
    def finish_reindex(self, inp: FinishReindexInput) -> None:
        actor = workflow_ids()[0]
        index_versions.finish_run(self.engine, actor, inp.state)
        if inp.failed_version:
            index_versions.mark(self.engine, [inp.failed_version], "failed", actor)

    # -- forget ---------------------------------------------------------------------
    @implements(lifecycle_stubs.forget_page)
    def forget_page(self, inp: ForgetPageInput) -> ForgetPageResult:
        """Forget one page of matching assets: vectors in every index version and lexical
        rows, optionally the objects, then the registry row is wiped and a tombstone
        written."""
        workflow_id = workflow_ids()[0]
        candidates = registry.forget_candidates(
            self.engine, inp.tenant, inp.asset_id, inp.uri_prefix, inp.tags, inp.after, inp.limit
        )
        next_after = candidates[-1].asset_id if len(candidates) == inp.limit else ""
        if inp.if_generation:  # an object-delete event: only the version that was deleted
            candidates = [c for c in candidates if c.generation == inp.if_generation]
        ids = [c.asset_id for c in candidates]
        versions = index_versions.all_live(self.engine)
        for target in versions:
            if ids:
                self.store.delete_assets(target.collection, inp.tenant, ids, strong=True)
        with self.engine.begin() as conn:  # and from the lexical index
            lexical.delete_assets(conn, inp.tenant, ids)
        deleted = kept = 0
        if inp.delete_object:
            roots = self.roots.for_tenant(inp.tenant)
            for candidate in candidates:
                if _delete_object(candidate, roots):
                    deleted += 1
                else:
                    kept += 1
        registry.mark_forgotten(
            self.engine,
            inp.tenant,
            ids,
            redact_pii(inp.reason)[0][:500],
            inp.allow_reingest,
            [t.version for t in versions],
            workflow_id,
            {c.asset_id: c.generation for c in candidates},
        )
        return ForgetPageResult(
            forgotten=len(ids),
            objects_deleted=deleted,
            objects_kept=kept,
            versions=[t.version for t in versions],
            next_after=next_after,
        )


def _delete_object(candidate: registry.ForgetCandidate, roots: TenantRoots) -> bool:
    """Delete the object of a forgotten asset, only if it was ingested successfully, lies in
    the tenant's roots and is still the generation that was ingested. A failed ingest's URI
    is whatever a caller named (``file:///srv/app/.env``): never ours to delete."""
    if candidate.status != registry.INGESTED or not candidate.uri or not candidate.generation:
        return False
    try:
        return store_for(candidate.uri, roots).delete(candidate.uri, candidate.generation)
    except OutsideRootsError as e:
        activity.logger.warning("Forget keeps %s: %s", candidate.asset_id, e)
        return False


def _stat(asset: registry.LiveAsset, roots: TenantRoots):  # type: ignore[no-untyped-def]
    """The object's current metadata, or why it cannot be read."""
    try:
        return store_for(asset.ref.uri, roots).stat(asset.ref.uri)
    except (ObjectMissingError, OutsideRootsError) as e:
        return str(e)
    except Exception as e:  # storage outage: let the activity retry
        raise ApplicationError(f"cannot stat {asset.ref.uri}: {e}") from e
