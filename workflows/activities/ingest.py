"""The ingest activities' homes: resolve the index, describe the encoder, create the first
index version, scan a page of a source, encode a batch, record outcomes."""

from dataclasses import dataclass, field
from typing import Optional

from workflows.activities import MILVUS_MANAGE, MILVUS_READ, MILVUS_WRITE, not_here, stub
from workflows.contracts import AssetOutcome, IndexTarget, ObjectRef

RESOLVE_INDEX = "resolve_index"
DESCRIBE_ENCODER = "describe_encoder"
CREATE_FIRST_INDEX = "create_first_index"
SCAN_PAGE = "scan_page"
ENCODE_BATCH = "encode_batch"
RECORD_OUTCOMES = "record_outcomes"
RETAG_ASSETS = "retag_assets"


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
    # The run's tags: an unchanged object with other tags is listed in ``retag``. None (a
    # run from before the retag step): unchanged objects stay unchanged whatever the tags.
    tags: Optional[dict[str, str]] = None  # noqa: UP045 (the converter needs Optional)


@dataclass
class ScanPageResult:
    to_encode: list[ObjectRef] = field(default_factory=list)
    unchanged: list[AssetOutcome] = field(default_factory=list)
    rejected: list[AssetOutcome] = field(default_factory=list)
    next_token: str = ""
    # Index versions besides the active one that must receive the same writes (a re-index
    # building, a retired version kept for rollback).
    extra_targets: list[IndexTarget] = field(default_factory=list)
    # Unchanged objects ingested with other tags than their index entry: retag, not encode.
    retag: list[ObjectRef] = field(default_factory=list)


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


@dataclass
class RetagInput:
    tenant: str
    index: IndexTarget
    objects: list[ObjectRef]
    tags: dict[str, str] = field(default_factory=dict)
    extra_targets: list[IndexTarget] = field(default_factory=list)


@dataclass
class RetagResult:
    outcomes: list[AssetOutcome] = field(default_factory=list)  # status retagged
    # Objects with no vectors left to rewrite (a worker died between a retag's delete and
    # insert): encode them again.
    to_encode: list[ObjectRef] = field(default_factory=list)


@stub(RESOLVE_INDEX)
def resolve_index() -> Optional[IndexTarget]:  # noqa: UP045 (the converter needs Optional)
    """The active index version, or None when nothing was ever indexed."""
    raise not_here(RESOLVE_INDEX)


@stub(DESCRIBE_ENCODER)
def describe_encoder() -> EncoderInfo:
    """The encode worker's configured model."""
    raise not_here(DESCRIBE_ENCODER)


@stub(CREATE_FIRST_INDEX, milvus=MILVUS_MANAGE)
def create_first_index(inp: CreateIndexInput) -> IndexTarget:
    """Create version 1 (collection + alias) for the encoder's model; idempotent."""
    raise not_here(CREATE_FIRST_INDEX)


@stub(SCAN_PAGE)
def scan_page(inp: ScanPageInput) -> ScanPageResult:
    """One page of a source: what to encode, what is unchanged, what is refused."""
    raise not_here(SCAN_PAGE)


@stub(ENCODE_BATCH, milvus=MILVUS_WRITE)
def encode_batch(inp: EncodeBatchInput) -> list[AssetOutcome]:
    """Decode, encode and write a batch of objects; heartbeats its own resume cursor."""
    raise not_here(ENCODE_BATCH)


@stub(RECORD_OUTCOMES, liveness_heartbeat=True, milvus=MILVUS_READ)
def record_outcomes(inp: RecordOutcomesInput) -> None:
    """Write a batch's outcomes to the registry (and their audit rows), and its chunks'
    words, read back from Milvus, to the lexical index."""
    raise not_here(RECORD_OUTCOMES)


@stub(RETAG_ASSETS, milvus=MILVUS_WRITE)
def retag_assets(inp: RetagInput) -> RetagResult:
    """Give unchanged assets new tags in every writable version and the registry."""
    raise not_here(RETAG_ASSETS)
