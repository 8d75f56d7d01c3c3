"""Thumbnails of what a source points at: an image, a PDF page or a video frame.

The web app shows each retrieved chunk as a picture. The file is as hostile here as at
ingest, so it is decoded the same way, in the decoder sandbox (:mod:`activities.media.sandbox`):
this module only chooses which step of the decode holds the locator and shrinks that one
image (already decoded, plain RGB) to a JPEG thumbnail in the caller's process.

Locators are those the decoders write: ``image``; ``page:N`` (and ``page:N:...`` for the
page's text chunks, shown as the page); ``frame:T`` (seconds, three decimals). A PDF page
is reached directly (the PDF decoder resumes at a page); a video is decoded from its start
up to the frame, as at ingest, so its keyframe choice is the same.
"""

from __future__ import annotations

import dataclasses
import io
import re
from collections.abc import Generator
from dataclasses import dataclass

from activities.media.formats import (
    IMAGE_TYPES,
    PDF_TYPES,
    VIDEO_TYPES,
    BadMediaError,
    MediaLimits,
)
from activities.media.sandbox import IMAGE_TIME_SETTING, STREAM_TIME_SETTING, SandboxPool

_PAGE = re.compile(r"^page:([1-9][0-9]{0,5})(?::[A-Za-z0-9:._-]{0,64})?$")
_FRAME = re.compile(r"^frame:([0-9]{1,6}(?:\.[0-9]{1,3})?)$")
MIN_SIDE, MAX_SIDE = 32, 512


class BadLocatorError(ValueError):
    """The locator names nothing this asset's type has (a caller's mistake)."""


@dataclass(frozen=True)
class Target:
    """Where in a file a locator points."""

    kind: str  # image | page | frame
    page: int = 0
    seconds: float = 0.0


def parse_locator(locator: str, mime: str) -> Target:
    """The target of ``locator`` in a file of type ``mime``, or :class:`BadLocatorError`."""
    if mime in IMAGE_TYPES:
        if locator in ("", "image"):
            return Target("image")
    elif mime in PDF_TYPES:
        page = _PAGE.match(locator)
        if page:
            return Target("page", page=int(page.group(1)))
    elif mime in VIDEO_TYPES:
        frame = _FRAME.match(locator)
        if frame:
            return Target("frame", seconds=float(frame.group(1)))
    raise BadLocatorError(
        f"locator {locator[:80]!r} names nothing in a {mime or 'file'}: use image (images), "
        "page:N (PDFs) or frame:SECONDS (videos), as the Ask's sources give them"
    )


def render_preview(
    pool: SandboxPool,
    data: bytes,
    mime: str,
    locator: str,
    side: int,
    limits: MediaLimits,
    time_limit_s: float,
) -> bytes:
    """A JPEG at most ``side`` px on its longer side of what ``locator`` points at.

    Raises :class:`BadLocatorError` (the locator), or ``BadMediaError`` (the file, as the
    decoders word it; also a page or frame the file does not have)."""
    target = parse_locator(locator, mime)
    limits = dataclasses.replace(limits, ocr_enabled=False)  # a preview shows pixels only
    side = max(MIN_SIDE, min(MAX_SIDE, side))
    setting = IMAGE_TIME_SETTING if target.kind == "image" else STREAM_TIME_SETTING
    cursor = {"page": target.page - 1} if target.kind == "page" else None
    found = None
    with pool.lease() as sandbox:
        steps = sandbox.stream(data, mime, limits, cursor, time_limit_s, setting)
        assert isinstance(steps, Generator)
        try:
            for step in steps:
                images = [c for c in step.chunks if c.image is not None]
                if not images:
                    continue
                chunk = images[0]
                if target.kind == "frame":
                    at = float(chunk.locator.partition(":")[2] or 0)
                    if at > target.seconds + 0.0005:
                        break  # past it: the frame at or before it stands for it
                found = chunk.image
                if target.kind != "frame" or abs(at - target.seconds) < 0.0005:
                    break
        finally:
            steps.close()  # an abandoned decode: the sandbox replaces its child
    if found is None:
        raise BadMediaError(f"{locator} is not in this {mime}")
    image = found.copy()
    image.thumbnail((side, side))
    out = io.BytesIO()
    image.convert("RGB").save(out, "JPEG", quality=82)
    return out.getvalue()
