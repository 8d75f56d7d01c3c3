"""Activity names and payloads shared by workflows and activity implementations.

Internal API (between mmrag's own workflows and workers), unlike ``contracts``. Standard
library only, so workflows can import it inside the sandbox. No ``from __future__ import
annotations`` here or in ``contracts``: the data converter resolves a dataclass's type
hints on every payload it decodes, and string annotations made that ~3x slower.
"""

from dataclasses import dataclass, field

from workflows.contracts import AskFilters, AssetOutcome, IndexTarget, ObjectRef, Source

# Activity type names.
RESOLVE_INDEX = "resolve_index"
DESCRIBE_ENCODER = "describe_encoder"
CREATE_FIRST_INDEX = "create_first_index"
SCAN_PAGE = "scan_page"
ENCODE_BATCH = "encode_batch"
RECORD_OUTCOMES = "record_outcomes"


@dataclass
class EncoderInfo:
    model: str
    pretrained: str
    dim: int
    device: str
    checkpoint: str = ""


@dataclass
class CreateIndexInput:
    model: str
    pretrained: str
    dim: int
    checkpoint: str = ""


@dataclass
class ScanPageInput:
    tenant: str
    source: str
    page_token: str
    page_size: int
    index_version: int
    force: bool = False
    single_object: bool = False  # the source must be exactly one object, not a prefix
    allow_forgotten: bool = False


@dataclass
class ScanPageResult:
    to_encode: list[ObjectRef] = field(default_factory=list)
    unchanged: list[AssetOutcome] = field(default_factory=list)
    rejected: list[AssetOutcome] = field(default_factory=list)
    next_token: str = ""
    # Index versions besides the active one that must receive the same writes (a re-index
    # building, a retired version kept for rollback).
    extra_targets: list[IndexTarget] = field(default_factory=list)


@dataclass
class EncodeBatchInput:
    tenant: str
    index: IndexTarget
    objects: list[ObjectRef]
    tags: dict[str, str] = field(default_factory=dict)
    extra_targets: list[IndexTarget] = field(default_factory=list)


@dataclass
class RecordOutcomesInput:
    tenant: str
    index_version: int
    objects: list[ObjectRef]
    outcomes: list[AssetOutcome]
    tags: dict[str, str] = field(default_factory=dict)


# -- Ask ------------------------------------------------------------------------------
ENCODE_QUERY = "encode_query"
RETRIEVE = "retrieve"
GENERATE = "generate"
FINALIZE_ANSWER = "finalize_answer"
RETRIEVE_AND_ANSWER = "retrieve_and_answer"
ENCODE_AND_RETRIEVE = "encode_and_retrieve"


@dataclass
class EncodeQueryInput:
    text: str = ""
    image_uri: str = ""
    image_base64: str = ""
    hybrid_weight: float = 0.5
    tenant: str = ""  # whose storage roots an image_uri must lie in


@dataclass
class QueryVector:
    vector: list[float]
    model: str
    ms: float
    cached: bool = False
    collection: str = ""  # the index version's collection the query alias named ("": none)
    index_version: int = 0


@dataclass
class RetrieveInput:
    tenant: str
    question: str
    vector: list[float]
    encoder_model: str
    top_k: int
    filters: AskFilters
    rerank: bool
    max_answer_tokens: int
    collection: str = ""  # search exactly the collection the query was encoded for
    index_version: int = 0


@dataclass
class FusionChunk:
    """One source of a fused prompt, PII-redacted, as the fusion helper reads it."""

    id: str
    media_type: str
    chunk: str
    caption: str = ""
    snippet: str = ""


@dataclass
class Fusion:
    """What the generate worker needs to fuse the prompt again with LLM chunk summaries,
    so summarising adds no task-queue hop: the redacted question and used sources, the
    ids of those cut to fit (``shortened``) and the budgets. Everything here is redacted."""

    question: str
    sources: list[FusionChunk]
    shortened: list[str]
    token_budget: int
    per_chunk_tokens: int


@dataclass
class Retrieval:
    index_version: int
    sources: list[Source]
    system_prompt: str
    user_prompt: str
    prompt_tokens: int
    extractive_answer: str
    ms: float
    context: str = ""  # the sources' text as the LLM sees it: what grounding is checked against
    fusion: Fusion | None = None  # set when a source was cut and LLM summaries may help


@dataclass
class GenerateInput:
    system_prompt: str
    user_prompt: str
    max_tokens: int
    source_ids: list[str]
    image_uris: list[str] = field(default_factory=list)  # top image sources, for vision models
    fusion: Fusion | None = None  # summarise the shortened sources with the LLM first
    tenant: str = ""  # whose storage roots the image sources must lie in


@dataclass
class Generation:
    text: str
    kind: str  # generated | extractive (no LLM configured)
    model: str
    ms: float
    cached: bool = False
    # Set when the prompt was fused again with LLM chunk summaries: the sources' text the
    # model saw (grounding is checked against it) ...
    context: str = ""
    # ... and per shortened source id, "llm" or "extractive" (the LLM's summary failed).
    summaries: dict[str, str] = field(default_factory=dict)
    summarize_ms: float = 0.0


@dataclass
class FinalizeInput:
    tenant: str
    question: str
    answer: str
    answer_kind: str
    sources: list[Source]
    context: str
    degraded: bool
    degraded_reason: str
    latency_ms: float
    index_version: int


@dataclass
class FinalAnswer:
    answer: str
    answer_kind: str
    ms: float


@dataclass
class RetrieveAndAnswerInput:
    """An Ask that does not generate: retrieve, answer from the sources and audit in one
    local activity, one SDK round trip fewer on the hot path of retrieval-only asks."""

    retrieve: RetrieveInput
    elapsed_ms: float  # the Ask's time before this step, for the audit row's latency


@dataclass
class RetrievedAnswer:
    """What the workflow needs of a retrieval-only answer (no prompts: they are unused)."""

    index_version: int
    sources: list[Source]
    retrieve_ms: float
    final: FinalAnswer


@dataclass
class EncodeAndRetrieveInput:
    """The query worker's first step of an Ask, in one local activity (the model is in its
    process): encode, then search and fuse; with ``answer`` (an Ask that does not generate)
    also the extractive answer and audit row, as ``retrieve_and_answer``."""

    encode: EncodeQueryInput
    retrieve: RetrieveInput  # vector, model, collection and version: filled from encoding
    answer: bool
    elapsed_ms: float  # the Ask's time before this step, for the audit row's latency


@dataclass
class EncodedRetrieval:
    query: QueryVector  # without its vector: the workflow does not need it
    retrieval: Retrieval | None = None  # answer=False
    answered: RetrievedAnswer | None = None  # answer=True


# -- Lifecycle ------------------------------------------------------------------------
DESCRIBE_MODEL = "describe_model"
BEGIN_REINDEX = "begin_reindex"
REINDEX_PAGE = "reindex_page"
RECONCILE_INDEX = "reconcile_index"
SWAP_INDEX = "swap_index"
FINISH_REINDEX = "finish_reindex"
FORGET_PAGE = "forget_page"


@dataclass
class ModelSpec:
    model: str
    pretrained: str = ""
    checkpoint: str = ""


@dataclass
class BeginReindexInput:
    mode: str
    tenant: str
    spec: ModelSpec
    dim: int = 0
    target_version: int = 0  # set when continuing as new


@dataclass
class ReindexItem:
    tenant: str
    ref: ObjectRef
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class ReindexPageInput:
    mode: str
    tenant: str
    cursor: str
    page_size: int
    target: IndexTarget


@dataclass
class ReindexPage:
    items: list[ReindexItem] = field(default_factory=list)
    unchanged: int = 0
    failures: list[AssetOutcome] = field(default_factory=list)
    next_cursor: str = ""
    total: int = 0  # assets in scope (first page only)
    extra_targets: list[IndexTarget] = field(default_factory=list)


@dataclass
class ReconcileInput:
    tenant: str
    target: IndexTarget
    limit: int = 2000


@dataclass
class ReconcileResult:
    to_embed: list[ReindexItem] = field(default_factory=list)
    deleted: int = 0
    registry_assets: int = 0
    index_assets: int = 0


@dataclass
class SwapInput:
    version: int
    grace_period_hours: float


@dataclass
class SwapResult:
    previous_version: int
    active_version: int


@dataclass
class FinishReindexInput:
    state: str  # succeeded | failed
    failed_version: int = 0  # a full run's building version to retire as failed


@dataclass
class ForgetPageInput:
    tenant: str
    asset_id: str
    uri_prefix: str
    tags: dict[str, str]
    reason: str
    delete_object: bool
    allow_reingest: bool
    if_generation: str
    after: str = ""
    limit: int = 500


@dataclass
class ForgetPageResult:
    forgotten: int = 0
    objects_deleted: int = 0
    versions: list[int] = field(default_factory=list)
    next_after: str = ""
    objects_kept: int = 0  # asked to delete, but not ingested, outside the roots, or changed
