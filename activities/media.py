"""Sniff, validate and decode media: images, PDF pages and video keyframes.

The content type is decided from the bytes, never the file name or the object's declared
content type (a mismatch is only *noted*, see :func:`type_note`). Every failure raises
``BadMediaError`` with a message that says what is wrong with the file and what to do, so
the asset fails alone, non-retryably, and the user can fix or remove it.

Two entry points:

- :func:`check_object`: the cheap check on the ``mmrag`` queue (first bytes + size only);
- :func:`iter_steps`: the decoder. It turns a source (bytes or a file path) of a sniffed type
  into *steps*: one image, one PDF page (its rendering and, when the page has text, a text
  chunk) or one video keyframe, each with a JSON *cursor* from which decoding can resume.
  Only ``BadMediaError`` ever comes out of it (``tests/test_decoder_fuzz.py`` checks this
  with generated hostile inputs). In the worker, every file (images, Ask's query images,
  PDFs and videos) is decoded by this same function inside a sandboxed child process
  (``activities/sandbox.py``) with hard time, CPU, memory and file limits, no secrets and,
  where the kernel allows, no network.
"""

from __future__ import annotations

import io
import math
import os
import re
import unicodedata
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse

from PIL import Image, ImageOps, features

# -- types ---------------------------------------------------------------------------------
JPEG, PNG, GIF, BMP, TIFF, WEBP, AVIF = (
    "image/jpeg",
    "image/png",
    "image/gif",
    "image/bmp",
    "image/tiff",
    "image/webp",
    "image/avif",
)
PDF = "application/pdf"
MP4, QUICKTIME, WEBM, MATROSKA, AVI = (
    "video/mp4",
    "video/quicktime",
    "video/webm",
    "video/x-matroska",
    "video/x-msvideo",
)

# AVIF decodes only where Pillow was built with libavif (the official wheels are).
IMAGE_TYPES = frozenset(
    {JPEG, PNG, GIF, BMP, TIFF, WEBP} | ({AVIF} if features.check("avif") else set())
)
PDF_TYPES = frozenset({PDF})
VIDEO_TYPES = frozenset({MP4, QUICKTIME, WEBM, MATROSKA, AVI})
SUPPORTED_TYPES = IMAGE_TYPES | PDF_TYPES | VIDEO_TYPES

# Pillow plugin per image type: a file sniffed as PNG is only ever parsed by the PNG plugin.
_PIL_FORMATS: dict[str, list[str]] = {
    JPEG: ["JPEG"],
    PNG: ["PNG"],
    GIF: ["GIF"],
    BMP: ["BMP"],
    TIFF: ["TIFF"],
    WEBP: ["WEBP"],
    AVIF: ["AVIF"],
}

HEAD_BYTES = 1024  # enough for every signature below (a PDF header may start up to byte 1023)

SUPPORTED_WORDS = (
    "images (JPEG, PNG, WebP, GIF, BMP, TIFF"
    + (", AVIF" if AVIF in IMAGE_TYPES else "")
    + "), PDFs and videos (MP4, MOV, WebM, MKV, AVI)"
)


class BadMediaError(Exception):
    """The object's content cannot be ingested; the message says why (non-retryable)."""


# -- bounds --------------------------------------------------------------------------------
@dataclass(frozen=True)
class MediaLimits:
    """Every bound a hostile file runs into; see the settings of the same names.

    Kept as a plain dataclass (not the settings object) because it crosses into the decoder
    sandbox as JSON and because tests build it directly.
    """

    max_object_bytes: int = 50 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    render_max_side: int = 512
    pdf_max_pages: int = 500
    video_max_bytes: int = 1024 * 1024 * 1024
    video_max_seconds: float = 3600.0
    video_frame_interval_s: float = 5.0
    video_scene_threshold: float = 0.2
    video_max_frames: int = 200

    @classmethod
    def from_settings(cls, settings: Any) -> MediaLimits:
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MediaLimits:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def max_bytes_for(self, mime: str) -> tuple[int, str]:
        """The size limit of a type and the setting that holds it."""
        if mime in VIDEO_TYPES:
            return self.video_max_bytes, "MMRAG_VIDEO_MAX_BYTES"
        return self.max_object_bytes, "MMRAG_MAX_OBJECT_BYTES"


# -- decoded output ------------------------------------------------------------------------
@dataclass
class MediaChunk:
    """One vector-to-be: an image for the CLIP image tower, or text for the text tower.

    ``locator`` is the chunk's stable name inside its asset ("image", "page:3",
    "page:3:text", "frame:12.500"); the vector's primary key is ``<asset_id>:<locator>``.
    """

    locator: str
    image: Image.Image | None = None
    text: str = ""  # embedded with the text tower when ``image`` is None
    snippet: str = ""  # what a search result shows and the LLM reads


@dataclass
class Step:
    """A unit of decoding progress; ``cursor`` resumes decoding right after it."""

    chunks: list[MediaChunk]
    cursor: dict[str, Any] = field(default_factory=dict)
    note: str = ""  # e.g. "capped at 200 frames": surfaced in the asset's outcome


# -- sniffing ------------------------------------------------------------------------------
_SIGNATURES: list[tuple[bytes, str]] = [
    (b"\xff\xd8\xff", JPEG),
    (b"\x89PNG\r\n\x1a\n", PNG),
    (b"GIF87a", GIF),
    (b"GIF89a", GIF),
    (b"II*\x00", TIFF),
    (b"MM\x00*", TIFF),
    (b"II+\x00", TIFF),  # BigTIFF
    (b"MM\x00+", TIFF),
]
# Recognised only so that the rejection can name what the file is.
_UNSUPPORTED_SIGNATURES: list[tuple[bytes, str]] = [
    (b"PK\x03\x04", "application/zip"),
    (b"\x1f\x8b", "application/gzip"),
    (b"7z\xbc\xaf\x27\x1c", "application/x-7z-compressed"),
    (b"Rar!", "application/vnd.rar"),
    (b"ID3", "audio/mpeg"),
    (b"OggS", "application/ogg"),
    (b"fLaC", "audio/flac"),
    (b"\x7fELF", "application/x-executable"),
    (b"8BPS", "image/vnd.adobe.photoshop"),
    (b"\x00\x00\x01\x00", "image/x-icon"),
    (b"\x00\x00\x00\x0cjP  ", "image/jp2"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "application/x-ole-storage"),
]
_BMP_DIB_SIZES = {12, 16, 40, 52, 56, 64, 108, 124}
_QUICKTIME_ATOMS = {b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"}
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}
_AUDIO_BRANDS = {b"M4A ", b"M4B ", b"M4P ", b"F4A ", b"F4B "}


def sniff(head: bytes) -> str:
    """The media type from the first bytes of an object, or "" when unknown.

    Also names common *unsupported* types (zip, audio, HEIC, text...) so that the reason a
    file is refused is precise; :data:`SUPPORTED_TYPES` says which results are ingestible.
    """
    for magic, mime in _SIGNATURES:
        if head.startswith(magic):
            return mime
    if head[:2] == b"BM" and int.from_bytes(head[14:18], "little") in _BMP_DIB_SIZES:
        return BMP
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return WEBP
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return AVI
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "audio/wav"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return AVIF
        if brand in _HEIF_BRANDS:
            return "image/heic"
        if brand in _AUDIO_BRANDS:
            return "audio/mp4"
        if brand == b"qt  ":
            return QUICKTIME
        return MP4
    if head[4:8] in _QUICKTIME_ATOMS:
        return QUICKTIME
    if head[:4] == b"\x1a\x45\xdf\xa3":  # EBML: the DocType tells WebM from Matroska
        return WEBM if b"webm" in head[:HEAD_BYTES] else MATROSKA
    if b"%PDF-" in head[:HEAD_BYTES]:  # PDF readers accept a header anywhere in the first KB
        return PDF
    for magic, mime in _UNSUPPORTED_SIGNATURES:
        if head.startswith(magic):
            return mime
    stripped = head.lstrip().lower()
    if stripped.startswith((b"<svg", b"<?xml")) and b"<svg" in stripped:
        return "image/svg+xml"
    if _looks_like_text(head):
        return "text/plain"
    return ""


def _looks_like_text(head: bytes) -> bool:
    if not head or b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # not just a character cut off by the head boundary
            return False
    return True


# What to do about recognised-but-unsupported types: the useful half of the message.
_UNSUPPORTED_HINTS: dict[str, str] = {
    "image/heic": "convert HEIC photos to JPEG (e.g. `heif-convert` or an export from Photos)",
    "image/avif": "convert it to JPEG or PNG (this worker's Pillow lacks AVIF support)",
    "image/svg+xml": "rasterise SVG drawings to PNG",
    "audio/mpeg": "audio is not indexed",
    "audio/mp4": "audio is not indexed",
    "audio/wav": "audio is not indexed",
    "audio/flac": "audio is not indexed",
    "application/ogg": "Ogg files are not indexed; re-encode video as MP4 or WebM",
    "application/zip": "unpack archives and ingest the files inside",
    "application/gzip": "unpack archives and ingest the files inside",
    "application/x-7z-compressed": "unpack archives and ingest the files inside",
    "application/vnd.rar": "unpack archives and ingest the files inside",
}


def check_object(
    head: bytes,
    size: int,
    max_bytes: int,
    *,
    limits: MediaLimits | None = None,
    uri: str = "",
    content_type: str = "",
) -> str:
    """Cheap checks before any decoding; returns the sniffed media type or raises.

    ``max_bytes`` bounds images and PDFs; videos are bounded by ``limits.video_max_bytes``
    (from the settings when ``limits`` is not given). When ``uri`` / ``content_type`` are
    given, a failure reason also says how the name or declared type disagrees with the bytes.
    """
    if size == 0:
        raise BadMediaError("empty file (0 bytes): the upload or copy did not complete")
    mime = sniff(head)
    note = type_note(uri, content_type, mime)
    suffix = f" ({note})" if note else ""
    if not mime or mime == "text/plain":
        what = "look like plain text, not" if mime else "are not"
        raise BadMediaError(
            f"unrecognised content: the bytes {what} a supported type; mmrag ingests "
            f"{SUPPORTED_WORDS}{suffix}"
        )
    if mime not in SUPPORTED_TYPES:
        hint = _UNSUPPORTED_HINTS.get(mime, f"mmrag ingests {SUPPORTED_WORDS}")
        raise BadMediaError(f"unsupported media type {mime}: {hint}{suffix}")
    if mime in VIDEO_TYPES:
        if limits is None:
            from settings import get_settings

            limits = MediaLimits.from_settings(get_settings())
        limit, setting = limits.max_bytes_for(mime)
    else:
        limit, setting = max_bytes, "MMRAG_MAX_OBJECT_BYTES"
    if size > limit:
        raise BadMediaError(
            f"file too large: {size} bytes exceeds the {limit}-byte limit for {mime} "
            f"({setting}); shrink or split it, or raise the limit"
        )
    return mime


# -- declared vs sniffed type --------------------------------------------------------------
_EXTENSION_TYPES: dict[str, str] = {
    ".jpg": JPEG,
    ".jpeg": JPEG,
    ".jpe": JPEG,
    ".jfif": JPEG,
    ".png": PNG,
    ".gif": GIF,
    ".bmp": BMP,
    ".dib": BMP,
    ".tif": TIFF,
    ".tiff": TIFF,
    ".webp": WEBP,
    ".avif": AVIF,
    ".heic": "image/heic",
    ".heif": "image/heic",
    ".svg": "image/svg+xml",
    ".pdf": PDF,
    ".mp4": MP4,
    ".m4v": MP4,
    ".mov": QUICKTIME,
    ".qt": QUICKTIME,
    ".webm": WEBM,
    ".mkv": MATROSKA,
    ".avi": AVI,
    ".txt": "text/plain",
}
_TYPE_ALIASES: dict[str, str] = {
    "image/jpg": JPEG,
    "image/pjpeg": JPEG,
    "image/x-png": PNG,
    "image/x-ms-bmp": BMP,
    "image/x-bmp": BMP,
    "application/x-pdf": PDF,
    "video/x-m4v": MP4,
    "video/avi": AVI,
    "video/msvideo": AVI,
    "image/heif": "image/heic",
}
# Container families: a .mov that is really an MP4 (or .mkv that is WebM) is no surprise.
_FAMILIES: dict[str, str] = {QUICKTIME: MP4, MATROSKA: WEBM}
_GENERIC_TYPES = {"", "application/octet-stream", "binary/octet-stream", "application/unknown"}


def _family(mime: str) -> str:
    mime = _TYPE_ALIASES.get(mime, mime)
    return _FAMILIES.get(mime, mime)


def type_note(uri: str, content_type: str, sniffed: str) -> str:
    """Words for the audit trail when the name or declared type disagrees with the bytes.

    "" when they agree or nothing was declared. The bytes always win; the note exists so
    an operator can find mislabelled objects (and upstream bugs that mislabel them).
    """
    actual = sniffed or "unrecognised"
    said: list[str] = []
    path = unquote(urlparse(uri).path) if "://" in uri else uri
    ext = PurePosixPath(path).suffix.lower()
    if ext in _EXTENSION_TYPES and _family(_EXTENSION_TYPES[ext]) != _family(sniffed):
        said.append(f"the name ends in {ext}")
    declared = content_type.split(";")[0].strip().lower()
    if declared not in _GENERIC_TYPES and _family(declared) != _family(sniffed):
        said.append(f"the object's content type is {declared}")
    if not said:
        return ""
    return f"{' and '.join(said)} but the bytes are {actual}; the bytes decide"


# -- images --------------------------------------------------------------------------------
def image_type(data: bytes, max_bytes: int, mime: str = "") -> str:
    """The image type of ``data`` (sniffed when ``mime`` is empty), or ``BadMediaError``:
    the checks that need no decoder, so a worker refuses such bytes before it hands them
    to one."""
    if len(data) == 0:
        raise BadMediaError("empty file (0 bytes): the upload or copy did not complete")
    if len(data) > max_bytes:
        raise BadMediaError(
            f"file too large: more than {max_bytes} bytes (MMRAG_MAX_OBJECT_BYTES); shrink it "
            "or raise the limit"
        )
    mime = mime or sniff(data[:HEAD_BYTES])
    if mime not in IMAGE_TYPES:
        raise BadMediaError(
            f"not an image: the bytes are {mime or 'unrecognised'}; mmrag decodes {SUPPORTED_WORDS}"
        )
    return mime


def decode_image(
    data: bytes, max_bytes: int, max_pixels: int, mime: str = "", max_side: int = 0
) -> Image.Image:
    """Decode and fully load an image as RGB, refusing bombs before allocating pixels.

    ``mime`` (sniffed when empty) picks the only Pillow plugin allowed to parse the bytes.
    ``max_side`` > 0 shrinks large images right after decoding (JPEGs already while
    decoding, via DCT scaling): CLIP sees 224 px, and resizing a 40 Mpx photo with the
    preprocessor's bicubic filter costs more than the model does.
    """
    mime = image_type(data, max_bytes, mime)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=_PIL_FORMATS[mime])
            width, height = image.size
            if width <= 0 or height <= 0:
                raise BadMediaError(f"corrupt image: it declares a {width}x{height} size")
            if width * height > max_pixels:
                raise BadMediaError(
                    f"image dimensions {width}x{height} exceed the {max_pixels}-pixel limit "
                    "(decompression bomb guard, MMRAG_MAX_IMAGE_PIXELS); downscale it or "
                    "raise the limit"
                )
            if max_side and mime == JPEG:
                image.draft(image.mode, (max_side, max_side))
            # Animated GIF/WebP and multi-page TIFF open on their first frame: that one is
            # indexed (counting frames would read the whole file).
            image.load()
            rgb = to_rgb(image)
            if max_side and max(rgb.size) > max_side:
                rgb.thumbnail((max_side, max_side), Image.Resampling.BILINEAR, reducing_gap=2.0)
            return rgb
    except BadMediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow's own, higher guard fired while parsing the header.
        declared = re.search(r"\((\d+) pixels\)", str(e))
        raise BadMediaError(
            f"decompression bomb refused: the image declares "
            f"{declared.group(1) if declared else 'too many'} pixels, more than the "
            f"{max_pixels}-pixel limit (MMRAG_MAX_IMAGE_PIXELS); downscale it or raise the limit"
        ) from e
    except MemoryError as e:
        raise BadMediaError("image needs more memory to decode than this worker has") from e
    except Image.UnidentifiedImageError as e:
        raise BadMediaError(
            f"corrupt or truncated image ({mime}): its header starts like {mime} but the "
            "decoder cannot parse it; re-export or re-upload the file"
        ) from e
    except Exception as e:  # Pillow raises many types for broken files
        detail = re.sub(r" at 0x[0-9a-f]+", "", str(e))  # no memory addresses in reasons
        raise BadMediaError(
            f"corrupt or truncated image ({mime}): {type(e).__name__}: {detail}; re-export or "
            "re-upload the file"
        ) from e


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation and convert any mode (CMYK, palette, 16-bit, alpha) to RGB.

    Transparent pixels become white (what a viewer shows on a page); 16-bit and 32-bit
    greyscale are scaled to 8 bits rather than clipped to white.
    """
    image = ImageOps.exif_transpose(image) or image
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode in ("P", "L", "RGB") and "transparency" in image.info
    ):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        import numpy as np

        arr = np.asarray(image, dtype=np.float64)
        peak = float(arr.max()) if arr.size else 0.0
        if image.mode == "F" and peak <= 1.0:
            scale = 255.0  # float images in 0..1
        elif peak <= 255:
            scale = 1.0
        elif peak <= 65535:
            scale = 255.0 / 65535.0  # 16-bit range
        else:
            scale = 255.0 / peak
        grey = np.clip(arr * scale, 0, 255).astype("uint8")
        return Image.fromarray(grey, "L").convert("RGB")
    return image.convert("RGB")


def pad_square(image: Image.Image, colour: tuple[int, int, int]) -> Image.Image:
    """Pad to a square so CLIP's centre crop keeps the whole page or frame in view."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), colour)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def fit_within(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(w, h) scaled down to fit ``max_side``, never up, each at least 1 pixel."""
    scale = min(1.0, max_side / max(width, height, 1))
    return max(1, round(width * scale)), max(1, round(height * scale))


# -- text ----------------------------------------------------------------------------------
MAX_TEXT_CHARS = 8192  # page text kept per page (the snippet is cut further when stored)
_WHITESPACE = re.compile(r"\s+")


def clean_text(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    """Text a vector store and an LLM prompt can take: valid UTF-8, no control characters,
    whitespace collapsed, at most ``limit`` characters."""
    text = text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates from UTF-16
    text = "".join(
        " " if unicodedata.category(c) in ("Cc", "Cs", "Co", "Cn") else c for c in text[: limit * 2]
    )
    return _WHITESPACE.sub(" ", text).strip()[:limit]


def truncate_utf8(text: str, max_bytes: int) -> str:
    """At most ``max_bytes`` bytes of UTF-8 without splitting a character."""
    raw = text.encode("utf-8")
    if len(raw) <= max_bytes:
        return text
    return raw[:max_bytes].decode("utf-8", "ignore")


def has_words(text: str) -> bool:
    """Enough letters or digits to be worth a text vector (not a lone page number)."""
    return sum(c.isalnum() for c in text) >= 4


# -- the decoder entry point ---------------------------------------------------------------
Source = bytes | str | os.PathLike[str]


def iter_steps(
    source: Source, mime: str, limits: MediaLimits, cursor: dict[str, Any] | None = None
) -> Iterator[Step]:
    """Decode ``source`` (bytes or a file path) of sniffed type ``mime`` into steps.

    ``cursor`` is a step's cursor from an earlier, interrupted run: decoding resumes right
    after that step. Raises only ``BadMediaError``, whatever the input.
    """
    try:
        if mime in IMAGE_TYPES:
            yield from _image_steps(source, mime, limits)
        elif mime in PDF_TYPES:
            from activities.pdf import iter_pdf

            yield from iter_pdf(source, limits, cursor or {})
        elif mime in VIDEO_TYPES:
            from activities.video import iter_video

            yield from iter_video(source, mime, limits, cursor or {})
        else:
            raise BadMediaError(
                f"unsupported media type {mime or 'unrecognised'}: mmrag ingests {SUPPORTED_WORDS}"
            )
    except BadMediaError:
        raise
    except MemoryError as e:
        raise BadMediaError(
            f"{mime} needs more memory to decode than allowed (MMRAG_DECODE_MEMORY_MB)"
        ) from e
    except RecursionError as e:
        raise BadMediaError(f"malformed {mime}: structure nested too deeply") from e
    except Exception as e:  # a decoder library failing on input it did not expect
        raise BadMediaError(f"malformed {mime}: {type(e).__name__}: {e}") from e


def decode_all(source: Source, mime: str, limits: MediaLimits) -> list[MediaChunk]:
    """Every chunk of a source, in order: for tests and small one-off decodes."""
    return [chunk for step in iter_steps(source, mime, limits) for chunk in step.chunks]


def _image_steps(source: Source, mime: str, limits: MediaLimits) -> Iterator[Step]:
    data = source if isinstance(source, bytes) else _read_file(source, limits.max_object_bytes)
    image = decode_image(
        data, limits.max_object_bytes, limits.max_image_pixels, mime, limits.render_max_side
    )
    yield Step([MediaChunk("image", image=image)], {"done": True})


def _read_file(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    with Path(path).open("rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise BadMediaError(
            f"file too large: more than {max_bytes} bytes (MMRAG_MAX_OBJECT_BYTES); shrink it "
            "or raise the limit"
        )
    return data


def finite_positive(value: float) -> bool:
    return math.isfinite(value) and value > 0
