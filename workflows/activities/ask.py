"""The Ask activities' homes: encode the query, retrieve, generate, finalise, and the
one-step forms (retrieve_and_answer, encode_and_retrieve)."""

from dataclasses import dataclass, field

from workflows.activities import MILVUS_READ, not_here, stub
from workflows.contracts import AskFilters, Source

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
    # An image + text query: the lexical leg reads the text alone, so it speaks only for the
    # text's share beyond the image's (RetrieveInput.lexical_share, docs/retrieval.md).
    has_image: bool = False
    hybrid_weight: float = 0.5

    @property
    def lexical_share(self) -> float:
        """How much the lexical leg counts in fusion: 1 for a text query; for an image +
        text query ``1 - 2 * hybrid_weight`` (at least 0): an even or image-heavy hybrid
        (``hybrid_weight`` >= 0.5) ranks by the vectors alone, as ``hybrid_weight`` always
        meant, and a text-heavy one adds the lexical leg as the text's weight grows."""
        if not self.has_image:
            return 1.0
        return max(0.0, min(1.0, 1.0 - 2.0 * self.hybrid_weight))


@dataclass
class FusionChunk:
    """One source of a fused prompt, PII-redacted, as the fusion helper reads it."""

    id: str
    media_type: str
    chunk: str
    caption: str = ""
    snippet: str = ""
    tags: list[str] = field(default_factory=list)  # the asset's tags, key=value
    origin: str = ""  # where the text came from: "ocr", "text-layer", ""


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


@stub(ENCODE_QUERY, milvus=MILVUS_READ)
def encode_query(inp: EncodeQueryInput) -> QueryVector:
    """Embed the query (text, image or both) with the model of the index the alias names."""
    raise not_here(ENCODE_QUERY)


@stub(RETRIEVE, milvus=MILVUS_READ)
def retrieve(inp: RetrieveInput) -> Retrieval:
    """Search, re-rank and fuse the prompt (a local activity)."""
    raise not_here(RETRIEVE)


@stub(GENERATE, liveness_heartbeat=True)
def generate(inp: GenerateInput) -> Generation:
    """Ask the LLM (or answer extractively when none is configured)."""
    raise not_here(GENERATE)


@stub(FINALIZE_ANSWER)
def finalize_answer(inp: FinalizeInput) -> FinalAnswer:
    """Validate the answer, put in the citations, write the audit row (a local activity)."""
    raise not_here(FINALIZE_ANSWER)


@stub(RETRIEVE_AND_ANSWER, milvus=MILVUS_READ)
def retrieve_and_answer(inp: RetrieveAndAnswerInput) -> RetrievedAnswer:
    """A retrieval-only Ask in one local activity: retrieve, answer, audit."""
    raise not_here(RETRIEVE_AND_ANSWER)


@stub(ENCODE_AND_RETRIEVE, milvus=MILVUS_READ)
def encode_and_retrieve(inp: EncodeAndRetrieveInput) -> EncodedRetrieval:
    """The query worker's first step: encode and retrieve in one local activity."""
    raise not_here(ENCODE_AND_RETRIEVE)
