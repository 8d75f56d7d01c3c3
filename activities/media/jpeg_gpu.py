"""JPEGs decoded on the encoder's GPU (nvJPEG, through torchvision's batched ``decode_jpeg``),
so that CPU decoding stops bounding ingest on a GPU worker (docs/media.md, "GPU JPEG
decoding").

Every other file, and every JPEG this module does not take, is decoded in the decoder
sandbox (:mod:`activities.media.sandbox`) as before. What reaches the GPU decoder is
narrowed first by :func:`plain_jpeg_header`, a walk over the JPEG's marker segments in
pure Python (no native decoder touches the bytes in the worker): a baseline or progressive
8-bit JPEG with 1 or 3 components, within ``MMRAG_MAX_OBJECT_BYTES`` and
``MMRAG_MAX_IMAGE_PIXELS``, ending with its end-of-image marker, with at most
:data:`MAX_SCANS` scans and an EXIF orientation this module applies itself. Anything else
(CMYK, 12-bit, arithmetic-coded, lossless, truncated, a decompression bomb, a scan bomb, a
malformed segment) returns ``None`` and takes the sandbox, which decodes it or refuses it
with its usual reason. A JPEG the GPU decoder fails on takes the sandbox too; so does one
that may show text while OCR is on (the sandbox reads its words).

Decodes from many decode threads are gathered into one batched call (:class:`_Batcher`):
while the GPU decodes one batch, the next queues up.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from activities.media.formats import MediaLimits
from activities.media.images import fit_within
from activities.media.ocr import text_likely

log = logging.getLogger(__name__)

MAX_SCANS = 16  # a progressive JPEG has ~10; the sandbox times out scan bombs, the GPU cannot
SOF_GPU = {0xC0: False, 0xC1: False, 0xC2: True}  # frame markers nvJPEG takes -> progressive
# Other frame markers: lossless (C3), differential (C5-C7), arithmetic coding (C9-CF);
# C4 (Huffman tables), C8 (reserved) and CC (arithmetic conditioning) are not frames.
SOF_OTHER = set(range(0xC3, 0xD0)) - {0xC4, 0xC8, 0xCC}
EXIF = b"Exif\x00\x00"
XMP = b"http://ns.adobe.com/xap/1.0/\x00"
ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class JpegHeader:
    width: int
    height: int
    components: int
    progressive: bool
    orientation: int  # EXIF orientation 1-8; 1 when absent


def plain_jpeg_header(data: bytes, max_bytes: int, max_pixels: int) -> JpegHeader | None:
    """The header of a JPEG the GPU may decode, or ``None``: then the sandbox decodes or
    refuses it. Reads only marker segments before the first scan; never raises."""
    if not 4 <= len(data) <= max_bytes or not data.startswith(b"\xff\xd8"):
        return None
    # Entropy-coded data escapes every 0xFF (FF 00) and has no FF DA, so this counts scans
    # (and any in an embedded thumbnail: an over-count only sends a JPEG to the sandbox).
    if not data.endswith(b"\xff\xd9") or data.count(b"\xff\xda") > MAX_SCANS:
        return None
    pos, orientation, exif_seen = 2, 1, False
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7 or marker in (0xD9, 0xDA):
            return None  # a standalone marker, or a scan / the end before any frame header
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2 or pos + 2 + length > len(data):
            return None
        segment = data[pos + 4 : pos + 2 + length]
        if marker == 0xE1 and segment.startswith(EXIF) and not exif_seen:
            exif_seen = True  # Pillow reads the first EXIF segment only
            found = _exif_orientation(segment[len(EXIF) :])
            if found is None:
                return None
            orientation = found
        elif marker == 0xE1 and segment.startswith(XMP) and b"Orientation" in segment:
            return None  # Pillow may take an XMP orientation: leave that to it
        elif marker in SOF_GPU:
            if len(segment) < 6:
                return None
            precision, components = segment[0], segment[5]
            height = int.from_bytes(segment[1:3], "big")
            width = int.from_bytes(segment[3:5], "big")
            if precision != 8 or components not in (1, 3) or len(segment) < 6 + 3 * components:
                return None
            if not width or not height or width * height > max_pixels:
                return None
            return JpegHeader(width, height, components, SOF_GPU[marker], orientation)
        elif marker in SOF_OTHER:
            return None
        pos += 2 + length
    return None


def _exif_orientation(tiff: bytes) -> int | None:
    """IFD0's orientation (1 when absent or out of range, as Pillow treats it), or ``None``
    for a TIFF structure this walk cannot follow."""
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return None

    def number(at: int, size: int) -> int:
        return int.from_bytes(tiff[at : at + size], order)  # type: ignore[arg-type]

    ifd = number(4, 4)
    if ifd + 2 > len(tiff):
        return None
    entries = number(ifd, 2)
    if ifd + 2 + 12 * entries > len(tiff):
        return None
    for i in range(entries):
        at = ifd + 2 + 12 * i
        if number(at, 2) == ORIENTATION_TAG:
            value = number(at + 8, 2) if number(at + 2, 2) == 3 else 0  # SHORT
            return value if 1 <= value <= 8 else 1
    return 1


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation to a (C, H, W) tensor as ``ImageOps.exif_transpose``
    does to a picture."""
    h, w = -2, -1
    if orientation == 2:
        return image.flip(w)
    if orientation == 3:
        return image.flip(h, w)
    if orientation == 4:
        return image.flip(h)
    if orientation == 5:  # transpose
        return image.transpose(h, w)
    if orientation == 6:  # rotate 90 degrees clockwise
        return image.transpose(h, w).flip(w)
    if orientation == 7:  # transverse
        return image.transpose(h, w).flip(h, w)
    if orientation == 8:  # rotate 90 degrees counter-clockwise
        return image.transpose(h, w).flip(h)
    return image


def shrink(image: torch.Tensor, max_side: int) -> torch.Tensor:
    """Fit within ``max_side`` (never enlarge), antialiased, as the sandbox's decode does
    (MMRAG_RENDER_MAX_SIDE): CLIP sees 224 px either way."""
    height, width = image.shape[-2:]
    if not max_side or max(height, width) <= max_side:
        return image
    new_w, new_h = fit_within(width, height, max_side)
    resized = torch.nn.functional.interpolate(
        image.unsqueeze(0).float(), size=(new_h, new_w), mode="bilinear", antialias=True
    )
    return resized.squeeze(0).round_().clamp_(0, 255).to(torch.uint8)


def shows_text(image: torch.Tensor) -> bool:
    """:func:`activities.media.ocr.text_likely` on a decoded (3, H, W) uint8 tensor: its
    greyscale copy (Pillow's luma weights) comes back to the CPU, at most 640 px."""
    weights = torch.tensor([0.299, 0.587, 0.114], device=image.device).view(3, 1, 1)
    grey = (image.float() * weights).sum(0).round_().clamp_(0, 255).to(torch.uint8)
    return text_likely(Image.fromarray(grey.cpu().numpy(), "L"))


def decoder_for(setting: str, device: torch.device) -> GpuJpegDecoder | None:
    """The encode worker's GPU JPEG decoder for MMRAG_GPU_JPEG_DECODE (auto | on | off) and
    the encoder's device, or ``None``: every image then goes to the sandbox."""
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        raise ValueError(
            f"MMRAG_GPU_JPEG_DECODE=on needs the encoder on a CUDA device, and it runs on "
            f"{device}; set MMRAG_DEVICE=cuda on a GPU worker, or MMRAG_GPU_JPEG_DECODE=auto"
        )
    return GpuJpegDecoder(device)


class GpuJpegDecoder:
    """Batched JPEG decoding on ``device``, for the encode worker's decode threads.

    ``device`` "cpu" runs the same code with libjpeg in this process: for tests and the
    bench's comparison only; a worker uses this class only with a CUDA encoder
    (MMRAG_GPU_JPEG_DECODE), never to decode hostile files unsandboxed on its CPU.
    """

    def __init__(self, device: torch.device | str, max_batch: int = 128) -> None:
        self.device = torch.device(device)
        self._batcher = _Batcher(self.decode_many, max_batch)

    def decode_many(self, datas: Sequence[bytes]) -> list[torch.Tensor | None]:
        """One batched ``decode_jpeg`` call: RGB uint8 (3, H, W) tensors on the device, or
        ``None`` for each JPEG the decoder fails on (the batch is retried one by one to
        find them)."""
        tensors = [torch.from_numpy(np.frombuffer(d, dtype=np.uint8).copy()) for d in datas]
        try:
            return list(self._decode(tensors))
        except RuntimeError:  # one bad file fails the whole batch: find it
            out: list[torch.Tensor | None] = []
            for tensor in tensors:
                try:
                    out.append(self._decode([tensor])[0])
                except RuntimeError:
                    out.append(None)
            return out

    def _decode(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        images = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device)
        return images if isinstance(images, list) else [images]

    def load(self, data: bytes, limits: MediaLimits) -> torch.Tensor | None:
        """``data`` decoded on the device, upright and fitted within
        ``limits.render_max_side`` as the sandbox returns an image, or ``None`` when the
        sandbox must decode it: not a plain JPEG within the limits
        (:func:`plain_jpeg_header`), the GPU decoder failed on it, or, with OCR on, it may
        show text (the sandbox decodes it again and reads the words). Blocks until the
        batch holding it is decoded; safe from many threads."""
        header = plain_jpeg_header(data, limits.max_object_bytes, limits.max_image_pixels)
        if header is None:
            return None
        try:
            image = self._batcher.decode(data)
        except Exception as e:  # the device itself failed (not the file): the sandbox decodes
            log.warning("GPU JPEG decode failed (%s: %s); decoding on the CPU", type(e).__name__, e)
            return None
        if image is None or tuple(image.shape) != (3, header.height, header.width):
            return None  # failed, or decoded to another size than its header declares
        image = shrink(orient(image, header.orientation), limits.render_max_side)
        if limits.ocr_enabled and shows_text(image):
            return None
        return image


class _Batcher:
    """Gathers single decodes from many threads into batched calls, on one thread of its
    own: while one batch decodes, the next queues up (no waiting window)."""

    def __init__(
        self, decode_many: Callable[[Sequence[bytes]], list[torch.Tensor | None]], max_batch: int
    ) -> None:
        self._decode_many = decode_many
        self._max_batch = max(1, max_batch)
        self._queue: queue.SimpleQueue[tuple[bytes, Future[torch.Tensor | None]]] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def decode(self, data: bytes) -> torch.Tensor | None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="jpeg-gpu-decode", daemon=True
                )
                self._thread.start()
        future: Future[torch.Tensor | None] = Future()
        self._queue.put((data, future))
        return future.result()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < self._max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                results = self._decode_many([data for data, _ in batch])
            except BaseException as e:  # noqa: BLE001 - never leave a decode thread waiting
                for _, future in batch:
                    future.set_exception(e)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                future.set_result(result)
