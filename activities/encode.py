"""GPU-side ingest: fetch, decode, encode and store one batch, on ``mmrag-gpu-encode``.

Pixels never leave this worker: the activity receives URIs, decodes in a thread pool
while the model encodes the previous micro-batch, writes the vectors to Milvus itself and
returns only per-asset outcomes. A file that cannot be decoded fails alone.
"""

from __future__ import annotations

import base64
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.encoder import ClipEncoder, get_encoder
from activities.media import BadMediaError, decode_image
from activities.storage import ObjectMissingError, UnsupportedUriError, normalize_uri, store_for
from activities.vectors import ChunkRow, get_store
from workers.settings import Settings
from workflows.activity_payloads import (
    DESCRIBE_ENCODER,
    ENCODE_BATCH,
    ENCODE_QUERY,
    EncodeBatchInput,
    EncodeQueryInput,
    EncoderInfo,
    QueryVector,
)
from workflows.contracts import FAILED, INGESTED, MAX_INLINE_IMAGE_BYTES, AssetOutcome, ObjectRef

IMAGE_CHUNK = "image"


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


class LruCache:
    """A small thread-safe LRU map."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._data: OrderedDict[object, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: object) -> Any:
        with self._lock:
            if key not in self._data:
                return None
            self._data.move_to_end(key)
            return self._data[key]

    def put(self, key: object, value: Any) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)


class EncodeActivities:
    """Holds the warm model; one instance per encode worker process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._decode_pool = ThreadPoolExecutor(
            max_workers=max(1, settings.decode_threads), thread_name_prefix="decode"
        )
        # One forward pass at a time: concurrent activities overlap their decoding and
        # Milvus writes with each other's model time instead of fighting over the device.
        self._model_lock = threading.Lock()
        self._query_cache = LruCache(maxsize=4096)  # CLIP is deterministic: cache queries

    @property
    def encoder(self) -> ClipEncoder:
        s = self.settings
        return get_encoder(
            s.clip_model, s.clip_pretrained, s.resolved_checkpoint(), s.device, s.torch_threads
        )

    @activity.defn(name=DESCRIBE_ENCODER)
    def describe_encoder(self) -> EncoderInfo:
        enc = self.encoder
        return EncoderInfo(enc.model_name, enc.pretrained, enc.dim, str(enc.device))

    @activity.defn(name=ENCODE_BATCH)
    def encode_batch(self, inp: EncodeBatchInput) -> list[AssetOutcome]:
        enc = self.encoder
        if (enc.model_name, enc.pretrained, enc.dim) != (
            inp.index.model,
            inp.index.pretrained,
            inp.index.dim,
        ):
            raise ApplicationError(
                f"this encode worker runs {enc.model_name}/{enc.pretrained or 'local'} "
                f"(dim {enc.dim}) but index version {inp.index.version} was built with "
                f"{inp.index.model}/{inp.index.pretrained or 'local'} (dim {inp.index.dim}): "
                "start encode workers with the index's MMRAG_CLIP_MODEL / MMRAG_CLIP_PRETRAINED",
                type="EncoderMismatch",
                non_retryable=True,
            )
        outcomes: dict[str, AssetOutcome] = {}
        rows: list[ChunkRow] = []
        vectors: list[np.ndarray] = []
        micro = max(1, self.settings.batch_size)
        done = 0
        for refs, pixels in self._decoded_micro_batches(inp.objects, micro, outcomes):
            if pixels:
                with self._model_lock:
                    vectors.append(enc.encode_images(pixels))
                rows.extend(self._row(inp.tenant, ref, inp.tags) for ref in refs)
            done += len(refs)
            if activity.in_activity():  # also callable directly, e.g. by bench/ingest.py
                activity.heartbeat(done)
        store = get_store(
            self.settings.milvus_endpoint(), self.settings.milvus_token.get_secret_value()
        )
        # Failed assets lose their vectors too: an object overwritten by a corrupt version
        # must not keep answering with its old content.
        store.replace_assets(
            inp.index.collection,
            inp.tenant,
            [o.asset_id for o in inp.objects],
            rows,
            np.concatenate(vectors) if vectors else np.zeros((0, enc.dim), np.float32),
        )
        generations = {o.asset_id: o.generation for o in inp.objects}
        for row in rows:
            outcomes[row.asset_id] = AssetOutcome(
                row.uri, row.asset_id, INGESTED, generation=generations[row.asset_id], chunks=1
            )
        return [outcomes[o.asset_id] for o in inp.objects]

    def _decoded_micro_batches(
        self, objects: list[ObjectRef], micro: int, failures: dict[str, AssetOutcome]
    ) -> Iterator[tuple[list[ObjectRef], list]]:  # type: ignore[type-arg]
        """Yield (refs, pixel tensors) per micro-batch; decoding runs ahead in the pool."""
        futures: list[Future] = [self._decode_pool.submit(self._load, ref) for ref in objects]  # type: ignore[type-arg]
        for start in range(0, len(objects), micro):
            refs, pixels = [], []
            for ref, future in zip(
                objects[start : start + micro], futures[start : start + micro], strict=True
            ):
                try:
                    pixels.append(future.result())
                    refs.append(ref)
                except (BadMediaError, ObjectMissingError) as e:
                    failures[ref.asset_id] = AssetOutcome(
                        ref.uri, ref.asset_id, FAILED, generation=ref.generation, reason=str(e)
                    )
            yield refs, pixels

    def _load(self, ref: ObjectRef):  # type: ignore[no-untyped-def]
        s = self.settings
        data = store_for(ref.uri).read(ref.uri, s.max_object_bytes, ref.generation)
        image = decode_image(data, s.max_object_bytes, s.max_image_pixels)
        return self.encoder.preprocess(image)

    @activity.defn(name=ENCODE_QUERY)
    def encode_query(self, inp: EncodeQueryInput) -> QueryVector:
        """Text, image or hybrid (weighted mean of the normalised vectors, re-normalised)."""
        started = time.perf_counter()
        key = (inp.text, inp.image_uri, inp.image_base64, inp.hybrid_weight)
        cached = self._query_cache.get(key)
        if cached is not None:
            return QueryVector(cached, self.encoder.model_name, _ms(started), cached=True)
        enc = self.encoder
        parts: list[tuple[float, np.ndarray]] = []
        if inp.text.strip():
            with self._model_lock:
                parts.append((1.0 - inp.hybrid_weight, enc.encode_texts([inp.text])[0]))
        if inp.image_uri or inp.image_base64:
            try:
                pixels = self._query_image(inp)
            except (BadMediaError, ObjectMissingError, UnsupportedUriError, ValueError) as e:
                raise ApplicationError(
                    f"query image: {e}", type="BadQuery", non_retryable=True
                ) from e
            with self._model_lock:
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
        return QueryVector(values, enc.model_name, _ms(started))

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
            uri = normalize_uri(inp.image_uri)
            raw = store_for(uri).read(uri, s.max_object_bytes)
        return self.encoder.preprocess(decode_image(raw, s.max_object_bytes, s.max_image_pixels))

    @staticmethod
    def _row(tenant: str, ref: ObjectRef, tags: dict[str, str]) -> ChunkRow:
        return ChunkRow(
            asset_id=ref.asset_id,
            tenant=tenant,
            uri=ref.uri,
            media_type=ref.media_type or "image",
            chunk=IMAGE_CHUNK,
            created_at=ref.created_at,
            tags=tags,
        )
