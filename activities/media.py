"""Sniff, validate and decode media.

The content type is decided from the bytes, never the file name. Every failure raises
``BadMediaError`` with a message that says what is wrong with the file, so the asset
fails alone and the user can fix or remove it.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps

# Magic numbers of the formats mmrag ingests (images today; PDF and video are recognised
# so the reason for skipping them is precise).
_SIGNATURES: list[tuple[bytes, int, str]] = [
    (b"\xff\xd8\xff", 0, "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", 0, "image/png"),
    (b"GIF87a", 0, "image/gif"),
    (b"GIF89a", 0, "image/gif"),
    (b"BM", 0, "image/bmp"),
    (b"II*\x00", 0, "image/tiff"),
    (b"MM\x00*", 0, "image/tiff"),
    (b"%PDF-", 0, "application/pdf"),
    (b"\x1a\x45\xdf\xa3", 0, "video/webm"),
]

IMAGE_TYPES = frozenset(
    {"image/jpeg", "image/png", "image/gif", "image/bmp", "image/tiff", "image/webp"}
)
HEAD_BYTES = 64  # enough for every signature above


class BadMediaError(Exception):
    """The object's content cannot be ingested; the message says why (non-retryable)."""


def sniff(head: bytes) -> str:
    """The media type from the first bytes of an object, or "" when unknown."""
    for magic, offset, mime in _SIGNATURES:
        if head[offset : offset + len(magic)] == magic:
            return mime
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[4:8] == b"ftyp":
        return "video/mp4"
    return ""


def check_object(head: bytes, size: int, max_bytes: int) -> str:
    """Cheap checks before any decoding; returns the sniffed media type or raises."""
    if size == 0:
        raise BadMediaError("empty file (0 bytes)")
    if size > max_bytes:
        raise BadMediaError(
            f"file too large: {size} bytes exceeds the {max_bytes}-byte limit "
            "(MMRAG_MAX_OBJECT_BYTES)"
        )
    mime = sniff(head)
    if not mime:
        raise BadMediaError(
            "unrecognised content: the bytes are not a JPEG, PNG, WebP, GIF, BMP or TIFF image"
        )
    if mime not in IMAGE_TYPES:
        raise BadMediaError(f"unsupported media type {mime} (only images are ingested for now)")
    return mime


def decode_image(data: bytes, max_bytes: int, max_pixels: int) -> Image.Image:
    """Decode and fully load an image as RGB, refusing bombs before allocating pixels."""
    if len(data) == 0:
        raise BadMediaError("empty file (0 bytes)")
    if len(data) > max_bytes:
        raise BadMediaError(f"file too large: more than {max_bytes} bytes (MMRAG_MAX_OBJECT_BYTES)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise BadMediaError(
                    f"image dimensions {width}x{height} exceed the {max_pixels}-pixel limit "
                    "(decompression bomb guard, MMRAG_MAX_IMAGE_PIXELS)"
                )
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)  # animated GIF/WebP/TIFF: the first frame
            image.load()
    except BadMediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadMediaError(f"decompression bomb refused: {e}") from e
    except Exception as e:  # PIL raises many types for broken files
        raise BadMediaError(f"corrupt or truncated image: {type(e).__name__}: {e}") from e
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation and convert any mode (CMYK, palette, 16-bit, alpha) to RGB."""
    image = ImageOps.exif_transpose(image) or image
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping to white.
        import numpy as np

        arr = np.asarray(image, dtype=np.float64)
        peak = arr.max() or 1.0
        return Image.fromarray((arr * (255.0 / peak)).astype("uint8"), "L").convert("RGB")
    return image.convert("RGB")
