"""Query encoding for ``Ask``: a question's text, image or both turned into one vector by the
model of the index version the query alias names. What the query role and the encode
queue run; unlike batch encoding (activities/encode_batch.py) it needs only the model and
a decoder child for a query image: no decode threads, no streaming.
"""

from __future__ import annotations

import base64
import time

import numpy as np
from PIL import Image
from temporalio.exceptions import ApplicationError

from activities.clip.models import WarmModels
from activities.media.formats import BadMediaError, MediaLimits
from activities.media.sandbox import SandboxPool
from activities.runtime.lru import Lru
from activities.runtime.metrics import ms_since
from activities.store.objects import ObjectMissingError, UnsupportedUriError, store_for, worker_uri
from activities.store.roots import OutsideRootsError, StorageRoots
from activities.store.vectors import get_store
from settings import Settings
from workflows.activities import ask as ask_stubs
from workflows.activities import implements
from workflows.activities.ask import EncodeQueryInput, QueryVector
from workflows.activities.lifecycle import ModelSpec
from workflows.contracts import MAX_INLINE_IMAGE_BYTES

ALIAS_CACHE_SECONDS = 2.0  # after a swap, queries follow the alias within this long
QUERY_CACHE_SIZE = 4096  # CLIP is deterministic: a repeated query is not encoded again


class QueryEncodeActivities:
    """One instance per worker process that encodes queries (the encode and query roles).
    ``models`` and ``sandboxes`` are shared with the batch encoder where both run."""

    def __init__(
        self,
        settings: Settings,
        models: WarmModels | None = None,
        sandboxes: SandboxPool | None = None,
    ) -> None:
        self.settings = settings
        self.models = models or WarmModels(settings)
        self.limits = MediaLimits.from_settings(settings)
        self.roots = StorageRoots.from_settings(settings.storage_roots, settings.state_dir)
        self.sandboxes = sandboxes or SandboxPool.from_settings(settings)
        self._own_sandboxes = sandboxes is None
        self._query_cache: Lru[tuple[str, str, str, str, float], list[float]] = Lru(
            QUERY_CACHE_SIZE
        )
        self._alias_cache: tuple[float, tuple[str, int, ModelSpec | None] | None] = (0.0, None)

    def close(self) -> None:
        """Stop the decoder children this encoder started (they also die with the process)."""
        if self._own_sandboxes:
            self.sandboxes.close()

    @implements(ask_stubs.encode_query)
    def encode_query(self, inp: EncodeQueryInput) -> QueryVector:
        """Text, image or hybrid (weighted mean of the normalised vectors, re-normalised)."""
        started = time.perf_counter()
        collection, version, spec = self._alias_target()
        enc = self.models.for_spec(spec) if spec else self.models.configured
        if inp.image_uri:  # before the cache: a cached vector must not reveal another's file
            try:
                self.roots.for_tenant(inp.tenant).confine(worker_uri(inp.image_uri))
            except (OutsideRootsError, UnsupportedUriError) as e:
                raise ApplicationError(
                    f"query image: {e}", type="OutsideStorageRoots", non_retryable=True
                ) from e
        key = (collection, inp.text, inp.image_uri, inp.image_base64, inp.hybrid_weight)
        cached = self._query_cache.get(key)
        if cached is not None:
            return QueryVector(
                cached,
                enc.model_name,
                ms_since(started),
                True,
                collection=collection,
                index_version=version,
            )
        parts: list[tuple[float, np.ndarray]] = []
        if inp.text.strip():
            with self.models.lock:
                parts.append((1.0 - inp.hybrid_weight, enc.encode_texts([inp.text])[0]))
        if inp.image_uri or inp.image_base64:
            try:
                pixels = self._query_image(inp)
            except (
                BadMediaError,
                ObjectMissingError,
                UnsupportedUriError,
                OutsideRootsError,
                ValueError,
            ) as e:
                raise ApplicationError(
                    f"query image: {e}", type="BadQuery", non_retryable=True
                ) from e
            with self.models.lock:
                parts.append((inp.hybrid_weight, enc.encode_images([pixels])[0]))
        if not parts:
            raise ApplicationError(
                "the query has neither text nor image", type="BadQuery", non_retryable=True
            )
        if len(parts) == 1:
            vector = parts[0][1]
        else:
            vector = sum(w * v for w, v in parts)  # type: ignore[assignment]
            vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
        values = [float(x) for x in vector]
        self._query_cache.put(key, values)
        return QueryVector(
            values, enc.model_name, ms_since(started), collection=collection, index_version=version
        )

    def _alias_target(self) -> tuple[str, int, ModelSpec | None]:
        """The collection the query alias names and the model it was built with, read from
        Milvus and cached for a moment: after a swap, queries follow within seconds, and
        each query is encoded by the model of the collection it is searched in."""
        now = time.monotonic()
        cached_at, value = self._alias_cache
        if value is not None and now - cached_at < ALIAS_CACHE_SECONDS:
            return value
        s = self.settings
        store = get_store(s.milvus_endpoint(), s.milvus_token.get_secret_value())
        found = store.alias_model(s.collection_prefix)  # Milvus down: raises, Ask retries
        if found is None:
            return "", 0, None  # no alias yet: nothing has been indexed
        collection, model = found
        spec = ModelSpec(
            model.get("model", ""), model.get("pretrained", ""), model.get("checkpoint", "")
        )
        version = model.get("version") or collection.rsplit("_v", 1)[-1]  # older collections
        value = (
            collection,
            int(version) if str(version).isdigit() else 0,
            spec if spec.model else None,
        )
        self._alias_cache = (now, value)
        return value

    def _query_image(self, inp: EncodeQueryInput):  # type: ignore[no-untyped-def]
        s = self.settings
        if inp.image_base64:
            raw = base64.b64decode(inp.image_base64, validate=True)
            if len(raw) > MAX_INLINE_IMAGE_BYTES:
                raise BadMediaError(
                    f"inline image is {len(raw)} bytes; send images over "
                    f"{MAX_INLINE_IMAGE_BYTES} bytes as image_uri"
                )
        else:
            uri = worker_uri(inp.image_uri)
            raw = store_for(uri, self.roots.for_tenant(inp.tenant)).read(uri, s.max_object_bytes)
        return self.models.configured.preprocess(self._decode_image(raw))

    def _decode_image(self, data: bytes) -> Image.Image:
        """A query image, decoded in a sandboxed child under MMRAG_IMAGE_DECODE_TIME_LIMIT_S
        and shrunk to MMRAG_RENDER_MAX_SIDE, exactly as the same image is when ingested."""
        return self.sandboxes.decode_image(
            data, "", self.limits, self.settings.image_decode_time_limit_s
        )
