"""The caption activities' homes (activities/captions.py): plan which image and keyframe
chunks of an ingest batch need a caption (cpu, local), ask the vision model for them
(``mmrag-gpu-generate``), store them (cpu, local).

Why three steps: the vision model is reachable only from the generate queue, whose workers
have no database login, while the caption cache (by content hash) and the lexical index
that holds captions live in Postgres, reached by the cpu worker. Only words and hashes
cross the queue; pixels are read next to the model.
"""

from dataclasses import dataclass, field

from workflows.activities import not_here, stub
from workflows.contracts import ObjectRef

PLAN_CAPTIONS = "plan_captions"
CAPTION_MEDIA = "caption_media"
STORE_CAPTIONS = "store_captions"


@dataclass
class PlanCaptionsInput:
    tenant: str
    objects: list[ObjectRef]  # the batch's ingested images and videos


@dataclass
class CaptionItem:
    """One image or keyframe chunk to caption, and the content hash it is cached under."""

    asset_id: str
    uri: str
    media_type: str
    generation: str
    chunk: str  # "image" or "frame:S.mmm"
    content_hash: str


@dataclass
class CaptionPlan:
    """``model`` "" means captions are off on this worker: nothing to do."""

    model: str = ""
    items: list[CaptionItem] = field(default_factory=list)
    cached: int = 0  # chunks whose caption came from the cache, already stored


@dataclass
class CaptionInput:
    tenant: str
    model: str
    items: list[CaptionItem]


@dataclass
class Caption:
    asset_id: str
    chunk: str
    content_hash: str
    text: str


@dataclass
class CaptionResult:
    captions: list[Caption] = field(default_factory=list)
    # Chunks left without a caption, with the reason (content changed since the plan, the
    # frame is no longer in the video, the model answered nothing).
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass
class StoreCaptionsInput:
    tenant: str
    captions: list[Caption]


@stub(PLAN_CAPTIONS)
def plan_captions(inp: PlanCaptionsInput) -> CaptionPlan:
    """The chunks that need a caption; cached captions are stored on the way (local)."""
    raise not_here(PLAN_CAPTIONS)


@stub(CAPTION_MEDIA, liveness_heartbeat=True)
def caption_media(inp: CaptionInput) -> CaptionResult:
    """Read each picture next to the vision model and ask it for a caption."""
    raise not_here(CAPTION_MEDIA)


@stub(STORE_CAPTIONS)
def store_captions(inp: StoreCaptionsInput) -> int:
    """Store captions in the lexical index under their content hash (local)."""
    raise not_here(STORE_CAPTIONS)
