"""Activity names and payloads shared by workflows and activity implementations.

Internal API (between mmrag's own workflows and workers), unlike ``contracts``. Standard
library only, so workflows can import it inside the sandbox.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from workflows.contracts import AssetOutcome, IndexTarget, ObjectRef

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


@dataclass
class CreateIndexInput:
    model: str
    pretrained: str
    dim: int


@dataclass
class ScanPageInput:
    tenant: str
    source: str
    page_token: str
    page_size: int
    index_version: int
    force: bool = False
    single_object: bool = False  # the source must be exactly one object, not a prefix


@dataclass
class ScanPageResult:
    to_encode: list[ObjectRef] = field(default_factory=list)
    unchanged: list[AssetOutcome] = field(default_factory=list)
    rejected: list[AssetOutcome] = field(default_factory=list)
    next_token: str = ""


@dataclass
class EncodeBatchInput:
    tenant: str
    index: IndexTarget
    objects: list[ObjectRef]
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class RecordOutcomesInput:
    tenant: str
    index_version: int
    objects: list[ObjectRef]
    outcomes: list[AssetOutcome]
    tags: dict[str, str] = field(default_factory=dict)
