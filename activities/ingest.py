"""CPU-side ingest activities on the ``mmrag`` queue: index resolution, listing with cheap
checks, and registry + audit writes. None of them touches pixels."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from temporalio.exceptions import ApplicationError

from activities.media.formats import HEAD_BYTES, BadMediaError, check_object
from activities.runtime.bounds import DEFAULT_PAGE_SIZE, clamp
from activities.runtime.run_context import workflow_ids
from activities.store import index_versions, lexical, registry
from activities.store.objects import (
    ObjectMissingError,
    Page,
    UnsupportedUriError,
    store_for,
    worker_uri,
)
from activities.store.roots import OutsideRootsError, StorageRoots, TenantRoots
from activities.store.vectors import get_store, model_of
from settings import Settings
from workflows.activities import implements
from workflows.activities import ingest as ingest_stubs
from workflows.activities.ingest import (
    CreateIndexInput,
    RecordOutcomesInput,
    RetagInput,
    RetagResult,
    ScanPageInput,
    ScanPageResult,
)
from workflows.contracts import (
    FAILED,
    INGESTED,
    RETAGGED,
    SKIPPED,
    UNCHANGED,
    AssetOutcome,
    IndexTarget,
    ObjectRef,
    asset_id_for,
)


@dataclass
class StorageRefusal:
    kind: str  # the ApplicationError type
    say: str  # one line: what is wrong and what to set
    missing: bool = False  # the source does not exist (a failed source, not a failed run)


def storage_refusal(source: str, error: Exception) -> StorageRefusal | None:
    """What a listing error means when no retry can fix it (no credentials, refused, a
    bucket that does not exist, a malformed name); None for anything else (an outage).

    Without this, ``mmrag ingest gs://... --wait`` on a worker with no Google credentials
    retried the listing with no end and printed nothing."""
    from google.api_core import exceptions as api
    from google.auth import exceptions as auth

    if isinstance(error, auth.DefaultCredentialsError):
        return StorageRefusal(
            "MissingCredentials",
            f"{source}: the worker has no Google Cloud credentials: set "
            "GOOGLE_APPLICATION_CREDENTIALS to a service-account key file in the worker's "
            "environment (or run it where the metadata server answers; STORAGE_EMULATOR_HOST "
            "for an emulator)",
        )
    if isinstance(error, auth.RefreshError) and not getattr(error, "retryable", False):
        return StorageRefusal(
            "MissingCredentials",
            f"{source}: the worker's Google Cloud credentials were refused when refreshed "
            f"({_first_line(error)}): replace the key GOOGLE_APPLICATION_CREDENTIALS names",
        )
    if isinstance(error, (api.Forbidden, api.Unauthorized)):
        return StorageRefusal(
            "PermissionRefused",
            f"{source}: Google Cloud Storage refused the worker ({error.code}: "
            f"{_first_line(error)}): grant its service account storage.objects.list and "
            "storage.objects.get on the bucket",
        )
    if isinstance(error, api.NotFound):
        return StorageRefusal("NoSuchBucket", f"{source}: no such bucket", missing=True)
    if isinstance(error, api.BadRequest):
        return StorageRefusal(
            "BadSource", f"{source}: not a valid bucket or prefix ({_first_line(error)})", True
        )
    return None


def _first_line(error: Exception) -> str:
    message = getattr(error, "message", "") or str(error)
    return message.strip().splitlines()[0][:200] if message.strip() else type(error).__name__


class IngestActivities:
    """Activities that need the registry, the store listing and Milvus metadata calls."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._head_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="sniff")
        self.roots = StorageRoots.from_settings(settings.storage_roots, settings.state_dir)

    @property
    def engine(self):  # type: ignore[no-untyped-def]
        return registry.get_engine(self.settings.database_endpoint())

    @implements(ingest_stubs.resolve_index)
    def resolve_index(self) -> IndexTarget | None:
        """The active index version, or None when nothing was ever indexed."""
        return registry.active_index(self.engine)

    @implements(ingest_stubs.create_first_index)
    def create_first_index(self, inp: CreateIndexInput) -> IndexTarget:
        """Create version 1 (collection + alias) for the encoder's model; idempotent."""
        target = index_versions.create_version(
            self.engine,
            self.settings.collection_prefix,
            inp.model,
            inp.pretrained,
            inp.checkpoint,
            inp.dim,
            actor=workflow_ids()[0],
            first=True,
        )
        store = get_store(
            self.settings.milvus_endpoint(), self.settings.milvus_token.get_secret_value()
        )
        store.ensure_collection(target.collection, target.dim, model=model_of(target))
        store.point_alias(self.settings.collection_prefix, target.collection)
        return target

    @implements(ingest_stubs.scan_page)
    def scan_page(self, inp: ScanPageInput) -> ScanPageResult:
        """List one page of a source and sort it into encode / unchanged / rejected."""
        roots = self.roots.for_tenant(inp.tenant)
        try:
            source = worker_uri(inp.source)
            store = store_for(source, roots)
            if inp.single_object:
                page = Page([store.stat(source)], "")
            else:
                # At most MMRAG_MAX_PAGE_SIZE, whatever the caller asked (activities/limits.py).
                size = clamp(inp.page_size, DEFAULT_PAGE_SIZE, self.settings.max_page_size)
                page = store.list_page(source, inp.page_token, size)
        except OutsideRootsError as e:
            # The caller named something it may not read: refuse the run, record nothing.
            raise ApplicationError(str(e), type="OutsideStorageRoots", non_retryable=True) from e
        except (ObjectMissingError, UnsupportedUriError) as e:
            return ScanPageResult(
                rejected=[AssetOutcome(uri=inp.source, asset_id="", status=FAILED, reason=str(e))]
            )
        except Exception as e:
            refusal = storage_refusal(inp.source, e)
            if refusal is None:
                raise  # an outage or a bug: the workflow's bounded retries
            if refusal.missing:  # a bucket that does not exist: this source fails alone
                return ScanPageResult(
                    rejected=[
                        AssetOutcome(uri=inp.source, asset_id="", status=FAILED, reason=refusal.say)
                    ]
                )
            raise ApplicationError(refusal.say, type=refusal.kind, non_retryable=True) from None

        for ref in page.objects:
            ref.asset_id = asset_id_for(inp.tenant, ref.uri)
        known = registry.known_generations(
            self.engine, inp.tenant, [r.asset_id for r in page.objects]
        )
        result = ScanPageResult(next_token=page.next_token)
        result.rejected = [  # a symlink out of the roots, a FIFO: reported, never read
            AssetOutcome(uri, asset_id_for(inp.tenant, uri), FAILED, reason=reason)
            for uri, reason in page.refused
        ]
        result.extra_targets = [
            t for t in index_versions.writable(self.engine) if t.version != inp.index_version
        ]
        candidates: list[ObjectRef] = []
        reingest: list[str] = []
        for ref in page.objects:
            previous = known.get(ref.asset_id)
            if previous is not None and previous.status == registry.FORGOTTEN:
                if inp.allow_forgotten or previous.allow_reingest:
                    reingest.append(ref.asset_id)
                    candidates.append(ref)
                else:
                    result.unchanged.append(
                        AssetOutcome(
                            ref.uri,
                            ref.asset_id,
                            SKIPPED,
                            generation=ref.generation,
                            reason="forgotten by a Forget request; ingest with allow_forgotten "
                            "(--allow-forgotten) to bring it back",
                        )
                    )
            elif (
                not inp.force
                and previous is not None
                and (previous.generation, previous.status, previous.index_version)
                == (ref.generation, INGESTED, inp.index_version)
            ):
                # Tags define the index entry too (filters match them): other tags, same
                # bytes -> retag without encoding. Older workflows (no retag step) and
                # callers that send no tags keep the entry as it is.
                if inp.tags is not None and previous.tags != inp.tags:
                    result.retag.append(ref)
                else:
                    result.unchanged.append(
                        AssetOutcome(ref.uri, ref.asset_id, UNCHANGED, generation=ref.generation)
                    )
            else:
                candidates.append(ref)
        if reingest:
            registry.allow_reingest(self.engine, inp.tenant, reingest)
        checks = self._head_pool.map(lambda ref: self._cheap_check(ref, roots), candidates)
        for ref, reason in zip(candidates, checks, strict=True):
            if reason:
                result.rejected.append(
                    AssetOutcome(
                        ref.uri, ref.asset_id, FAILED, generation=ref.generation, reason=reason
                    )
                )
            else:
                result.to_encode.append(ref)
        return result

    def _cheap_check(self, ref: ObjectRef, roots: TenantRoots) -> str:
        """Sniff the first bytes; fill in the media type; return a failure reason or ""."""
        try:
            head = store_for(ref.uri, roots).read_head(ref.uri, HEAD_BYTES) if ref.size else b""
            ref.media_type = check_object(
                head,
                ref.size,
                self.settings.max_object_bytes,
                uri=ref.uri,
                content_type=ref.content_type,
            )
        except (BadMediaError, ObjectMissingError, OutsideRootsError) as e:
            return str(e)
        except Exception as e:
            refusal = storage_refusal(ref.uri, e)
            if refusal is None:
                raise  # an outage: the listing step retries
            return refusal.say  # this object cannot be read (refused, gone): it fails alone
        return ""

    @implements(ingest_stubs.retag_assets)
    def retag_assets(self, inp: RetagInput) -> RetagResult:
        """New tags for unchanged assets: their rows in every writable version rewritten
        with the new tags (vectors kept), then the registry and one audit row each; the
        registry last, so a failure in between leaves the next ingest to retag again."""
        store = get_store(
            self.settings.milvus_endpoint(), self.settings.milvus_token.get_secret_value()
        )
        ids = [ref.asset_id for ref in inp.objects]
        kept = set(ids)
        for target in [inp.index, *inp.extra_targets]:
            kept &= store.retag_assets(target.collection, inp.tenant, ids, inp.tags)
        retagged = [ref for ref in inp.objects if ref.asset_id in kept]
        with self.engine.begin() as conn:  # the lexical leg filters on tags too
            lexical.set_tags(conn, inp.tenant, [ref.asset_id for ref in retagged], inp.tags)
        workflow_id, run_id = workflow_ids()
        registry.retag(
            self.engine,
            inp.tenant,
            retagged,
            inp.tags,
            inp.index.version,
            workflow_id=workflow_id,
            run_id=run_id,
        )
        return RetagResult(
            outcomes=[
                AssetOutcome(ref.uri, ref.asset_id, RETAGGED, generation=ref.generation)
                for ref in retagged
            ],
            to_encode=[ref for ref in inp.objects if ref.asset_id not in kept],
        )

    @implements(ingest_stubs.record_outcomes)
    def record_outcomes(self, inp: RecordOutcomesInput) -> None:
        workflow_id, run_id = workflow_ids()
        self.record_batch(inp, workflow_id=workflow_id, run_id=run_id)

    def record_batch(self, inp: RecordOutcomesInput, *, workflow_id: str, run_id: str) -> None:
        """What ``record_outcomes`` does for a batch, given the run it is audited under
        (bench/ingest.py's bare loop calls this, so both sides do the same writes)."""
        # The lexical index copies the batch's Milvus rows (the encode worker has no database
        # login): replaced for ingested assets, removed for failed ones (store/lexical.py).
        # Before the registry moves on: an asset whose generation it still holds is unchanged
        # (a re-index) and keeps its captions.
        store = get_store(
            self.settings.milvus_endpoint(), self.settings.milvus_token.get_secret_value()
        )
        lexical.index_outcomes(self.engine, store, inp.index_version, inp.tenant, inp.outcomes)
        try:
            registry.record_outcomes(
                self.engine,
                inp.tenant,
                inp.index_version,
                inp.objects,
                inp.outcomes,
                inp.tags,
                workflow_id=workflow_id,
                run_id=run_id,
            )
        except ValueError as e:  # malformed input: retrying cannot help
            raise ApplicationError(str(e), non_retryable=True) from e
