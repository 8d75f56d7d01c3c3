"""Nearest-neighbour search by text, in this process: a diagnostic for tests and benchmarks.

``mmrag search`` does not use it: the CLI starts an ``Ask`` without generation, so a search
goes through the workers like every query (their warm model, their credentials, no model
download in the CLI). Here, as there, the query is encoded with the model the active
index was built with, never with this process's ``MMRAG_CLIP_*`` settings: vectors of
another model would be compared with the index's and rank nonsense.
"""

from __future__ import annotations

from activities.clip.models import WarmModels
from activities.store import registry
from activities.store.vectors import get_store
from settings import get_settings


def nearest(text: str, tenant: str, top_k: int = 5) -> list[dict[str, object]]:
    s = get_settings()
    index = registry.active_index(registry.get_engine(s.database_endpoint()))
    if index is None:
        return []
    encoder = WarmModels(s).for_spec(index)
    vector = encoder.encode_texts([text])[0]
    store = get_store(s.milvus_endpoint(), s.milvus_token.get_secret_value())
    return store.search(s.collection_prefix, vector.tolist(), tenant, top_k)
