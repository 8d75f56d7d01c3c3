"""The public API of mmrag: workflow names, task queues and their JSON-stable payloads.

Other backends (Go, Java, TypeScript, Python) start these workflows by *name* on
``TASK_QUEUE`` with JSON input whose keys are the field names below. Fields are only ever
added with defaults, never renamed or removed, so a caller written against an older
version keeps working. ``CONTRACT_VERSION`` moves when a field is added.

This module must stay importable inside the Temporal workflow sandbox: standard library
only. Annotations are evaluated at import (no ``from __future__ import annotations``), so
decoding a payload does not evaluate them again each time.
"""

import hashlib
from dataclasses import dataclass, field

CONTRACT_VERSION = 4  # 4: IngestResult.retagged, ReindexResult failures and still_failing

# Task queues (docs/architecture.md): workflows and CPU activities, CLIP encoding, LLM generation.
TASK_QUEUE = "mmrag"
ENCODE_TASK_QUEUE = "mmrag-gpu-encode"
GENERATE_TASK_QUEUE = "mmrag-gpu-generate"
# The fast path for ``Ask`` (optional): an Ask started here runs on the query role's worker,
# which holds the CLIP model itself and encodes the query as a local activity instead of a
# hop to ENCODE_TASK_QUEUE. Same input, same result; start Asks here when a query worker
# (`mmrag worker --role query`) is deployed, on TASK_QUEUE otherwise.
QUERY_TASK_QUEUE = "mmrag-query"

# Workflow type names: the stable strings other backends use.
INGEST_ASSET_WORKFLOW = "IngestAsset"
INGEST_BATCH_WORKFLOW = "IngestBatch"

# Custom search attributes (registered by `mmrag stack up` / `mmrag temporal setup`; the
# workflows' typed keys are built from these names in workflows/common.py).
TENANT_ATTRIBUTE = "MmragTenant"
SOURCE_ATTRIBUTE = "MmragSource"
ASSET_ID_ATTRIBUTE = "MmragAssetId"
INDEX_VERSION_ATTRIBUTE = "MmragIndexVersion"
OUTCOME_ATTRIBUTE = "MmragOutcome"
SEARCH_ATTRIBUTES: dict[str, str] = {
    TENANT_ATTRIBUTE: "Keyword",
    SOURCE_ATTRIBUTE: "Keyword",
    ASSET_ID_ATTRIBUTE: "Keyword",
    INDEX_VERSION_ATTRIBUTE: "Int",
    OUTCOME_ATTRIBUTE: "Keyword",
}

# Asset outcome statuses.
INGESTED = "ingested"
UNCHANGED = "unchanged"
FAILED = "failed"
SKIPPED = "skipped"  # e.g. forgotten by a right-to-be-forgotten request
RETAGGED = "retagged"  # unchanged object ingested with other tags: tags updated, not re-encoded
# AssetOutcome.note of a failed asset an incremental re-index did not retry: it failed on the
# same bytes for the same index version before (ReindexResult.still_failing).
STILL_FAILING = "still failing: unchanged since it failed; retried when the object changes"


def asset_id_for(tenant: str, uri: str) -> str:
    """Deterministic asset id: the same object of the same tenant is always the same asset."""
    return hashlib.sha256(f"{tenant}\x00{uri}".encode()).hexdigest()[:32]


def ingest_asset_workflow_id(tenant: str, uri: str, generation: str) -> str:
    """Workflow id for one object version: starting it twice is a no-op, not a second run."""
    return f"ingest-asset/{tenant}/{asset_id_for(tenant, uri)}/{generation}"


@dataclass
class ObjectRef:
    """One object in storage, as listed: what the cheap checks and the encoder need."""

    uri: str
    generation: str
    size: int
    asset_id: str = ""
    media_type: str = ""
    content_type: str = ""
    created_at: int = 0  # object creation/modification time, epoch seconds


@dataclass
class AssetOutcome:
    """What happened to one object in an ingest."""

    uri: str
    asset_id: str
    status: str  # ingested | unchanged | retagged | failed | skipped
    generation: str = ""
    reason: str = ""  # why it failed, in words a user can act on
    chunks: int = 0  # vectors written for it
    note: str = ""  # e.g. the name or declared type disagrees with the bytes; frame cap hit


@dataclass
class IndexTarget:
    """The index version an ingest writes into (one Milvus collection per version)."""

    version: int
    collection: str
    model: str
    pretrained: str
    dim: int
    checkpoint: str = ""  # a local checkpoint the encoder loads instead of pretrained weights


@dataclass
class IngestAssetInput:
    """Input of ``IngestAsset``: one object (a ``file://`` or ``gs://`` URI, or a local path)."""

    tenant: str
    uri: str
    tags: dict[str, str] = field(default_factory=dict)
    force: bool = False  # re-encode even when the generation is unchanged
    allow_forgotten: bool = False  # re-ingest an object that was forgotten (Forget)


@dataclass
class IngestTotals:
    """Running counts of an ingest; carried across continue-as-new."""

    seen: int = 0
    ingested: int = 0
    unchanged: int = 0
    failed: int = 0
    vectors: int = 0
    failures: list[AssetOutcome] = field(default_factory=list)  # capped, see MAX_REPORTED_FAILURES
    skipped: int = 0
    retagged: int = 0


MAX_REPORTED_FAILURES = 200


@dataclass
class IngestBatchInput:
    """Input of ``IngestBatch``: folders, prefixes or objects, ingested page by page.

    ``sources`` are ``file://`` URIs, ``gs://bucket/prefix`` URIs or absolute local paths.
    The ``cursor_*`` fields and ``totals`` are continuation state set by the workflow
    itself when it continues as new; callers leave them out.
    """

    tenant: str
    sources: list[str]
    tags: dict[str, str] = field(default_factory=dict)
    force: bool = False
    batch_size: int = 0  # objects per encode activity; 0 = the worker's setting
    page_size: int = 256  # objects listed per page
    max_concurrent_batches: int = 2
    encode_heartbeat_timeout_s: int = 30  # a dead encode worker's batch is retried after this
    allow_forgotten: bool = False
    cursor_source: int = 0
    cursor_page_token: str = ""
    totals: IngestTotals = field(default_factory=IngestTotals)


@dataclass
class IngestResult:
    """Output of ``IngestBatch`` and ``IngestAsset``."""

    tenant: str
    index_version: int
    seen: int
    ingested: int
    unchanged: int
    failed: int
    vectors: int
    failures: list[AssetOutcome] = field(default_factory=list)
    skipped: int = 0
    retagged: int = 0  # unchanged objects whose tags changed: updated without re-encoding


@dataclass
class IngestProgress:
    """Answer of the ``progress`` query on ``IngestBatch``."""

    tenant: str
    source: str
    sources_done: int
    sources_total: int
    seen: int
    ingested: int
    unchanged: int
    failed: int
    in_flight: int


# -- Ask ----------------------------------------------------------------------------------
ASK_WORKFLOW = "Ask"
MAX_INLINE_IMAGE_BYTES = 256 * 1024  # larger query images go by URI
# Every media type an asset can have, written once: activities/media/formats.py names and
# sniffs these (activities may import the contracts, never the reverse), and they are what
# ``AskFilters.media_types`` may name. An Ask naming another one is refused rather than
# finding nothing.
IMAGE_MEDIA_TYPES = (
    "image/jpeg",
    "image/png",
    "image/gif",
    "image/bmp",
    "image/tiff",
    "image/webp",
    "image/avif",  # decoded only where Pillow has libavif; still a type an asset may have
)
PDF_MEDIA_TYPES = ("application/pdf",)
VIDEO_MEDIA_TYPES = (
    "video/mp4",
    "video/quicktime",
    "video/webm",
    "video/x-matroska",
    "video/x-msvideo",
)
MEDIA_TYPES = IMAGE_MEDIA_TYPES + PDF_MEDIA_TYPES + VIDEO_MEDIA_TYPES


@dataclass
class AskFilters:
    """Structured filters; compiled with escaped literals, never taken as an expression."""

    media_types: list[str] = field(default_factory=list)  # e.g. ["image/png"]
    created_after: int = 0  # epoch seconds, inclusive; 0 = no bound
    created_before: int = 0  # epoch seconds, exclusive; 0 = no bound
    tags: dict[str, str] = field(default_factory=dict)  # every pair must match
    asset_ids: list[str] = field(default_factory=list)


@dataclass
class AskInput:
    """Input of ``Ask``: text, an image (URI or small inline base64), or both (hybrid)."""

    tenant: str
    text: str = ""
    image_uri: str = ""
    image_base64: str = ""
    top_k: int = 5
    filters: AskFilters = field(default_factory=AskFilters)
    hybrid_weight: float = 0.5  # weight of the image vector in a hybrid query
    rerank: bool = True
    generate: bool = True  # False: retrieval only, extractive answer
    max_answer_tokens: int = 300
    # Fail (a ScheduleToStart timeout, safe to retry) when no encode worker takes the query
    # within this many seconds, rather than queueing behind a saturated or absent one.
    encode_schedule_to_start_s: int = 30


@dataclass
class Source:
    """One retrieved chunk, cited in the answer as ``[id]``."""

    id: str  # "S1", "S2", ... in rank order
    asset_id: str
    uri: str
    score: float
    media_type: str
    chunk: str  # locator: "image", "page:3", "frame:12.500"
    snippet: str = ""


@dataclass
class AskResult:
    """Output of ``Ask``."""

    answer: str
    sources: list[Source]
    # The workflow's own time, start to result (at least the sum of its timed stages); the
    # caller's wall clock adds the start and result round trips.
    latency_ms: float
    stage_ms: dict[str, float] = field(default_factory=dict)
    degraded: bool = False
    degraded_reason: str = ""
    answer_kind: str = ""  # generated | extractive | refused | none
    index_version: int = 0
    encoder_model: str = ""
    llm_model: str = ""


# -- Lifecycle: re-index, forget, watch -------------------------------------------------
REINDEX_WORKFLOW = "Reindex"
FORGET_WORKFLOW = "Forget"
WATCH_PREFIX_WORKFLOW = "WatchPrefix"
FULL = "full"
INCREMENTAL = "incremental"


@dataclass
class ReindexInput:
    """Input of ``Reindex``.

    ``full`` builds a new index version (a new collection) with ``model`` / ``pretrained`` /
    ``checkpoint`` (empty: the active version's model) for every tenant, verifies it against
    the registry and swaps the query alias to it in one step. ``incremental`` brings the
    active version up to date for ``tenant`` (empty: all): objects whose generation changed,
    assets that failed or were written by an older version.
    """

    mode: str = INCREMENTAL
    tenant: str = ""
    model: str = ""
    pretrained: str = ""
    checkpoint: str = ""
    batch_size: int = 32
    max_concurrent_batches: int = 2
    grace_period_hours: float = 24.0  # the old version stays this long for rollback
    # Continuation state, set by the workflow itself.
    target_version: int = 0
    cursor: str = ""
    done: int = 0
    failed: int = 0
    total: int = 0
    phase: str = ""
    embedded: int = 0
    failures: list[AssetOutcome] = field(default_factory=list)
    still_failing: int = 0


@dataclass
class ReindexProgress:
    mode: str
    tenant: str
    phase: str  # preparing | embedding | verifying | swapping | done
    target_version: int
    done: int
    total: int
    failed: int
    rate_per_s: float
    eta_s: float


@dataclass
class ReindexResult:
    mode: str
    tenant: str
    index_version: int  # the active version afterwards
    previous_version: int
    embedded: int
    failed: int
    verified_assets: int
    swapped: bool
    # What failed, with reasons (at most MAX_REPORTED_FAILURES): this run's new failures,
    # and assets that failed before at the same generation (note "still failing"), which an
    # incremental run does not retry until the object changes: ``failed`` counts only the
    # new ones, ``still_failing`` the others.
    failures: list[AssetOutcome] = field(default_factory=list)
    still_failing: int = 0


@dataclass
class ForgetInput:
    """Input of ``Forget``: one asset, every asset under a URI prefix, or a tag match.

    ``reason`` is stored in the tombstone after PII redaction: write a ticket number, not a
    name. ``if_generation`` (events) forgets only while the registry holds that generation.
    """

    tenant: str
    asset_id: str = ""
    uri_prefix: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    reason: str = ""
    delete_object: bool = False
    allow_reingest: bool = False
    if_generation: str = ""


@dataclass
class ForgetResult:
    tenant: str
    forgotten: int
    objects_deleted: int
    index_versions: list[int] = field(default_factory=list)
    # delete_object was asked, but the object was left: it was never ingested successfully,
    # lies outside the tenant's storage roots, or changed since it was ingested.
    objects_kept: int = 0


@dataclass
class WatchPrefixInput:
    """Input of ``WatchPrefix``: ingest what is new or changed under a prefix.

    With ``interval_s`` > 0 it keeps watching, one pass per interval (continuing as new);
    with 0 it makes one pass (for a Temporal Schedule to run).
    """

    tenant: str
    prefix: str
    tags: dict[str, str] = field(default_factory=dict)
    interval_s: int = 0
    passes: int = 0  # continuation state
