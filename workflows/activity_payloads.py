"""Activity names and payloads shared by workflows and activity implementations.

Internal API (between mmrag's own workflows and workers), unlike ``contracts``. Standard
library only, so workflows can import it inside the sandbox.
"""

from __future__ import annotations

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


# -- Ask ------------------------------------------------------------------------------
ENCODE_QUERY = "encode_query"
RETRIEVE = "retrieve"
GENERATE = "generate"
FINALIZE_ANSWER = "finalize_answer"


@dataclass
class EncodeQueryInput:
    text: str = ""
    image_uri: str = ""
    image_base64: str = ""
    hybrid_weight: float = 0.5


@dataclass
class QueryVector:
    vector: list[float]
    model: str
    ms: float
    cached: bool = False


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


@dataclass
class GenerateInput:
    system_prompt: str
    user_prompt: str
    max_tokens: int
    source_ids: list[str]


@dataclass
class Generation:
    text: str
    kind: str  # generated | extractive (no LLM configured)
    model: str
    ms: float
    cached: bool = False


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
