"""What a media file is and what decoding it yields: the supported types, sniffed from the
bytes (never the name or the declared content type, which are only *noted*, see
:func:`type_note`); the cheap check an ingest runs before anything is decoded
(:func:`check_object`); the bounds a hostile file runs into (:class:`MediaLimits`); the
decoded output (:class:`Step`, :class:`MediaChunk`); and the text clean-up every decoder
applies. Every failure is a ``BadMediaError`` whose message says what is wrong with the
file and what to do, so the asset fails alone, non-retryably.

One module of ~450 lines because the type tables, the sniffer and the messages that name
them change together."""

from __future__ import annotations

import math
import os
import re
import unicodedata
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse

from PIL import Image, features

from activities.runtime.errors import UnreadableObjectError
from workflows.contracts import IMAGE_MEDIA_TYPES, PDF_MEDIA_TYPES, VIDEO_MEDIA_TYPES

# -- types ---------------------------------------------------------------------------------
# Named here, written once in the contracts (what an Ask may filter on is what this sniffs).
JPEG, PNG, GIF, BMP, TIFF, WEBP, AVIF = IMAGE_MEDIA_TYPES
(PDF,) = PDF_MEDIA_TYPES
MP4, QUICKTIME, WEBM, MATROSKA, AVI = VIDEO_MEDIA_TYPES

# AVIF decodes only where Pillow was built with libavif (the official wheels are).
IMAGE_TYPES = frozenset(
    {JPEG, PNG, GIF, BMP, TIFF, WEBP} | ({AVIF} if features.check("avif") else set())
)
PDF_TYPES = frozenset({PDF})
VIDEO_TYPES = frozenset({MP4, QUICKTIME, WEBM, MATROSKA, AVI})
SUPPORTED_TYPES = IMAGE_TYPES | PDF_TYPES | VIDEO_TYPES

# Pillow plugin per image type: a file sniffed as PNG is only ever parsed by the PNG plugin.
PIL_FORMATS: dict[str, list[str]] = {
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


class BadMediaError(UnreadableObjectError):
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
    # Text of pages, images and frames (activities/media/passages.py, activities/media/ocr.py).
    passage_tokens: int = 60
    passage_overlap_tokens: int = 15
    ocr_enabled: bool = True
    ocr_languages: str = "eng"
    ocr_min_text_chars: int = 40
    ocr_max_side: int = 2000
    ocr_time_budget_s: float = 120.0
    ocr_page_timeout_s: float = 10.0

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

    ``locator`` is the chunk's stable name inside its asset ("image", "page:3", a page's
    passage "page:3:p:2", "frame:12.500"; "page:3:text" in indexes built before passages);
    the vector's primary key is ``<asset_id>:<locator>``.
    """

    locator: str
    image: Image.Image | None = None
    text: str = ""  # embedded with the text tower when ``image`` is None
    snippet: str = ""  # what a search result shows and the LLM reads
    # Where the words came from: TEXT_LAYER (a PDF's own text), OCR, or "" (no words).
    origin: str = ""


TEXT_LAYER, OCR = "text-layer", "ocr"


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


# What a decoder reads: the bytes, or the path of a local copy.
MediaInput = bytes | str | os.PathLike[str]


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


def read_file(path: str | os.PathLike[str], max_bytes: int) -> bytes:
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
