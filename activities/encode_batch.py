"""GPU-side ingest: fetch, decode, encode and store one batch, on ``mmrag-gpu-encode``
(queries are encoded by activities/encode_query.py, with the same warm models).

Pixels never leave this worker: the activity receives URIs, decodes, encodes, writes the
vectors to Milvus itself and returns only per-asset outcomes. A file that cannot be
decoded fails alone. A batch runs in two phases:

1. **Images** (one vector each, chunk ``image``): fetched and decoded in a thread pool
   while the model encodes the previous micro-batch, written with one delete-then-insert
   for the whole phase (as before PDFs and videos existed).
2. **Streamed assets**, PDFs (``page:N`` + passages ``page:N:p:K``) and videos (``frame:S.mmm``),
   one after the other: decoded in a sandboxed child process (``activities/media/sandbox.py``)
   ahead of the encoder, and written a *group* of chunks at a time, each group by
   delete-then-insert of its own deterministic keys. After every group the activity
   heartbeats a cursor (:class:`BatchProgress`), so a retry after a worker restart skips
   the assets already done and resumes a long video or PDF after its last written group
   instead of starting over. Chunks an older version of the asset had and this one lacks
   are deleted only once the asset is complete, so its old vectors keep answering queries
   until the new ones are all in.

One module of ~600 lines: the two phases, the resume cursor and the prefetching decoder
share one batch's state and its failure rules; split, each part would need the others.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.clip.encoder import ClipEncoder, resolve_device
from activities.clip.model_policy import ModelNotAllowedError, check_model
from activities.clip.models import WarmModels
from activities.media.formats import (
    HEAD_BYTES,
    IMAGE_TYPES,
    JPEG,
    PDF_TYPES,
    VIDEO_TYPES,
    BadMediaError,
    MediaChunk,
    MediaLimits,
    Step,
    sniff,
    truncate_utf8,
    type_note,
)
from activities.media.jpeg_gpu import decoder_for
from activities.media.ocr import ocr_allowance_s, ocr_limits
from activities.media.sandbox import DecoderSandbox, SandboxPool
from activities.runtime import metrics
from activities.runtime.errors import UnreadableObjectError
from activities.store.objects import ObjectMissingError, UnsupportedUriError, store_for
from activities.store.roots import (
    NotARegularFileError,
    OutsideRootsError,
    StorageRoots,
    TenantRoots,
    open_regular_file,
)
from activities.store.vectors import MAX_SNIPPET, ChunkRow, VectorStore, get_store
from settings import Settings
from workflows.activities import implements
from workflows.activities import ingest as ingest_stubs
from workflows.activities import lifecycle as lifecycle_stubs
from workflows.activities.ingest import (
    EncodeBatchInput,
    EncoderInfo,
)
from workflows.activities.lifecycle import ModelSpec
from workflows.contracts import (
    FAILED,
    INGESTED,
    AssetOutcome,
    IndexTarget,
    ObjectRef,
)

log = logging.getLogger(__name__)

IMAGE_CHUNK = "image"
STREAMED_TYPES = PDF_TYPES | VIDEO_TYPES
FLUSH_EVERY_S = 10.0  # a streamed asset's vectors are written (and its cursor saved) this often
IDLE_HEARTBEAT_S = 5.0  # heartbeat while waiting on a slow decoder
PREFETCH_STEPS = 8  # decoded steps buffered ahead of the encoder per streamed asset

Heartbeat = Callable[[dict[str, Any]], None]


_OUTCOME_FIELDS = {f.name for f in fields(AssetOutcome)}


@dataclass
class BatchProgress:
    """What a retried ``encode_batch`` resumes from: its heartbeat details, as JSON.

    ``done``: outcomes of finished assets; ``images_done``: phase 1 is written;
    ``current``: the streamed asset in progress, ``{"asset_id", "cursor", "written"}``,
    where ``cursor`` is the decoder's resume point after the last written group and
    ``written`` the locators written so far (kept at the end, the rest of the asset's
    old chunks deleted).
    """

    done: dict[str, AssetOutcome] = field(default_factory=dict)
    images_done: bool = False
    current: dict[str, Any] | None = None

    @classmethod
    def from_details(cls, details: Sequence[Any]) -> BatchProgress:
        """Tolerant: details from an older worker (a plain count) mean "start over"."""
        last = details[-1] if details else None
        if not isinstance(last, dict) or last.get("v") != 1:
            return cls()
        done = {
            asset_id: AssetOutcome(**{k: v for k, v in o.items() if k in _OUTCOME_FIELDS})
            for asset_id, o in (last.get("done") or {}).items()
            if isinstance(o, dict)
        }
        current = last.get("current")
        return cls(
            done, bool(last.get("images_done")), current if isinstance(current, dict) else None
        )

    def details(self) -> dict[str, Any]:
        return {
            "v": 1,
            "done": {k: asdict(o) for k, o in self.done.items()},
            "images_done": self.images_done,
            "current": self.current,
        }


class BatchEncodeActivities:
    """Ingest's encoding on the encode queue: the warm models, the decode threads and the
    decoder sandboxes; one instance per encode worker process."""

    def __init__(self, settings: Settings, models: WarmModels | None = None) -> None:
        self.settings = settings
        self.models = models or WarmModels(settings)
        self.limits = ocr_limits(MediaLimits.from_settings(settings))
        self.roots = StorageRoots.from_settings(settings.storage_roots, settings.state_dir)
        self._decode_pool = ThreadPoolExecutor(
            max_workers=max(1, settings.decode_threads), thread_name_prefix="decode"
        )
        # One reader thread per streamed asset in flight (at most one per activity).
        self._stream_pool = ThreadPoolExecutor(
            max_workers=max(2, settings.max_concurrent_encode_activities),
            thread_name_prefix="stream",
        )
        # Decoder children for every file: images (one per decode thread), PDFs and videos.
        self.sandboxes = SandboxPool.from_settings(settings)
        # Plain JPEGs decoded on the encoder's GPU (MMRAG_GPU_JPEG_DECODE), the rest as above.
        self.gpu_jpegs = decoder_for(settings.gpu_jpeg_decode, resolve_device(settings.device))

    def close(self) -> None:
        """Stop the decoder children (they also die with this process)."""
        self.sandboxes.close()

    def _store(self) -> VectorStore:
        return get_store(
            self.settings.milvus_endpoint(), self.settings.milvus_token.get_secret_value()
        )

    @implements(ingest_stubs.describe_encoder)
    def describe_encoder(self) -> EncoderInfo:
        enc = self.models.configured
        checkpoint = self.settings.resolved_checkpoint()
        return EncoderInfo(
            enc.model_name, enc.pretrained, enc.dim, str(enc.device), str(checkpoint or "")
        )

    @implements(lifecycle_stubs.describe_model)
    def describe_model(self, spec: ModelSpec) -> EncoderInfo:
        """Load (and so validate) a model a re-index asks for; report its dimension. Only
        models on the allow-list are loaded (activities/clip/model_policy.py)."""
        try:
            check_model(self.settings, spec.model, spec.pretrained, spec.checkpoint)
        except ModelNotAllowedError as e:
            raise ApplicationError(str(e), type="ModelNotAllowed", non_retryable=True) from e
        try:
            enc = self.models.for_spec(spec)
        except ValueError as e:  # unknown model, missing checkpoint: the user must fix it
            raise ApplicationError(str(e), type="BadModel", non_retryable=True) from e
        return EncoderInfo(
            enc.model_name, enc.pretrained, enc.dim, str(enc.device), spec.checkpoint
        )

    # -- ingest ---------------------------------------------------------------------------
    @implements(ingest_stubs.encode_batch)
    def encode_batch(self, inp: EncodeBatchInput) -> list[AssetOutcome]:
        """Decode each object once; encode and write it into every target index version."""
        progress = BatchProgress()
        if activity.in_activity():  # also callable directly, e.g. by bench/ingest.py
            progress = BatchProgress.from_details(activity.info().heartbeat_details)
            if progress.done or progress.current:
                log.info(
                    "resuming encode batch: %d assets done, in progress: %s",
                    len(progress.done),
                    progress.current and progress.current.get("asset_id"),
                )
        return self.encode_objects(inp, progress, _heartbeat)

    def encode_objects(
        self, inp: EncodeBatchInput, progress: BatchProgress, beat: Heartbeat
    ) -> list[AssetOutcome]:
        """The batch, resumed from ``progress``; ``beat`` records progress durably.

        Every target index version (``inp.index`` and, during a re-index, ``extra_targets``)
        gets the same chunks, each encoded by the model that version was built with.
        """
        targets = [inp.index, *inp.extra_targets]
        encoders = [self.models.for_spec(t) for t in targets]
        roots = self.roots.for_tenant(inp.tenant)
        self._classify(inp.objects, roots)
        images = [o for o in inp.objects if o.media_type not in STREAMED_TYPES]
        if images and not progress.images_done:
            outcomes = self._encode_images(
                targets, encoders, inp, images, roots, lambda: beat(progress.details())
            )
            for outcome in outcomes:
                progress.done[outcome.asset_id] = outcome
            progress.images_done = True
            beat(progress.details())
        for ref in inp.objects:
            if ref.media_type in STREAMED_TYPES and ref.asset_id not in progress.done:
                outcome = self._encode_streamed(targets, encoders, inp, ref, roots, progress, beat)
                progress.done[ref.asset_id] = outcome
                progress.current = None
                beat(progress.details())
        return [progress.done[o.asset_id] for o in inp.objects]

    def _classify(self, objects: Sequence[ObjectRef], roots: TenantRoots) -> None:
        """Sniff objects the scan did not (direct callers): the phase depends on the type."""
        for ref in objects:
            if ref.media_type:
                continue
            # Unreadable now: the image phase reports it precisely.
            with contextlib.suppress(
                ObjectMissingError, UnsupportedUriError, OutsideRootsError, OSError
            ):
                ref.media_type = sniff(store_for(ref.uri, roots).read_head(ref.uri, HEAD_BYTES))

    def _failed(self, ref: ObjectRef, reason: str) -> AssetOutcome:
        note = type_note(ref.uri, ref.content_type, ref.media_type)
        if note:
            reason = f"{reason} ({note})"
        return AssetOutcome(
            ref.uri, ref.asset_id, FAILED, generation=ref.generation, reason=reason, note=note
        )

    def _ingested(self, ref: ObjectRef, chunks: int, notes: Sequence[str] = ()) -> AssetOutcome:
        note = "; ".join(
            n for n in (type_note(ref.uri, ref.content_type, ref.media_type), *notes) if n
        )
        return AssetOutcome(
            ref.uri, ref.asset_id, INGESTED, generation=ref.generation, chunks=chunks, note=note
        )

    @staticmethod
    def _row(
        tenant: str, ref: ObjectRef, tags: dict[str, str], chunk: str, snippet: str = ""
    ) -> ChunkRow:
        return ChunkRow(
            asset_id=ref.asset_id,
            tenant=tenant,
            uri=ref.uri,
            media_type=ref.media_type or "image",
            chunk=chunk,
            created_at=ref.created_at,
            tags=tags,
            snippet=truncate_utf8(snippet, MAX_SNIPPET),
            generation=ref.generation,
        )

    # -- phase 1: images --------------------------------------------------------------------
    def _encode_images(
        self,
        targets: list[IndexTarget],
        encoders: list[ClipEncoder],
        inp: EncodeBatchInput,
        objects: list[ObjectRef],
        roots: TenantRoots,
        beat: Callable[[], None],
    ) -> list[AssetOutcome]:
        outcomes: dict[str, AssetOutcome] = {}
        rows: list[ChunkRow] = []
        vectors: list[list[np.ndarray]] = [[] for _ in targets]
        micro = max(1, self.settings.batch_size)
        for refs, decoded in self._decoded_micro_batches(
            objects, micro, outcomes, encoders, roots, beat
        ):
            if refs:
                for i, enc in enumerate(encoders):
                    with self.models.lock:
                        started = time.perf_counter()
                        vectors[i].append(enc.encode_images([p[i] for p, _ in decoded]))
                        metrics.observe("clip_seconds", time.perf_counter() - started)
                rows.extend(
                    self._row(inp.tenant, ref, inp.tags, IMAGE_CHUNK, chunk.snippet)
                    for ref, (_, chunk) in zip(refs, decoded, strict=True)
                )
            beat()
        # Failed assets lose their vectors too: an object overwritten by a corrupt version
        # must not keep answering with its old content.
        asset_ids = [o.asset_id for o in objects]
        for target, enc, parts in zip(targets, encoders, vectors, strict=True):
            self._store().replace_assets(
                target.collection,
                inp.tenant,
                asset_ids,
                rows,
                np.concatenate(parts) if parts else np.zeros((0, enc.dim), np.float32),
            )
        by_id = {o.asset_id: o for o in objects}
        for row in rows:
            outcomes[row.asset_id] = self._ingested(by_id[row.asset_id], 1)
        return [outcomes[o.asset_id] for o in objects]

    def _decoded_micro_batches(
        self,
        objects: list[ObjectRef],
        micro: int,
        failures: dict[str, AssetOutcome],
        encoders: list[ClipEncoder],
        roots: TenantRoots,
        beat: Callable[[], None],
    ) -> Iterator[tuple[list[ObjectRef], list[tuple[list[Any], MediaChunk]]]]:
        """Yield (refs, per object: (pixel tensors for each encoder, its chunk without the
        image: its OCR snippet and origin)) per micro-batch;
        decoding runs ahead in the pool. Heartbeats while it waits: a micro-batch of images
        that each take up to MMRAG_IMAGE_DECODE_TIME_LIMIT_S must not look like a dead
        worker (the batch would be retried, and time out again, for ever)."""
        futures: list[Future[tuple[list[Any], MediaChunk]]] = [
            self._decode_pool.submit(self._load, ref, encoders, roots) for ref in objects
        ]
        for start in range(0, len(objects), micro):
            refs, pixels = [], []
            for ref, future in zip(
                objects[start : start + micro], futures[start : start + micro], strict=True
            ):
                try:
                    while True:
                        try:
                            pixels.append(future.result(timeout=IDLE_HEARTBEAT_S))
                            break
                        except FutureTimeout:
                            beat()
                    refs.append(ref)
                except UnreadableObjectError as e:
                    failures[ref.asset_id] = self._failed(ref, str(e))
            yield refs, pixels

    def _load(
        self, ref: ObjectRef, encoders: list[ClipEncoder], roots: TenantRoots
    ) -> tuple[list[Any], MediaChunk]:
        s = self.settings
        data = store_for(ref.uri, roots).read(ref.uri, s.max_object_bytes, ref.generation)
        mime = sniff(data[:HEAD_BYTES])
        if data and mime not in IMAGE_TYPES:
            raise BadMediaError(
                f"the object changed since it was listed: its bytes are now "
                f"{mime or 'unrecognised'}; ingest it again"
                if ref.media_type in IMAGE_TYPES
                else f"not an image: the bytes are {mime or 'unrecognised'}"
            )
        if self.gpu_jpegs is not None and mime == JPEG:  # docs/media.md, GPU JPEG decoding
            image_t = self.gpu_jpegs.load(data, self.limits)  # None: the sandbox decodes it
            tensors = (
                [enc.preprocess_tensor(image_t) for enc in encoders] if image_t is not None else []
            )
            if tensors and all(t is not None for t in tensors):
                return tensors, MediaChunk(IMAGE_CHUNK)
        # An image's OCR (at most MMRAG_OCR_PAGE_TIMEOUT_S) counts within its decode limit.
        chunk = self.sandboxes.decode_image_chunk(
            data, mime, self.limits, self.settings.image_decode_time_limit_s
        )
        image, chunk.image = chunk.image, None
        assert image is not None
        return [enc.preprocess(image) for enc in encoders], chunk

    def _decode_image(self, data: bytes, mime: str = "") -> Image.Image:
        """An ingested or query image, decoded in a sandboxed child under
        MMRAG_IMAGE_DECODE_TIME_LIMIT_S (and shrunk to MMRAG_RENDER_MAX_SIDE, so a query
        image is encoded exactly as the same image was when it was ingested)."""
        return self.sandboxes.decode_image(
            data, mime, self.limits, self.settings.image_decode_time_limit_s
        )

    # -- phase 2: PDFs and videos, one at a time, resumable ---------------------------------
    def _encode_streamed(
        self,
        targets: list[IndexTarget],
        encoders: list[ClipEncoder],
        inp: EncodeBatchInput,
        ref: ObjectRef,
        roots: TenantRoots,
        progress: BatchProgress,
        beat: Heartbeat,
    ) -> AssetOutcome:
        current = progress.current
        resume = current if current and current.get("asset_id") == ref.asset_id else None
        cursor = dict(resume.get("cursor") or {}) if resume else None
        written: list[str] = [str(x) for x in resume.get("written", [])] if resume else []
        if resume:
            log.info("resuming %s after %d chunks at %s", ref.uri, len(written), cursor)
        seen = set(written)
        notes: list[str] = []
        store = self._store()
        try:
            # closing(): an error while writing stops the decoder thread before the sandbox
            # goes back to the pool (a suspended generator would otherwise keep it busy).
            with (
                self._local_copy(ref, roots) as path,
                self.sandboxes.lease() as sandbox,
                contextlib.closing(
                    self._flush_groups(
                        encoders,
                        sandbox,
                        path,
                        ref.media_type,
                        cursor,
                        lambda: beat(progress.details()),
                    )
                ) as groups,
            ):
                for steps, pixels in groups:
                    notes.extend(s.note for s in steps if s.note)
                    chunks = [c for s in steps for c in s.chunks]
                    if chunks:
                        rows = [
                            self._row(inp.tenant, ref, inp.tags, c.locator, c.snippet)
                            for c in chunks
                        ]
                        for i, (target, enc) in enumerate(zip(targets, encoders, strict=True)):
                            vectors = self._encode_chunks(enc, chunks, [p[i] for p in pixels])
                            store.replace_chunks(target.collection, inp.tenant, rows, vectors)
                        for chunk in chunks:
                            if chunk.locator not in seen:
                                seen.add(chunk.locator)
                                written.append(chunk.locator)
                    progress.current = {
                        "asset_id": ref.asset_id,
                        "cursor": steps[-1].cursor,
                        "written": written,
                    }
                    beat(progress.details())
            if not written:
                raise BadMediaError(f"nothing to index: the {ref.media_type} yielded no pages")
        except UnreadableObjectError as e:
            for target in targets:
                store.delete_assets(target.collection, inp.tenant, [ref.asset_id])
            return self._failed(ref, str(e))
        keep = [f"{ref.asset_id}:{loc}" for loc in written]
        for target in targets:
            store.delete_stale_chunks(target.collection, inp.tenant, ref.asset_id, keep)
        return self._ingested(ref, len(written), notes)

    def _flush_groups(
        self,
        encoders: list[ClipEncoder],
        sandbox: DecoderSandbox,
        path: Path,
        mime: str,
        cursor: dict[str, Any] | None,
        on_idle: Callable[[], None],
    ) -> Generator[tuple[list[Step], list[Any]], None, None]:
        """Decoded steps with their pixels preprocessed for each encoder (per image chunk, one
        tensor per encoder), grouped for one forward pass.

        A reader thread pulls steps from the sandbox and preprocesses them while the caller
        encodes and writes the previous group; a group closes at ``batch_size`` chunks or
        ``FLUSH_EVERY_S`` seconds, whichever comes first, so progress is saved regularly
        even when keyframes are sparse.
        """
        s = self.settings
        time_limit = s.decode_time_limit_s + ocr_allowance_s(self.limits)
        steps = sandbox.stream(str(path), mime, self.limits, cursor, time_limit)

        def prepare(step: Step) -> tuple[Step, list[list[Any]]]:
            images = [c.image for c in step.chunks if c.image is not None]
            return step, [[enc.preprocess(image) for enc in encoders] for image in images]

        group: list[Step] = []
        pixels: list[Any] = []
        started = time.monotonic()
        prefetched = _prefetch(self._stream_pool, steps, prepare, sandbox, on_idle)
        with contextlib.closing(prefetched) as items:
            for step, step_pixels in items:
                if not group:
                    started = time.monotonic()
                group.append(step)
                pixels.extend(step_pixels)
                size = sum(len(st.chunks) for st in group)
                if size >= max(1, s.batch_size) or time.monotonic() - started >= FLUSH_EVERY_S:
                    yield group, pixels
                    group, pixels = [], []
        if group:
            yield group, pixels

    def _encode_chunks(
        self, enc: ClipEncoder, chunks: list[MediaChunk], pixels: list[Any]
    ) -> np.ndarray:
        """Image chunks through the image tower, text chunks through the text tower."""
        out = np.zeros((len(chunks), enc.dim), dtype=np.float32)
        image_rows = [i for i, c in enumerate(chunks) if c.image is not None]
        text_rows = [i for i, c in enumerate(chunks) if c.image is None]
        with self.models.lock:
            started = time.perf_counter()
            if image_rows:
                out[image_rows] = enc.encode_images(pixels)
            if text_rows:
                out[text_rows] = enc.encode_texts([chunks[i].text for i in text_rows])
            metrics.observe("clip_seconds", time.perf_counter() - started)
        return out

    @contextmanager
    def _local_copy(self, ref: ObjectRef, roots: TenantRoots) -> Iterator[Path]:
        """A file the decoder child can open: the file itself, or a spooled copy of an object.

        Sizes are checked again here: the object may have grown since it was listed.
        """
        limit, setting = self.limits.max_bytes_for(ref.media_type)
        too_large = BadMediaError(
            f"file too large: more than {limit} bytes for {ref.media_type} ({setting}); "
            "shrink or split it, or raise the limit"
        )
        if ref.uri.startswith("file://"):
            path = roots.confine_path(ref.uri)  # resolved: the child opens what was checked
            try:
                fd = open_regular_file(path)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
                raise ObjectMissingError(f"{ref.uri}: no such file") from e
            except OSError as e:
                raise NotARegularFileError(f"{ref.uri}: not a regular file") from e
            with os.fdopen(fd, "rb") as f:
                size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise too_large
            yield path
            return
        data = store_for(ref.uri, roots).read(ref.uri, limit, ref.generation)
        if len(data) > limit:
            raise too_large
        prefix = f"mmrag-media-{ref.asset_id[:16]}-"
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=Path(ref.uri).suffix[:8])
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            del data
            yield Path(name)
        finally:
            Path(name).unlink(missing_ok=True)


def _heartbeat(details: dict[str, Any]) -> None:
    if activity.in_activity():
        activity.heartbeat(details)


_END = object()


def _prefetch(
    pool: ThreadPoolExecutor,
    steps: Iterator[Step],
    prepare: Callable[[Step], Any],
    sandbox: DecoderSandbox,
    on_idle: Callable[[], None],
) -> Generator[Any, None, None]:
    """``prepare(step)`` for each step, computed on a pool thread a few ahead of the consumer.

    The consumer heartbeats (``on_idle``) while it waits, so a slow decode never looks like
    a dead worker. If the consumer stops early (an error while writing), the decoder child
    is killed so the reader thread unblocks at once, and the thread is joined before the
    sandbox goes back to its pool.
    """
    buffer: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=PREFETCH_STEPS)
    stop = threading.Event()

    def put(kind: str, value: Any) -> bool:
        while not stop.is_set():
            try:
                buffer.put((kind, value), timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for step in steps:
                if not put("item", prepare(step)):
                    return
            put("end", _END)
        except BaseException as e:  # handed to the consumer, which re-raises it
            put("error", e)
        finally:
            close = getattr(steps, "close", None)
            if close is not None:
                close()  # an unfinished decode: the sandbox kills its child

    future = pool.submit(produce)
    finished = False
    try:
        while True:
            try:
                kind, value = buffer.get(timeout=IDLE_HEARTBEAT_S)
            except queue.Empty:
                on_idle()
                continue
            if kind == "item":
                yield value
            elif kind == "end":
                finished = True
                return
            else:
                finished = True
                raise value
    finally:
        if not finished:
            stop.set()
            sandbox.interrupt()
        future.result()
