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
from pathlib import Path
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
    DESCRIBE_MODEL,
    ENCODE_BATCH,
    ENCODE_QUERY,
    EncodeBatchInput,
    EncodeQueryInput,
    EncoderInfo,
    ModelSpec,
    QueryVector,
)
from workflows.contracts import (
    FAILED,
    INGESTED,
    MAX_INLINE_IMAGE_BYTES,
    AssetOutcome,
    IndexTarget,
    ObjectRef,
)

IMAGE_CHUNK = "image"
ALIAS_CACHE_SECONDS = 2.0


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
        self._alias_cache: tuple[float, tuple[str, int, ModelSpec | None] | None] = (0.0, None)

    @property
    def encoder(self) -> ClipEncoder:
        """The worker's configured model (MMRAG_CLIP_*): what a new index starts with."""
        s = self.settings
        return get_encoder(
            s.clip_model, s.clip_pretrained, s.resolved_checkpoint(), s.device, s.torch_threads
        )

    def encoder_for(self, spec: IndexTarget | ModelSpec) -> ClipEncoder:
        """The model an index version was built with, loaded once and kept warm: during a
        re-index the old and the new model both serve from this worker."""
        s = self.settings
        checkpoint = Path(spec.checkpoint) if spec.checkpoint else None
        return get_encoder(spec.model, spec.pretrained, checkpoint, s.device, s.torch_threads)

    @activity.defn(name=DESCRIBE_ENCODER)
    def describe_encoder(self) -> EncoderInfo:
        enc = self.encoder
        checkpoint = self.settings.resolved_checkpoint()
        return EncoderInfo(
            enc.model_name, enc.pretrained, enc.dim, str(enc.device), str(checkpoint or "")
        )

    @activity.defn(name=DESCRIBE_MODEL)
    def describe_model(self, spec: ModelSpec) -> EncoderInfo:
        """Load (and so validate) a model a re-index asks for; report its dimension."""
        try:
            enc = self.encoder_for(spec)
        except ValueError as e:  # unknown model, missing checkpoint: the user must fix it
            raise ApplicationError(str(e), type="BadModel", non_retryable=True) from e
        return EncoderInfo(
            enc.model_name, enc.pretrained, enc.dim, str(enc.device), spec.checkpoint
        )

    @activity.defn(name=ENCODE_BATCH)
    def encode_batch(self, inp: EncodeBatchInput) -> list[AssetOutcome]:
        """Decode each object once; encode and write it into every target index version."""
        targets = [inp.index, *inp.extra_targets]
        encoders = [self.encoder_for(t) for t in targets]
        outcomes: dict[str, AssetOutcome] = {}
        rows: list[ChunkRow] = []
        vectors: list[list[np.ndarray]] = [[] for _ in targets]
        micro = max(1, self.settings.batch_size)
        done = 0
        for refs, pixels in self._decoded_micro_batches(inp.objects, micro, outcomes, encoders):
            if refs:
                for i, enc in enumerate(encoders):
                    with self._model_lock:
                        vectors[i].append(enc.encode_images([p[i] for p in pixels]))
                rows.extend(self._row(inp.tenant, ref, inp.tags) for ref in refs)
            done += len(refs)
            if activity.in_activity():  # also callable directly, e.g. by bench/ingest.py
                activity.heartbeat(done)
        store = get_store(
            self.settings.milvus_endpoint(), self.settings.milvus_token.get_secret_value()
        )
        # Failed assets lose their vectors too: an object overwritten by a corrupt version
        # must not keep answering with its old content.
        asset_ids = [o.asset_id for o in inp.objects]
        for target, enc, parts in zip(targets, encoders, vectors, strict=True):
            store.replace_assets(
                target.collection,
                inp.tenant,
                asset_ids,
                rows,
                np.concatenate(parts) if parts else np.zeros((0, enc.dim), np.float32),
            )
        for row in rows:
            outcomes[row.asset_id] = AssetOutcome(
                row.uri, row.asset_id, INGESTED, generation=row.generation, chunks=1
            )
        return [outcomes[o.asset_id] for o in inp.objects]

    def _decoded_micro_batches(
        self,
        objects: list[ObjectRef],
        micro: int,
        failures: dict[str, AssetOutcome],
        encoders: list[ClipEncoder],
    ) -> Iterator[tuple[list[ObjectRef], list[list[Any]]]]:
        """Yield (refs, per-object pixel tensors for each encoder) per micro-batch;
        decoding runs ahead in the pool."""
        futures: list[Future[list[Any]]] = [
            self._decode_pool.submit(self._load, ref, encoders) for ref in objects
        ]
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

    def _load(self, ref: ObjectRef, encoders: list[ClipEncoder]) -> list[Any]:
        s = self.settings
        data = store_for(ref.uri).read(ref.uri, s.max_object_bytes, ref.generation)
        image = decode_image(data, s.max_object_bytes, s.max_image_pixels)
        return [enc.preprocess(image) for enc in encoders]

    @activity.defn(name=ENCODE_QUERY)
    def encode_query(self, inp: EncodeQueryInput) -> QueryVector:
        """Text, image or hybrid (weighted mean of the normalised vectors, re-normalised)."""
        started = time.perf_counter()
        collection, version, spec = self._alias_target()
        enc = self.encoder_for(spec) if spec else self.encoder
        key = (collection, inp.text, inp.image_uri, inp.image_base64, inp.hybrid_weight)
        cached = self._query_cache.get(key)
        if cached is not None:
            return QueryVector(
                cached,
                enc.model_name,
                _ms(started),
                True,
                collection=collection,
                index_version=version,
            )
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
        return QueryVector(
            values, enc.model_name, _ms(started), collection=collection, index_version=version
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
        try:
            collection, model = store.alias_model(s.collection_prefix)
        except Exception:  # no alias yet: nothing has been indexed
            return "", 0, None
        spec = ModelSpec(
            model.get("model", ""), model.get("pretrained", ""), model.get("checkpoint", "")
        )
        value = (collection, int(model.get("version", 0) or 0), spec if spec.model else None)
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
            generation=ref.generation,
        )
