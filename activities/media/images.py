"""Images: the checks that need no decoder (:func:`image_type`), decoding within the pixel
and byte bounds (:func:`decode_image`), and the RGB / square / fitted forms the encoder
takes."""

from __future__ import annotations

import io
import re
import warnings

from PIL import Image, ImageOps

from activities.media.formats import (
    HEAD_BYTES,
    IMAGE_TYPES,
    JPEG,
    PIL_FORMATS,
    SUPPORTED_WORDS,
    BadMediaError,
    sniff,
)


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
            image = Image.open(io.BytesIO(data), formats=PIL_FORMATS[mime])
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
