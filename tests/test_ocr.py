"""Words inside media: pages cut into passages, OCR of scans, pictures and frames.

The first half needs no server: passages, the text-presence check, Tesseract in the decoder
sandbox (a scanned PDF, a sign, a video frame with a subtitle, the time budget, the switch).
The second half ingests through the real workflows (``worker`` fixture) and asks through the
real ``Ask``: a fact deep inside a PDF and a scanned page's part number are found by their
exact words, and sources cite the passage.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import textwrap
from pathlib import Path
from typing import Any

import av
import pytest
from PIL import Image, ImageDraw, ImageFont

from activities.media.decode import decode_all, iter_steps
from activities.media.formats import MP4, PDF, PNG, MediaLimits
from activities.media.ocr import ocr_limits, tesseract_path, text_likely
from activities.media.passages import count_tokens, passages
from activities.media.sandbox import DecoderSandbox
from starters.synthetic_corpus import PdfPage, pdf_bytes

LIMITS = MediaLimits()
PART = "AX-4471"
FACT = (
    "The spare pump impeller for line 7 is part number KX-90210 and ships from the Lyon "
    "depot within two days."
)
FILLER = (
    "Staff park in the west lot and sign in at the front desk before each shift.",
    "Safety glasses are worn on the shop floor at all times, visitors included.",
    "Timesheets are due every Friday and approved by the team lead on Monday.",
    "The canteen opens at eleven thirty and closes after the late shift leaves.",
    "Spare keys are kept by security and signed out against a badge number.",
)


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def text_picture(lines: list[str], size: tuple[int, int], text_px: int) -> Image.Image:
    """Dark text on a light page: what a scanner or a screenshot gives."""
    image = Image.new("RGB", size, (246, 246, 240))
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((60, 60 + i * int(text_px * 1.6)), line, fill=(20, 20, 30), font=font(text_px))
    return image


def scanned_pdf(lines: list[str]) -> bytes:
    """A one-page PDF that is only a picture of a page: no text layer at all."""
    page = text_picture(lines, (1275, 1650), 30)  # US Letter at 150 dpi
    buf = io.BytesIO()
    page.save(buf, "PDF", resolution=150.0)
    return buf.getvalue()


def handbook_pdf() -> bytes:
    """Three pages of five paragraphs each; FACT is paragraph five of page three."""
    pages = []
    for number in range(1, 4):
        paragraphs = [
            f"{number}.{k + 1} " + " ".join(FILLER[(k + j) % 5] for j in range(3)) for k in range(5)
        ]
        if number == 3:
            paragraphs[4] = f"3.5 {FACT}"
        lines = [line for p in paragraphs for line in [*textwrap.wrap(p, 90), ""]]
        pages.append(PdfPage(lines, font_size=10))
    return pdf_bytes(pages)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_tesseract_is_installed() -> None:
    """`make test` installs it (scripts/apt-deps.sh); workers without it ingest without OCR."""
    assert tesseract_path(), "install Debian's tesseract-ocr: sh scripts/apt-deps.sh"


def test_a_worker_without_tesseract_ingests_without_ocr_and_bad_languages_are_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="install tesseract-ocr-xyz"):
        ocr_limits(dataclasses.replace(LIMITS, ocr_languages="eng+xyz"))
    with pytest.raises(ValueError, match="language codes joined by"):
        ocr_limits(dataclasses.replace(LIMITS, ocr_languages="eng --psm 0"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no tesseract anywhere
    assert ocr_limits(LIMITS).ocr_enabled is False


# -- passages -------------------------------------------------------------------------------
def test_passages_are_bounded_overlap_and_keep_every_word() -> None:
    text = " ".join(f"Sentence {i} says word{i} twice, word{i}." for i in range(60))
    cut = passages(text, 40, 10)
    assert len(cut) > 5
    assert all(count_tokens(p) <= 40 for p in cut)
    assert all(p in text for p in cut)  # slices of the text, never rewritten
    for before, after in zip(cut, cut[1:], strict=False):
        assert set(before.split()[-3:]) & set(after.split()[:12]), "neighbours must overlap"
    assert {f"word{i}" for i in range(60)} <= {w.strip(",.") for p in cut for w in p.split()}
    # Cut at a sentence end where one is near the limit.
    assert all(p.endswith(".") for p in cut)


def test_short_and_empty_text() -> None:
    assert passages("", 60, 15) == []
    assert passages("one two three", 60, 15) == ["one two three"]
    assert passages("a b c d e", 2, 5) == ["a b", "b c", "c d", "d e"]  # overlap < size


def test_a_fact_deep_in_a_page_is_one_passage_of_its_own() -> None:
    chunks = decode_all(handbook_pdf(), PDF, LIMITS)
    page3 = [c for c in chunks if c.locator.startswith("page:3:p:")]
    assert len(page3) >= 4, [c.locator for c in page3]
    holding = [c for c in page3 if "KX-90210" in c.snippet]
    assert holding and all(c.origin == "text-layer" for c in holding)
    assert any("spare pump impeller" in c.snippet for c in holding)
    page_image = next(c for c in chunks if c.locator == "page:3")
    assert page_image.image is not None and page_image.snippet == ""


# -- text presence and OCR ----------------------------------------------------------------------
def test_text_presence_check() -> None:
    slide = text_picture(["Quarterly review", "Revenue up 12 %"], (1280, 720), 48)
    assert text_likely(slide)
    plain = Image.new("RGB", (800, 600), (90, 140, 200))
    ImageDraw.Draw(plain).ellipse((200, 150, 600, 450), fill=(220, 40, 40))
    assert not text_likely(plain)
    noise = Image.effect_noise((100, 75), 60).resize((800, 600)).convert("RGB")
    assert not text_likely(noise)


@pytest.fixture
def sandbox() -> Any:
    box = DecoderSandbox(memory_mb=2048, time_limit_s=120)
    yield box
    box.kill()


def test_a_scanned_page_is_read_by_ocr_in_the_sandbox(sandbox: DecoderSandbox) -> None:
    data = scanned_pdf([f"Replacement part {PART} fits the north gate motor.", "Order two."])
    steps = list(sandbox.stream(data, PDF, LIMITS, None, 60))
    chunks = [c for s in steps for c in s.chunks]
    passages_ = [c for c in chunks if c.locator.startswith("page:1:p:")]
    assert passages_, [c.locator for c in chunks]
    assert all(c.origin == "ocr" for c in passages_)
    assert PART in " ".join(c.snippet for c in passages_)
    assert "north gate motor" in " ".join(c.snippet for c in passages_)


def test_a_page_with_a_text_layer_is_not_ocrd(sandbox: DecoderSandbox) -> None:
    data = pdf_bytes([PdfPage(["Invoice 2291: forty chairs and twelve desks, delivered."])])
    chunks = [c for s in sandbox.stream(data, PDF, LIMITS, None, 60) for c in s.chunks]
    assert [c.origin for c in chunks if c.text] == ["text-layer"]


def test_pictures_with_text_get_their_words_as_snippet(sandbox: DecoderSandbox) -> None:
    sign = Image.new("RGB", (1400, 1000), (70, 110, 60))
    ImageDraw.Draw(sign).rectangle((300, 300, 1100, 620), fill=(240, 240, 240))
    ImageDraw.Draw(sign).text((360, 400), f"GATE {PART}", fill=(10, 10, 10), font=font(96))
    chunk = sandbox.decode_image_chunk(png(sign), PNG, LIMITS, 20)
    assert chunk.image is not None and max(chunk.image.size) <= LIMITS.render_max_side
    assert PART in chunk.snippet and chunk.origin == "ocr"
    plain = Image.new("RGB", (900, 600), (200, 120, 40))
    blank = sandbox.decode_image_chunk(png(plain), PNG, LIMITS, 20)
    assert (blank.snippet, blank.origin) == ("", "")
    # Ask's query images are never OCR'd.
    assert sandbox.decode_image(png(sign), PNG, LIMITS, 20).size == chunk.image.size


def subtitled_video(path: Path, subtitle: str) -> Path:
    """Two seconds of 640x360 video whose frames carry a subtitle bar."""
    frame = Image.new("RGB", (640, 360), (40, 90, 160))
    draw = ImageDraw.Draw(frame)
    draw.rectangle((0, 280, 640, 340), fill=(0, 0, 0))
    draw.text((20, 290), subtitle, fill=(255, 255, 255), font=font(28))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=5)
        stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
        for _ in range(10):
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_a_video_frame_subtitle_is_read(sandbox: DecoderSandbox, tmp_path: Path) -> None:
    video = subtitled_video(tmp_path / "talk.mp4", f"Valve {PART} closes at noon")
    chunks = [c for s in sandbox.stream(str(video), MP4, LIMITS, None, 60) for c in s.chunks]
    assert chunks[0].locator == "frame:0.000"
    assert PART in chunks[0].snippet and chunks[0].origin == "ocr"


def test_ocr_off_and_ocr_budget(sandbox: DecoderSandbox) -> None:
    data = scanned_pdf([f"Replacement part {PART} fits the north gate motor."])
    off = dataclasses.replace(LIMITS, ocr_enabled=False)
    chunks = [c for s in sandbox.stream(data, PDF, off, None, 60) for c in s.chunks]
    assert [c.locator for c in chunks] == ["page:1"]  # the picture is still indexed
    spent = dataclasses.replace(LIMITS, ocr_time_budget_s=0.0)
    steps = list(sandbox.stream(data, PDF, spent, None, 60))
    assert [c.locator for s in steps for c in s.chunks] == ["page:1"]
    assert "OCR time budget spent" in steps[0].note and "MMRAG_OCR_TIME_BUDGET_S" in steps[0].note


def test_ocr_budget_resumes_with_the_cursor() -> None:
    data = scanned_pdf(["Page text for the budget."])
    step = next(iter_steps(data, PDF, LIMITS))
    assert step.cursor["page"] == 1 and step.cursor["ocr_s"] > 0


# -- end to end ---------------------------------------------------------------------------------
async def _ingest(client: Any, tenant: str, sources: list[str]) -> Any:
    from starters.ingest import start_ingest

    handle = await start_ingest(client, tenant, sources)
    return await asyncio.wait_for(handle.result(), timeout=240)


async def test_ask_finds_deep_facts_and_scanned_words_and_cites_the_passage(
    worker: Any, client: Any, tenant: str, tmp_path: Path
) -> None:
    from starters.ask import ask
    from tests.helpers import milvus_pks, wait_searchable
    from workflows.contracts import AskInput

    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "handbook.pdf").write_bytes(handbook_pdf())
    (folder / "scan-0001.pdf").write_bytes(
        scanned_pdf([f"Replacement part {PART} fits the north gate motor.", "Order two."])
    )
    sign = text_picture([f"Dock door {PART}-B is out of order"], (1200, 400), 64)
    (folder / "IMG_2034.png").write_bytes(png(sign))
    result = await _ingest(client, tenant, [str(folder)])
    assert (result.ingested, result.failed) == (3, 0), result.failures
    wait_searchable(tenant, len(milvus_pks(tenant)))

    async def sources(question: str) -> list[Any]:
        inp = AskInput(tenant, text=question, top_k=5, generate=False)
        return list((await asyncio.wait_for(ask(client, inp), timeout=60)).sources)

    deep = await sources("Which part number is the spare pump impeller for line 7?")
    top = deep[0]
    assert top.uri.endswith("handbook.pdf") and top.chunk.startswith("page:3:p:"), deep
    assert "KX-90210" in top.snippet
    scanned = await sources(f"What does part {PART} fit?")
    assert scanned[0].uri.endswith("scan-0001.pdf") and scanned[0].chunk.startswith("page:1:p:")
    assert PART in scanned[0].snippet
    photo = await sources("Which dock door is out of order?")
    hit = next(s for s in photo if s.uri.endswith("IMG_2034.png"))
    assert f"{PART}-B" in hit.snippet and hit.chunk == "image"
