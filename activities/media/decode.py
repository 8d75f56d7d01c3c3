"""The decoder entry point: a file of a sniffed type turned into *steps* (one image, one PDF
page with its text, or one video keyframe), each with a JSON cursor from which decoding
resumes. Only ``BadMediaError`` ever comes out of it (tests/test_decoder_fuzz.py checks
this with generated hostile inputs). In the worker it runs inside the decoder sandbox
(:mod:`activities.media.sandbox`), never in the worker process itself."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from PIL import Image

from activities.media.formats import (
    IMAGE_TYPES,
    OCR,
    PDF_TYPES,
    SUPPORTED_WORDS,
    VIDEO_TYPES,
    BadMediaError,
    MediaChunk,
    MediaInput,
    MediaLimits,
    Step,
    read_file,
)
from activities.media.images import decode_image
from activities.media.ocr import budget_for, read_if_text


def iter_steps(
    source: MediaInput, mime: str, limits: MediaLimits, cursor: dict[str, Any] | None = None
) -> Iterator[Step]:
    """Decode ``source`` (bytes or a file path) of sniffed type ``mime`` into steps.

    ``cursor`` is a step's cursor from an earlier, interrupted run: decoding resumes right
    after that step. Raises only ``BadMediaError``, whatever the input.
    """
    try:
        if mime in IMAGE_TYPES:
            yield from _image_steps(source, mime, limits)
        elif mime in PDF_TYPES:
            from activities.media.pdf import iter_pdf

            yield from iter_pdf(source, limits, cursor or {})
        elif mime in VIDEO_TYPES:
            from activities.media.video import iter_video

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


def decode_all(source: MediaInput, mime: str, limits: MediaLimits) -> list[MediaChunk]:
    """Every chunk of a source, in order: for tests and small one-off decodes."""
    return [chunk for step in iter_steps(source, mime, limits) for chunk in step.chunks]


def _image_steps(source: MediaInput, mime: str, limits: MediaLimits) -> Iterator[Step]:
    data = source if isinstance(source, bytes) else read_file(source, limits.max_object_bytes)
    image = decode_image(
        data, limits.max_object_bytes, limits.max_image_pixels, mime, limits.render_max_side
    )
    budget = budget_for(limits)

    def full() -> Image.Image:
        # The original when it was small enough to be decoded whole, else again at OCR size.
        if max(image.size) < limits.render_max_side:
            return image
        side = max(limits.ocr_max_side, limits.render_max_side)
        return decode_image(data, limits.max_object_bytes, limits.max_image_pixels, mime, side)

    text = read_if_text(image, full, budget, "the image")
    chunk = MediaChunk("image", image=image, snippet=text, origin=OCR if text else "")
    yield Step([chunk], {"done": True}, note=budget.take_note())
