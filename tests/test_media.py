"""Media breadth: every image form, PDFs, video, hostile files; unit level and end to end.

The first half needs no server: sniffing, the cheap checks, the decoders, the sandbox. The
second half ingests through the real workflows (``worker`` fixture) and asks through the
real ``Ask`` workflow, and resumes an interrupted video against the real Milvus.
"""

from __future__ import annotations

import asyncio
import io
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from activities.media.decode import decode_all, iter_steps
from activities.media.formats import (
    AVI,
    GIF,
    JPEG,
    MATROSKA,
    MP4,
    PDF,
    PNG,
    QUICKTIME,
    TIFF,
    WEBM,
    WEBP,
    BadMediaError,
    MediaLimits,
    check_object,
    clean_text,
    sniff,
    truncate_utf8,
    type_note,
)
from activities.media.images import decode_image
from activities.media.sandbox import DecoderSandbox
from starters.synthetic_corpus import (
    REPORT_PAGES,
    PdfPage,
    pdf_bytes,
    video_bytes,
    write_pdf,
    write_video,
)
from tests.fixtures.hostile.make_corpus import (
    deflate_bomb_pdf,
    encrypted_pdf,
    page_bomb_pdf,
    write_hostile_corpus,
)
from tests.helpers import close_colour, decoded_colour, png_bomb, png_bytes, write_image_forms

LIMITS = MediaLimits(max_object_bytes=2_000_000, max_image_pixels=4_000_000)


# -- sniffing and cheap checks -------------------------------------------------------------
def _video(container: str, codec: str = "mpeg4") -> bytes:
    return video_bytes([("red", "circle", 0.5)], fps=10, size=64, container=container, codec=codec)


@pytest.mark.parametrize(
    ("data", "mime"),
    [
        (b"\xff\xd8\xff\xe0" + b"\x00" * 20, JPEG),
        (png_bytes(), PNG),
        (b"GIF89a" + b"\x00" * 20, GIF),
        (b"II*\x00" + b"\x00" * 20, TIFF),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", WEBP),
        (b"%PDF-1.7\n", PDF),
        (b"\n\n  %PDF-1.4 after some junk", PDF),
        (b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00", MP4),
        (b"\x00\x00\x00\x14ftypqt  \x00\x00\x00\x00", QUICKTIME),
        (b"\x00\x00\x00\x08wide\x00\x00\x00\x00mdat", QUICKTIME),
        (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x84webm", WEBM),
        (b"\x1a\x45\xdf\xa3\xa3\x42\x86\x81\x01\x42\x82\x88matroska", MATROSKA),
        (b"RIFF\x00\x00\x00\x00AVI LIST", AVI),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00", "image/heic"),
        (b"\x00\x00\x00\x18ftypM4A \x00\x00\x00\x00", "audio/mp4"),
        (b"PK\x03\x04rest", "application/zip"),
        (b"BMW is a car, not a bitmap", "text/plain"),
        (b"hello world\n", "text/plain"),
        (b"\x00\x01\x02\x03\xfe\xff", ""),
    ],
)
def test_sniff_decides_by_bytes(data: bytes, mime: str) -> None:
    assert sniff(data) == mime


def test_real_containers_sniff_as_what_they_are() -> None:
    assert sniff(_video("mp4")) == MP4
    assert sniff(_video("mov")) == QUICKTIME
    assert sniff(_video("matroska")) == MATROSKA
    assert sniff(_video("avi")) == AVI
    assert sniff(_video("webm", "libvpx")) == WEBM
    assert sniff(pdf_bytes(REPORT_PAGES)) == PDF


def test_cheap_check_accepts_pdf_and_video_and_refuses_precisely() -> None:
    pdf, mp4 = pdf_bytes(REPORT_PAGES), _video("mp4")
    assert check_object(pdf[:1024], len(pdf), 10**6, limits=LIMITS) == PDF
    assert check_object(mp4[:1024], len(mp4), 10**6, limits=LIMITS) == MP4
    # Videos have their own size bound: bigger than max_object_bytes is fine ...
    small_objects = MediaLimits(max_object_bytes=100, video_max_bytes=10**9)
    assert check_object(mp4[:1024], 10**8, 100, limits=small_objects) == MP4
    # ... up to MMRAG_VIDEO_MAX_BYTES.
    with pytest.raises(BadMediaError, match="MMRAG_VIDEO_MAX_BYTES"):
        check_object(mp4[:1024], 10**9 + 1, 100, limits=small_objects)
    with pytest.raises(BadMediaError, match="MMRAG_MAX_OBJECT_BYTES"):
        check_object(pdf[:1024], 101, 100, limits=small_objects)
    with pytest.raises(BadMediaError, match="empty file"):
        check_object(b"", 0, 100)
    with pytest.raises(BadMediaError, match=r"unsupported media type image/heic: convert HEIC"):
        check_object(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00", 40, 100)
    with pytest.raises(BadMediaError, match="unrecognised content.*plain text"):
        check_object(b"just words", 10, 100)
    # The name disagrees with the bytes: the reason says so.
    with pytest.raises(BadMediaError, match=r"the name ends in \.jpg but the bytes are"):
        check_object(b"\x00\x01\x02\x03", 4, 100, uri="file:///x/photo.jpg")


def test_type_note_names_every_disagreement_and_nothing_else() -> None:
    assert type_note("file:///a/b.png", "", PNG) == ""
    assert type_note("gs://b/a.jpeg", "image/jpg", JPEG) == ""  # an alias, not a mismatch
    assert type_note("file:///a/clip.mov", "", MP4) == ""  # same container family
    assert type_note("file:///a/no-extension", "application/octet-stream", PNG) == ""
    note = type_note("gs://b/photo.jpg", "image/gif", PNG)
    assert "the name ends in .jpg" in note and "content type is image/gif" in note
    assert "bytes are image/png" in note


def test_text_helpers_keep_stored_text_valid() -> None:
    assert clean_text("a\x00b\r\n\tc  \ud800d") == "a b c ?d"  # valid UTF-8 for Milvus
    cut = truncate_utf8("é" * 2000, 2048)
    assert len(cut.encode()) <= 2048 and cut == "é" * 1024


# -- images --------------------------------------------------------------------------------
def test_every_image_form_decodes_to_the_right_colours(tmp_path: Path) -> None:
    forms = write_image_forms(tmp_path)
    assert {"plain.jpg", "plain.webp", "first-frame.gif", "plain.bmp", "plain.tiff"} <= set(forms)
    for name, colour in forms.items():
        data = (tmp_path / name).read_bytes()
        image = decode_image(data, LIMITS.max_object_bytes, LIMITS.max_image_pixels)
        assert image.mode == "RGB", name
        got = decoded_colour(name, image)
        assert close_colour(got, colour), f"{name}: decoded {got}, expected {colour}"
    rotated = decode_image((tmp_path / "rotated.jpg").read_bytes(), 10**6, 10**6)
    assert rotated.size == (32, 64), "EXIF orientation 6 must turn the landscape upright"
    assert close_colour(rotated.getpixel((16, 56)), (30, 60, 220))  # type: ignore[arg-type]


def test_large_images_are_shrunk_while_decoding() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (3000, 1500), (10, 200, 10)).save(buf, "JPEG")
    image = decode_image(buf.getvalue(), 10**7, 10**7, max_side=512)
    assert max(image.size) <= 512 and image.size[0] == 2 * image.size[1]


def test_a_file_is_only_parsed_as_its_sniffed_type() -> None:
    with pytest.raises(BadMediaError, match="not an image: the bytes are application/pdf"):
        decode_image(pdf_bytes(REPORT_PAGES), 10**6, 10**6)


# -- PDFs ----------------------------------------------------------------------------------
def test_pdf_pages_become_page_and_passage_chunks() -> None:
    chunks = decode_all(pdf_bytes(REPORT_PAGES), PDF, LIMITS)
    assert [c.locator for c in chunks] == [
        "page:1",
        "page:1:p:1",
        "page:2",
        "page:2:p:1",
        "page:3",
        "page:3:p:1",
    ]
    page2 = chunks[2]
    assert page2.image is not None and page2.image.size == (512, 512)
    assert page2.snippet == ""  # a page's words live in its passages, not twice
    passage = chunks[3]
    assert passage.image is None and passage.text == passage.snippet
    assert passage.snippet.startswith("quarterly report red circle")
    assert passage.origin == "text-layer"
    # The red circle is drawn, centred, and the page is padded to a square with white.
    assert close_colour(page2.image.getpixel((256, 290)), (220, 30, 30), 20)  # type: ignore[arg-type]
    assert page2.image.getpixel((5, 256)) == (255, 255, 255)


def test_pdf_page_without_words_has_no_text_chunk_and_huge_pages_stay_bounded() -> None:
    pages = [PdfPage([], ("blue", "square")), PdfPage(["7"], None)]
    chunks = decode_all(pdf_bytes(pages, page_size=(14_400, 14_400)), PDF, LIMITS)
    assert [c.locator for c in chunks] == ["page:1", "page:2"]
    assert all(c.image is not None and max(c.image.size) <= 512 for c in chunks)


def test_pdf_resumes_after_a_page() -> None:
    steps = list(iter_steps(pdf_bytes(REPORT_PAGES), PDF, LIMITS))
    resumed = list(iter_steps(pdf_bytes(REPORT_PAGES), PDF, LIMITS, steps[0].cursor))
    assert [c.locator for s in resumed for c in s.chunks] == [
        "page:2",
        "page:2:p:1",
        "page:3",
        "page:3:p:1",
    ]


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (page_bomb_pdf(600), "the PDF has 600 pages, the limit is 500"),
        (encrypted_pdf(), "encrypted PDF: it is protected by a password"),
        (b"%PDF-1.4\n% nothing else\n", "corrupt PDF"),
        (pdf_bytes(REPORT_PAGES)[:700], "corrupt PDF"),
    ],
)
def test_bad_pdfs_fail_precisely(data: bytes, words: str) -> None:
    with pytest.raises(BadMediaError, match=words):
        decode_all(data, PDF, LIMITS)


# -- video ---------------------------------------------------------------------------------
def test_video_keyframes_at_the_interval_and_on_scene_change() -> None:
    clip = video_bytes()  # blue square 0-2 s, green triangle 2-4 s
    default = decode_all(clip, MP4, LIMITS)
    assert [c.locator for c in default] == ["frame:0.000", "frame:2.000"]  # the cut at 2 s
    every_second = decode_all(clip, MP4, MediaLimits(video_frame_interval_s=1.0))
    assert [c.locator for c in every_second] == [
        "frame:0.000",
        "frame:1.000",
        "frame:2.000",
        "frame:3.000",
    ]
    no_scenes = decode_all(clip, MP4, MediaLimits(video_scene_threshold=0))
    assert [c.locator for c in no_scenes] == ["frame:0.000"]
    frame = default[1].image
    assert frame is not None and frame.size == (128, 128)
    assert close_colour(frame.getpixel((64, 64)), (40, 170, 40), 40)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("container", "codec"),
    [("mov", "mpeg4"), ("matroska", "mpeg4"), ("avi", "mpeg4"), ("webm", "libvpx")],
)
def test_every_container_decodes(container: str, codec: str) -> None:
    data = video_bytes(fps=10, size=64, container=container, codec=codec)
    mime = sniff(data)
    assert [c.locator for c in decode_all(data, mime, LIMITS)] == ["frame:0.000", "frame:2.000"]


def test_video_frame_cap_spreads_over_the_video_and_notes_a_cut_short() -> None:
    clip = video_bytes([("red", "circle", 2.0), ("blue", "square", 2.0)], fps=10)
    spread = decode_all(clip, MP4, MediaLimits(video_frame_interval_s=0.1, video_max_frames=4))
    assert [c.locator for c in spread] == [
        "frame:0.000",
        "frame:1.000",
        "frame:2.000",
        "frame:3.000",
    ]
    # Scene changes can exhaust the cap early: the last step says where indexing stopped.
    flicker = video_bytes([(c, "square", 0.6) for c in ["red", "blue"] * 4], fps=10)
    steps = list(iter_steps(flicker, MP4, MediaLimits(video_max_frames=3)))
    assert sum(len(s.chunks) for s in steps) == 3
    assert "capped at 3 keyframes (MMRAG_VIDEO_MAX_FRAMES)" in steps[-1].note


def test_video_resumes_exactly_where_it_stopped() -> None:
    clip = video_bytes([(c, "circle", 1.5) for c in ("red", "blue", "green", "yellow")], fps=10)
    limits = MediaLimits(video_frame_interval_s=0.7)
    steps = list(iter_steps(clip, MP4, limits))
    everything = [c.locator for s in steps for c in s.chunks]
    assert len(everything) >= 8
    for i, step in enumerate(steps[:-1]):
        rest = [c.locator for s in iter_steps(clip, MP4, limits, step.cursor) for c in s.chunks]
        assert rest == everything[i + 1 :], f"resumed after step {i}"


@pytest.mark.parametrize(
    ("data", "limits", "words"),
    [
        (video_bytes(), MediaLimits(video_max_seconds=3), "video too long: it lasts 4 s"),
        (video_bytes(size=128), MediaLimits(max_image_pixels=10_000), "128x128 exceed"),
        (video_bytes()[:3000], LIMITS, "corrupt or truncated video"),
    ],
)
def test_bad_videos_fail_precisely(data: bytes, limits: MediaLimits, words: str) -> None:
    with pytest.raises(BadMediaError, match=words):
        decode_all(data, MP4, limits)


# -- the sandbox ---------------------------------------------------------------------------
@pytest.fixture
def sandbox() -> Iterator[DecoderSandbox]:
    box = DecoderSandbox(memory_mb=2048)
    yield box
    box.kill()


def test_sandbox_streams_pages_and_frames_and_is_reused(
    sandbox: DecoderSandbox, tmp_path: Path
) -> None:
    report, clip = write_pdf(tmp_path / "r.pdf"), write_video(tmp_path / "c.mp4")
    steps = list(sandbox.stream(str(report), PDF, LIMITS, None, 30))
    assert [c.locator for s in steps for c in s.chunks][:2] == ["page:1", "page:1:p:1"]
    pid = sandbox.pid
    with pytest.raises(BadMediaError, match="corrupt PDF"):
        list(sandbox.stream(str(clip), PDF, LIMITS, None, 30))  # a clean refusal ...
    frames = list(sandbox.stream(str(clip), MP4, LIMITS, None, 30))
    assert [c.locator for s in frames for c in s.chunks] == ["frame:0.000", "frame:2.000"]
    assert sandbox.pid == pid, "... leaves the child in service"


def test_sandbox_bounds_time_memory_and_crashes(sandbox: DecoderSandbox, tmp_path: Path) -> None:
    clip = write_video(tmp_path / "c.mp4")
    with pytest.raises(BadMediaError, match="longer than 0.0001 s .MMRAG_DECODE_TIME_LIMIT_S"):
        list(sandbox.stream(str(clip), MP4, LIMITS, None, 0.0001))
    bomb = tmp_path / "bomb.pdf"
    bomb.write_bytes(deflate_bomb_pdf(1024))
    small = DecoderSandbox(memory_mb=700)
    started = time.monotonic()
    try:
        with pytest.raises(
            BadMediaError, match="more than 700 MB to decode .MMRAG_DECODE_MEMORY_MB"
        ):
            list(small.stream(str(bomb), PDF, LIMITS, None, 30))
    finally:
        small.kill()
    assert time.monotonic() - started < 15
    # A child killed mid-stream: the file fails, the next one gets a fresh child.
    stream = sandbox.stream(str(clip), MP4, MediaLimits(video_frame_interval_s=0.1), None, 30)
    next(stream)
    os.kill(sandbox.pid or 0, 9)
    with pytest.raises(BadMediaError, match="decoder process died.*SIGKILL"):
        list(stream)
    assert len(list(sandbox.stream(str(clip), MP4, LIMITS, None, 30))) == 2


def test_images_decode_in_the_sandbox_as_they_do_in_process(
    sandbox: DecoderSandbox, tmp_path: Path
) -> None:
    """The worker decodes every image in a child: same pixels, same shrink, same refusals."""
    forms = write_image_forms(tmp_path)
    for name in forms:
        data = (tmp_path / name).read_bytes()
        here = decode_image(
            data, LIMITS.max_object_bytes, LIMITS.max_image_pixels, "", LIMITS.render_max_side
        )
        there = sandbox.decode_image(data, "", LIMITS, 20)
        assert (there.mode, there.size, there.tobytes()) == ("RGB", here.size, here.tobytes())
    buf = io.BytesIO()
    Image.new("RGB", (2400, 1200), (10, 200, 10)).save(buf, "JPEG")
    assert sandbox.decode_image(buf.getvalue(), "", LIMITS, 20).size == (512, 256)
    pid = sandbox.pid
    with pytest.raises(BadMediaError, match="not an image: the bytes are application/pdf"):
        sandbox.decode_image(pdf_bytes(REPORT_PAGES), "", LIMITS, 20)
    with pytest.raises(BadMediaError, match="MMRAG_MAX_IMAGE_PIXELS"):
        sandbox.decode_image(png_bomb(), "", LIMITS, 20)
    assert sandbox.pid == pid, "refusals leave the child in service"


def test_every_hostile_file_fails_precisely_and_fast(
    sandbox: DecoderSandbox, tmp_path: Path
) -> None:
    """The cheap check or the decoder, in the sandbox as in the worker, refuses each."""
    expected = write_hostile_corpus(tmp_path, LIMITS.max_object_bytes)
    for name, words in expected.items():
        path = tmp_path / name
        data = path.read_bytes()
        started = time.monotonic()
        with pytest.raises(BadMediaError) as refused:
            mime = check_object(data[:1024], len(data), LIMITS.max_object_bytes, limits=LIMITS)
            if mime in (PDF, MP4, QUICKTIME, WEBM, MATROSKA, AVI):
                list(sandbox.stream(str(path), mime, LIMITS, None, 20))
            else:
                sandbox.decode_image(data, mime, LIMITS, 20)
        assert words in str(refused.value), f"{name}: {refused.value}"
        assert time.monotonic() - started < 10, f"{name} took too long"


# -- end to end: the real workflows, Milvus, Postgres and Ask ------------------------------
async def _ingest(client: Any, tenant: str, sources: list[str]) -> Any:
    from starters.ingest import start_ingest

    handle = await start_ingest(client, tenant, sources)
    return await asyncio.wait_for(handle.result(), timeout=240)


async def test_mixed_folder_reports_the_right_counts_and_reasons(
    worker: Any, client: Any, tenant: str, tmp_path: Path
) -> None:
    """Every image form, a PDF, a video and the whole hostile corpus in one ingest."""
    from tests.conftest import TEST_MAX_OBJECT_BYTES
    from tests.helpers import audit_events, audit_private, milvus_pks, registry_rows
    from workflows.contracts import asset_id_for

    folder = tmp_path / "mixed"
    forms = write_image_forms(folder / "images")
    (folder / "images" / "really-a-png.jpg").write_bytes(png_bytes((48, 48)))
    report = write_pdf(folder / "docs" / "quarterly-report.pdf")
    clip = write_video(folder / "video" / "shapes-clip.mp4")
    hostile = write_hostile_corpus(folder / "hostile", TEST_MAX_OBJECT_BYTES)

    started = time.monotonic()
    result = await _ingest(client, tenant, [str(folder)])
    elapsed = time.monotonic() - started

    good_images = len(forms) + 1
    assert (result.ingested, result.failed) == (good_images + 2, len(hostile)), result.failures
    assert result.vectors == good_images + 6 + 2  # 3 pages + 3 passages, 2 keyframes
    reasons = {f.uri.rsplit("/", 1)[-1]: f.reason for f in result.failures}
    for name, words in hostile.items():
        assert words in reasons[name], f"{name}: {reasons[name]!r} lacks {words!r}"
    assert elapsed < 120, f"the hostile corpus took {elapsed:.0f} s"

    def aid(path: Path) -> str:
        return asset_id_for(tenant, path.resolve().as_uri())

    pks = set(milvus_pks(tenant))
    assert len(pks) == result.vectors
    pdf_id, video_id = aid(report), aid(clip)
    assert {f"{pdf_id}:page:{n}{s}" for n in (1, 2, 3) for s in ("", ":p:1")} <= pks
    assert {f"{video_id}:frame:0.000", f"{video_id}:frame:2.000"} <= pks
    assert not {p.split(":")[0] for p in pks} & {aid(folder / "hostile" / n) for n in hostile}

    rows = {r.uri.rsplit("/", 1)[-1]: r for r in registry_rows(tenant)}
    assert (rows["quarterly-report.pdf"].media_type, rows["quarterly-report.pdf"].chunks) == (
        "application/pdf",
        6,
    )
    assert (rows["shapes-clip.mp4"].media_type, rows["shapes-clip.mp4"].chunks) == ("video/mp4", 2)
    failed = [audit_private(e) for e in audit_events(tenant) if e.action == "asset.fail"]
    assert {p["uri"].rsplit("/", 1)[-1] for p in failed} == set(hostile)  # sealed, readable
    assert all(p["reason"] for p in failed)
    assert worker.alive(), "no hostile file may take a worker down"


async def test_ask_returns_pdf_pages_and_video_frames_with_locators(
    worker: Any, client: Any, tenant: str, tmp_path: Path
) -> None:
    from starters.ask import ask
    from starters.synthetic_corpus import write_corpus
    from tests.helpers import milvus_pks, wait_searchable
    from workflows.contracts import AskFilters, AskInput

    write_pdf(tmp_path / "c" / "quarterly-report.pdf")
    write_video(tmp_path / "c" / "shapes-clip.mp4")
    write_corpus(tmp_path / "c" / "images", per_class=1, seed=77)  # 18 images around them
    result = await _ingest(client, tenant, [str(tmp_path / "c")])
    assert result.failed == 0, result.failures
    wait_searchable(tenant, len(milvus_pks(tenant)))

    async def top(text: str, media_type: str = "", k: int = 3) -> list[Any]:
        filters = AskFilters(media_types=[media_type] if media_type else [])
        inp = AskInput(tenant, text=text, top_k=k, filters=filters, generate=False)
        return (await asyncio.wait_for(ask(client, inp), timeout=60)).sources

    page = (await top("a red circle on a white background", PDF))[0]
    assert page.uri.endswith("quarterly-report.pdf") and page.chunk in ("page:2", "page:2:p:1")
    # The page's image has no snippet (its words are its passage's).
    assert page.snippet.startswith("quarterly report red circle") or page.chunk == "page:2"
    assert (await top("a green triangle on a white background", MP4))[0].chunk == "frame:2.000"
    assert (await top("a blue square on a white background", MP4))[0].chunk == "frame:0.000"
    # Unfiltered, the PDF page stands among the images that show the same thing.
    mixed = await top("a red circle on a white background", k=10)
    assert any(s.chunk.startswith("page:2") for s in mixed), [(s.uri, s.chunk) for s in mixed]


def _direct_encoder(**overrides: Any) -> Any:
    """An encode activity object in this process, on the test stack's Milvus."""
    from activities.encode_batch import BatchEncodeActivities
    from settings import get_settings

    return BatchEncodeActivities(get_settings().model_copy(update=overrides))


def _direct_query_encoder(**overrides: Any) -> Any:
    """A query encode activity object in this process, on the test stack's Milvus."""
    from activities.encode_query import QueryEncodeActivities
    from settings import get_settings

    return QueryEncodeActivities(get_settings().model_copy(update=overrides))


def _ref(tenant: str, path: Path, mime: str) -> Any:
    from activities.store.objects import LocalStore
    from activities.store.roots import TenantRoots, canonical_root
    from workflows.contracts import asset_id_for

    root = canonical_root(str(path.resolve().parent))
    ref = LocalStore(TenantRoots(tenant, (root,))).stat(path.resolve().as_uri())
    ref.asset_id, ref.media_type = asset_id_for(tenant, ref.uri), mime
    return ref


async def _index(client: Any, tenant: str, tmp_path: Path) -> Any:
    """The active index version (created by a first ingest if this session has none yet)."""
    from activities.store import registry
    from tests.helpers import engine

    index = registry.active_index(engine())
    if index is None:
        (tmp_path / "seed").mkdir()
        (tmp_path / "seed" / "one.png").write_bytes(png_bytes())
        await _ingest(client, tenant + "-seed", [str(tmp_path / "seed")])
        index = registry.active_index(engine())
    return index


class WorkerDied(Exception):
    """Stands in for a worker killed right after a heartbeat."""


async def test_interrupted_video_resumes_after_its_last_written_group(
    worker: Any, client: Any, tenant: str, tmp_path: Path
) -> None:
    """A retry given the last heartbeat continues the video; old chunks go only at the end."""
    import copy

    import numpy as np

    from activities.encode_batch import BatchProgress
    from activities.store.vectors import ChunkRow
    from tests.helpers import milvus_pks, store
    from workflows.activities.ingest import EncodeBatchInput
    from workflows.contracts import INGESTED

    index = await _index(client, tenant, tmp_path)
    encode = _direct_encoder(batch_size=4, video_frame_interval_s=0.2, video_scene_threshold=0)
    segments = [(c, "circle", 2.0) for c in ("red", "blue", "green")]
    clip = write_video(tmp_path / "long.mp4", segments, fps=10)
    expected = [c.locator for c in decode_all(clip.read_bytes(), MP4, encode.limits)]
    assert len(expected) == 30
    ref = _ref(tenant, clip, MP4)
    stale = f"{ref.asset_id}:frame:99.000"  # left by an older version of the object
    vector = np.full((1, index.dim), 1 / np.sqrt(index.dim), dtype=np.float32)
    store().replace_assets(
        index.collection,
        tenant,
        [],
        [ChunkRow(ref.asset_id, tenant, ref.uri, MP4, "frame:99.000", 0)],
        vector,
    )
    inp = EncodeBatchInput(tenant=tenant, index=index, objects=[ref])

    beats: list[dict[str, Any]] = []

    def dies_after_eight_frames(details: dict[str, Any]) -> None:
        beats.append(copy.deepcopy(details))
        current = details.get("current") or {}
        if len(current.get("written", [])) >= 8:
            raise WorkerDied

    with pytest.raises(WorkerDied):
        encode.encode_objects(inp, BatchProgress(), dies_after_eight_frames)
    # The abandoned decode was stopped before its sandbox went back to the pool.
    assert [box.pid for box in encode.sandboxes._idle] == [None]
    last = beats[-1]
    pks = milvus_pks(tenant)
    assert stale in pks, "old vectors keep answering until the new version is complete"
    assert len(pks) == 9

    resumed: list[dict[str, Any]] = []
    outcomes = encode.encode_objects(inp, BatchProgress.from_details([last]), resumed.append)
    first = resumed[0]["current"]
    assert first["cursor"]["t"] > last["current"]["cursor"]["t"], "it started over"
    assert first["written"][:8] == last["current"]["written"]
    assert (outcomes[0].status, outcomes[0].chunks) == (INGESTED, 30)
    pks = milvus_pks(tenant)
    assert pks == sorted(f"{ref.asset_id}:{loc}" for loc in expected), "stale or duplicate rows"
    assert store().count(index.collection, tenant) == 30
    # A retry after the asset finished re-encodes nothing: its outcome is in the details.
    again = encode.encode_objects(inp, BatchProgress.from_details([resumed[-1]]), resumed.append)
    assert again == outcomes
    encode.close()


async def test_an_image_that_decodes_for_minutes_fails_alone_and_fails_an_ask_at_once(
    worker: Any, client: Any, tenant: str, tmp_path: Path
) -> None:
    """A 36 Mpx progressive JPEG with 1,500 repeated scans (230 KB; in-process it decoded for
    27 s with no limit) is stopped at MMRAG_IMAGE_DECODE_TIME_LIMIT_S: that asset fails,
    non-retryably, and the batch's other images are indexed; as Ask's query image it fails
    the Ask at once as BadQuery."""
    import base64

    from temporalio.exceptions import ApplicationError

    from activities.encode_batch import BatchProgress
    from tests.helpers import milvus_pks
    from tests.test_sandbox import many_scan_jpeg
    from workflows.activities.ask import EncodeQueryInput
    from workflows.activities.ingest import EncodeBatchInput
    from workflows.contracts import FAILED, INGESTED

    index = await _index(client, tenant, tmp_path)
    limits = {"image_decode_time_limit_s": 1.0, "max_image_pixels": 40_000_000}
    encode = _direct_encoder(**limits)
    query = _direct_query_encoder(**limits)
    slow = many_scan_jpeg()
    paths = [tmp_path / "red.png", tmp_path / "slow.jpg", tmp_path / "blue.png"]
    paths[0].write_bytes(png_bytes((64, 64), (220, 20, 20)))
    paths[1].write_bytes(slow)
    paths[2].write_bytes(png_bytes((64, 64), (20, 20, 220)))
    refs = [_ref(tenant, path, mime) for path, mime in zip(paths, (PNG, JPEG, PNG), strict=True)]
    beats: list[dict[str, Any]] = []
    try:
        outcomes = encode.encode_objects(
            EncodeBatchInput(tenant=tenant, index=index, objects=refs),
            BatchProgress(),
            beats.append,
        )
        assert [o.status for o in outcomes] == [INGESTED, FAILED, INGESTED]
        assert "longer than 1 s (MMRAG_IMAGE_DECODE_TIME_LIMIT_S)" in outcomes[1].reason
        assert milvus_pks(tenant) == sorted(f"{r.asset_id}:image" for r in (refs[0], refs[2]))

        with pytest.raises(ApplicationError) as refused:
            query.encode_query(
                EncodeQueryInput(image_base64=base64.b64encode(slow).decode(), tenant=tenant)
            )
        assert (refused.value.type, refused.value.non_retryable) == ("BadQuery", True)
        assert "MMRAG_IMAGE_DECODE_TIME_LIMIT_S" in str(refused.value)
        # The same decoders still answer a well-formed query image.
        inline = base64.b64encode(png_bytes((64, 64), (220, 20, 20))).decode()
        assert query.encode_query(EncodeQueryInput(image_base64=inline, tenant=tenant)).vector
    finally:
        encode.close()
        query.close()


async def test_outcomes_note_a_name_that_disagrees_with_the_bytes(
    worker: Any, client: Any, tenant: str, tmp_path: Path
) -> None:
    from activities.encode_batch import BatchProgress
    from workflows.activities.ingest import EncodeBatchInput

    index = await _index(client, tenant, tmp_path)
    (tmp_path / "really-a-png.jpg").write_bytes(png_bytes())
    report = write_pdf(tmp_path / "report.mov")
    refs = [_ref(tenant, tmp_path / "really-a-png.jpg", PNG), _ref(tenant, report, PDF)]
    encode = _direct_encoder()
    outcomes = encode.encode_objects(
        EncodeBatchInput(tenant=tenant, index=index, objects=refs), BatchProgress(), lambda d: None
    )
    assert [o.status for o in outcomes] == ["ingested", "ingested"]
    assert "the name ends in .jpg but the bytes are image/png" in outcomes[0].note
    assert "the name ends in .mov but the bytes are application/pdf" in outcomes[1].note
    encode.close()


async def test_a_restarted_worker_resumes_a_long_video_instead_of_starting_over(
    test_stack: Any, worker: Any, client: Any, tenant: str, tmp_path: Path
) -> None:
    """SIGKILL the encode worker mid-video; its replacement continues from the heartbeat."""
    from starters.ingest import start_ingest
    from tests.helpers import milvus_pks

    every_frame = {
        "MMRAG_BATCH_SIZE": "2",
        "MMRAG_VIDEO_FRAME_INTERVAL_S": "0.1",
        "MMRAG_VIDEO_SCENE_THRESHOLD": "0",
        "MMRAG_VIDEO_MAX_FRAMES": "5000",
    }
    shapes = [("red", "circle"), ("blue", "square"), ("green", "triangle")] * 4
    write_video(tmp_path / "long" / "long.mp4", [(c, s, 10.0) for c, s in shapes], fps=10, size=64)
    total = 1200  # 120 s at 10 frames/s, every frame kept
    worker.encode.stop()
    victim = test_stack.start_worker("encode", **every_frame)
    replacement = None
    try:
        handle = await start_ingest(
            client, tenant, [str(tmp_path / "long")], encode_heartbeat_timeout_s=3
        )
        written = 0
        deadline = time.monotonic() + 90
        while written < 20 and time.monotonic() < deadline:
            description = await handle.describe()
            for pending in description.raw_description.pending_activities:
                if pending.heartbeat_details.payloads:
                    details = await client.data_converter.decode(pending.heartbeat_details.payloads)
                    current = (details[-1] or {}).get("current") or {}
                    written = len(current.get("written", []))
            await asyncio.sleep(0.05)
        assert 20 <= written < total, f"{written} frames written before the kill"
        victim.kill()
        replacement = test_stack.start_worker("encode", **every_frame)
        result = await asyncio.wait_for(handle.result(), timeout=180)
        assert (result.ingested, result.failed, result.vectors) == (1, 0, total)
        pks = milvus_pks(tenant)
        assert len(pks) == len(set(pks)) == total
        resumed = [line for line in replacement.log().splitlines() if "resuming file://" in line]
        assert resumed, "the replacement started the video over"
        assert (
            f"after {written}" in resumed[0]
            or int(resumed[0].split(" after ")[1].split()[0]) >= written
        )
    finally:
        for process in (victim, replacement):
            if process is not None:
                process.stop(timeout=10)
        worker.encode = test_stack.start_worker("encode")


async def test_pdf_and_video_from_gcs(
    worker: Any, client: Any, tenant: str, tmp_path: Path, test_stack: Any
) -> None:
    """Objects that are not local files are spooled to a temporary file for the decoder."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    from tests.helpers import grant_root, milvus_pks

    gcs = storage.Client(project="test", credentials=AnonymousCredentials())
    bucket = gcs.create_bucket(f"media-{tenant.lower()[-6:]}")
    grant_root(test_stack.state_dir, tenant, f"gs://{bucket.name}/")
    bucket.blob("docs/report.pdf").upload_from_filename(str(write_pdf(tmp_path / "r.pdf")))
    bucket.blob("docs/clip.mp4").upload_from_filename(str(write_video(tmp_path / "c.mp4")))
    result = await _ingest(client, tenant, [f"gs://{bucket.name}/docs/"])
    assert (result.ingested, result.failed, result.vectors) == (2, 0, 8), result.failures
    assert sorted(p.split(":", 1)[1] for p in milvus_pks(tenant)) == [
        "frame:0.000",
        "frame:2.000",
        "page:1",
        "page:1:p:1",
        "page:2",
        "page:2:p:1",
        "page:3",
        "page:3:p:1",
    ]
    spooled = [f"mmrag-media-{p.split(':')[0][:16]}-*" for p in milvus_pks(tenant)]
    assert not [f for g in spooled for f in Path(tempfile.gettempdir()).glob(g)], "copies left"
