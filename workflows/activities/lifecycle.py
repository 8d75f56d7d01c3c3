"""The lifecycle activities' homes: re-index (describe the model, begin, page, reconcile,
swap, finish) and forget."""

from dataclasses import dataclass, field

from workflows.activities import MILVUS_MANAGE, MILVUS_WRITE, not_here, stub
from workflows.activities.ingest import EncoderInfo
from workflows.contracts import AssetOutcome, IndexTarget, ObjectRef

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
    # Assets that failed at this generation when last encoded for this version
    # (unsupported, corrupt): not retried until the object changes, not new failures.
    still_failing: list[AssetOutcome] = field(default_factory=list)


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


@stub(DESCRIBE_MODEL, liveness_heartbeat=True)
def describe_model(spec: ModelSpec) -> EncoderInfo:
    """Load a model a re-index asks for (if allowed) and describe it."""
    raise not_here(DESCRIBE_MODEL)


@stub(BEGIN_REINDEX, liveness_heartbeat=True, milvus=MILVUS_MANAGE)
def begin_reindex(inp: BeginReindexInput) -> IndexTarget:
    """Create (or continue) the version a re-index builds; drop expired versions."""
    raise not_here(BEGIN_REINDEX)


@stub(REINDEX_PAGE, liveness_heartbeat=True)
def reindex_page(inp: ReindexPageInput) -> ReindexPage:
    """One page of the registry in scope: what to re-embed."""
    raise not_here(REINDEX_PAGE)


@stub(RECONCILE_INDEX, liveness_heartbeat=True, milvus=MILVUS_WRITE)
def reconcile_index(inp: ReconcileInput) -> ReconcileResult:
    """Compare the registry with the index version; delete strays, list what is missing."""
    raise not_here(RECONCILE_INDEX)


@stub(SWAP_INDEX, liveness_heartbeat=True, milvus=MILVUS_MANAGE)
def swap_index(inp: SwapInput) -> SwapResult:
    """Point the alias at a version (a swap, or a rollback)."""
    raise not_here(SWAP_INDEX)


@stub(FINISH_REINDEX, liveness_heartbeat=True)
def finish_reindex(inp: FinishReindexInput) -> None:
    """Record how a re-index run ended."""
    raise not_here(FINISH_REINDEX)


@stub(FORGET_PAGE, liveness_heartbeat=True, milvus=MILVUS_WRITE)
def forget_page(inp: ForgetPageInput) -> ForgetPageResult:
    """Forget one page of matching assets in every index version."""
    raise not_here(FORGET_PAGE)
