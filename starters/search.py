"""Nearest-neighbour search by text, in this process (a diagnostic next to ``Ask``)."""

from __future__ import annotations

from activities.clip.encoder import get_encoder
from activities.store import registry
from activities.store.vectors import get_store
from settings import get_settings


def nearest(text: str, tenant: str, top_k: int = 5) -> list[dict[str, object]]:
    s = get_settings()
    index = registry.active_index(registry.get_engine(s.database_endpoint()))
    if index is None:
        return []
    encoder = get_encoder(
        s.clip_model, s.clip_pretrained, s.resolved_checkpoint(), s.device, s.torch_threads
    )
    vector = encoder.encode_texts([text])[0]
    store = get_store(s.milvus_endpoint(), s.milvus_token.get_secret_value())
    return store.search(s.collection_prefix, vector.tolist(), tenant, top_k)
