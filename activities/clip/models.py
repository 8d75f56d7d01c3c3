"""The CLIP models of one worker process: the configured one (``MMRAG_CLIP_*``, what a new
index starts with) and those of the index versions it serves, each loaded once and kept
warm (during a re-index the old and the new model both serve from the same worker), and
one lock so that a single forward pass runs at a time: concurrent activities overlap their
decoding and Milvus calls with each other's model time instead of fighting over the device.
Shared by the batch and the query encoders of a worker."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Protocol

from activities.clip.encoder import ClipEncoder, get_encoder
from settings import Settings


class ModelSpec(Protocol):
    model: str
    pretrained: str
    checkpoint: str


class WarmModels:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.lock = threading.Lock()  # one forward pass at a time

    @property
    def configured(self) -> ClipEncoder:
        """The worker's configured model (MMRAG_CLIP_*): what a new index starts with."""
        s = self.settings
        return get_encoder(
            s.clip_model, s.clip_pretrained, s.resolved_checkpoint(), s.device, s.torch_threads
        )

    def for_spec(self, spec: ModelSpec) -> ClipEncoder:
        """The model an index version (or a re-index's model spec) was built with."""
        s = self.settings
        checkpoint = Path(spec.checkpoint) if spec.checkpoint else None
        return get_encoder(spec.model, spec.pretrained, checkpoint, s.device, s.torch_threads)
