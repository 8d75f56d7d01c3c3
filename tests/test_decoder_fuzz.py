"""Fuzz the decoder entry point: whatever the bytes, only ``BadMediaError`` (or chunks) come out.

``activities.media.decode.iter_steps`` turns bytes + a sniffed type into chunks; it is what the
encode worker runs on every file, inside the sandbox's child process. Hypothesis feeds
it mutated valid files of every supported type (truncations, overwritten bytes, spliced
garbage, headers on random bodies) plus the bytes claimed as another type, in this very
process: an uncaught exception fails the test, and a crash of
a decoder library would take the test process down, so passing means no generated input
crashes a worker. A smaller run goes through the sandbox (images as bytes, PDFs and videos
as files, as the worker sends them) to check that whatever its child does (including dying)
also surfaces as ``BadMediaError``.

Bounds are small so that every example decodes in milliseconds; ``database=None`` keeps
Hypothesis from writing a ``.hypothesis`` directory into the checkout.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from activities.media.decode import iter_steps
from activities.media.formats import (
    IMAGE_TYPES,
    PDF,
    SUPPORTED_TYPES,
    VIDEO_TYPES,
    BadMediaError,
    MediaLimits,
    sniff,
)
from activities.media.sandbox import DecoderSandbox
from starters.synthetic_corpus import REPORT_PAGES, pdf_bytes, video_bytes

# Pillow warns about the damage it tolerates (truncated TIFF tags, corrupt EXIF): expected.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LIMITS = MediaLimits(
    max_object_bytes=1_000_000,
    max_image_pixels=1_000_000,
    render_max_side=64,
    pdf_max_pages=20,
    video_max_seconds=30,
    video_frame_interval_s=0.5,
    video_max_frames=4,
)


@cache
def seeds() -> dict[str, bytes]:
    """One small valid file per decoder path: what the mutations start from."""
    out: dict[str, bytes] = {}
    image = Image.new("RGB", (24, 16), (200, 30, 30))
    for fmt, name in [
        ("JPEG", "jpg"),
        ("PNG", "png"),
        ("GIF", "gif"),
        ("BMP", "bmp"),
        ("TIFF", "tiff"),
        ("WEBP", "webp"),
    ]:
        buf = io.BytesIO()
        image.save(buf, fmt)
        out[name] = buf.getvalue()
    out["pdf"] = pdf_bytes(REPORT_PAGES[:2], page_size=(60, 80))
    clip = [("blue", "square", 0.6), ("green", "triangle", 0.6)]
    out["mp4"] = video_bytes(clip, fps=5, size=32)
    out["mkv"] = video_bytes(clip, fps=5, size=32, container="matroska")
    out["avi"] = video_bytes(clip, fps=5, size=32, container="avi")
    return out


@st.composite
def hostile_bytes(draw: st.DrawFn) -> bytes:
    """A valid seed, mutated in one of the ways real broken files are broken."""
    data = bytearray(draw(st.sampled_from(sorted(seeds().values()))))
    kind = draw(st.sampled_from(["truncate", "overwrite", "splice", "header+random"]))
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data)))])
    if kind == "overwrite":
        for _ in range(draw(st.integers(1, 24))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "splice":
        at = draw(st.integers(0, len(data)))
        return bytes(data[:at] + draw(st.binary(min_size=1, max_size=256)) + data[at:])
    return bytes(data[: draw(st.integers(4, 64))]) + draw(st.binary(max_size=2048))


def decode(data: bytes, mime: str) -> int:
    """Run the decoder to the end; the number of chunks it produced."""
    return sum(len(step.chunks) for step in iter_steps(data, mime, LIMITS))


def test_the_seeds_decode() -> None:
    for name, data in seeds().items():
        assert decode(data, sniff(data)) >= 1, name


@settings(
    max_examples=1000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=hostile_bytes(), claimed=st.sampled_from(sorted(SUPPORTED_TYPES)))
def test_no_input_escapes_the_decoder(data: bytes, claimed: str) -> None:
    """As sniffed, and as a wrong type (an object whose bytes changed after the scan)."""
    for mime in {sniff(data), claimed}:
        try:
            decode(data, mime)
        except BadMediaError as e:
            assert str(e), "a failure must say why"


@settings(max_examples=300, deadline=None, database=None)
@given(data=st.binary(max_size=4096), mime=st.sampled_from(sorted(SUPPORTED_TYPES)))
def test_random_bytes_of_any_claimed_type(data: bytes, mime: str) -> None:
    try:
        decode(data, mime)
    except BadMediaError as e:
        assert str(e)


@pytest.fixture(scope="module")
def sandbox() -> Iterator[DecoderSandbox]:
    box = DecoderSandbox(memory_mb=1024)
    yield box
    box.kill()


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=hostile_bytes())
def test_sandboxed_decoding_only_fails_with_reasons(
    data: bytes, sandbox: DecoderSandbox, tmp_path_factory: pytest.TempPathFactory
) -> None:
    mime = sniff(data)
    try:
        if mime in IMAGE_TYPES:
            image = sandbox.decode_image(data, mime, LIMITS, 10)
            assert image.mode == "RGB" and max(image.size) <= LIMITS.render_max_side
            return
        if mime not in VIDEO_TYPES:
            mime = PDF
        path = Path(tmp_path_factory.mktemp("fuzz")) / "input"
        path.write_bytes(data)
        for _ in sandbox.stream(str(path), mime, LIMITS, None, 10):
            pass
    except BadMediaError as e:
        assert str(e)
