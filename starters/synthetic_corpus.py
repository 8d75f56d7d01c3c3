"""A deterministic synthetic image-caption corpus: coloured shapes on pale backgrounds.

Why: the demo, the tests and the tiny CLIP fixture need images whose captions are *true*
without a network, a dataset download or a pretrained model. A coloured shape is the
smallest picture a text query can describe unambiguously ("a red circle"), so retrieval
quality on it can be measured exactly. Everything is drawn from one seeded
``random.Random``, so the same seed gives byte-identical files on every machine.

It also writes the same shapes as a PDF with a real text layer (:func:`write_pdf`) and as
an MPEG-4 video (:func:`write_video`), so PDF pages and video keyframes can be searched
for with the same captions.

Run as a script to write a corpus: ``python -m starters.synthetic_corpus DIR --per-class 5``
(``--with-media`` adds the demo PDF and video).

One module of ~490 lines: every generated medium (shapes, text as pixels, PDFs with and
without a text layer, videos) shares the seeded palette and fonts, so a corpus is
byte-identical on every machine.
"""

from __future__ import annotations

import argparse
import io
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

# Base RGB per colour name; each image jitters it slightly so no two pixels sets are equal.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 170, 40),
    "blue": (35, 70, 225),
    "yellow": (240, 215, 25),
    "purple": (140, 45, 185),
    "orange": (245, 135, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# (colour, shape) pairs in a fixed order: the class index used by training and tests.
CLASSES: list[tuple[str, str]] = [(c, s) for c in COLOURS for s in SHAPES]

FORMATS: dict[str, str] = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}

_SUPERSAMPLE = 4  # draw large then downsample: smooth edges like a real photo's


def caption_for(colour: str, shape: str) -> str:
    """The one true caption of a class; queries and the fixture model both use this form."""
    if colour not in COLOURS or shape not in SHAPES:
        raise ValueError(
            f"unknown class ({colour!r}, {shape!r}); colours: {sorted(COLOURS)}, "
            f"shapes: {list(SHAPES)}"
        )
    return f"a {colour} {shape} on a white background"


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    r, g, b = (min(255, max(0, v + rng.randint(-amount, amount))) for v in rgb)
    return (r, g, b)


def render(colour: str, shape: str, rng: random.Random, size: int = 64) -> Image.Image:
    """Draw one RGB ``size`` x ``size`` image of the class.

    Position, size, a small rotation of the triangle, the exact shade and a near-white
    background are drawn from ``rng`` so that a model must learn colour and shape, not
    memorise pixels. The shape always lies wholly inside the frame (so centre-cropping
    preprocessors cannot cut it off) and covers enough pixels to be recognisable at 64 px.
    """
    if colour not in COLOURS or shape not in SHAPES:
        raise ValueError(
            f"unknown class ({colour!r}, {shape!r}); colours: {sorted(COLOURS)}, "
            f"shapes: {list(SHAPES)}"
        )
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    big = size * _SUPERSAMPLE
    background = _jitter((246, 246, 246), rng, 9)
    fill = _jitter(COLOURS[colour], rng, 18)
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)

    extent = rng.uniform(0.35, 0.65) * big  # bounding-box side of the shape
    margin = 0.08 * big  # room for the triangle's tilt
    x0 = rng.uniform(margin, big - margin - extent)
    y0 = rng.uniform(margin, big - margin - extent)
    box = (x0, y0, x0 + extent, y0 + extent)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:  # triangle: an isosceles triangle, apex up, tilted a little
        cx, cy = x0 + extent / 2, y0 + extent / 2
        points = [(cx, y0), (x0 + extent, y0 + extent), (x0, y0 + extent)]
        tilt = rng.uniform(-0.25, 0.25)  # radians
        cos_t, sin_t = math.cos(tilt), math.sin(tilt)
        rotated = [
            (cx + (px - cx) * cos_t - (py - cy) * sin_t, cy + (px - cx) * sin_t + (py - cy) * cos_t)
            for px, py in points
        ]
        draw.polygon(rotated, fill=fill)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def iter_samples(
    per_class: int, seed: int, size: int = 64
) -> Iterator[tuple[str, str, Image.Image]]:
    """Yield ``(colour, shape, image)`` for ``per_class`` images of every class, in order.

    One ``random.Random(seed)`` feeds every image in a fixed order, so a seed names a corpus:
    training and held-out evaluation differ only by seed.
    """
    rng = random.Random(seed)
    for _ in range(per_class):
        for colour, shape in CLASSES:
            yield colour, shape, render(colour, shape, rng, size)


def write_corpus(
    directory: Path, per_class: int, seed: int, size: int = 64, fmt: str = "png"
) -> list[tuple[Path, str]]:
    """Write ``per_class`` images of each class to ``directory`` and return (path, caption).

    Files are named ``<colour>-<shape>-<NNN>.<fmt>`` so a file's class can be read from its
    name alone (tests check retrieval results by file name).
    """
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise ValueError(f"unsupported image format {fmt!r}; use one of {sorted(FORMATS)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    counters: dict[tuple[str, str], int] = {}
    written: list[tuple[Path, str]] = []
    for colour, shape, image in iter_samples(per_class, seed, size):
        number = counters.get((colour, shape), 0)
        counters[(colour, shape)] = number + 1
        path = directory / f"{colour}-{shape}-{number:03d}.{fmt}"
        image.save(path, format=FORMATS[fmt])
        written.append((path, caption_for(colour, shape)))
    written.sort(key=lambda item: item[0].name)
    return written


# -- PDFs and videos -------------------------------------------------------------------------
# Why hand-written PDF syntax: the demo and the tests need PDFs whose pages show a known
# shape *and* carry a real text layer, byte-identical on every machine, and hostile variants
# (thousands of pages, encrypted) that no PDF library would write on request.

PDF_PAGE_SIZE = (612, 792)  # US Letter, in points
_BEZIER_K = 0.5523  # control-point distance of a cubic Bezier quarter circle, per radius


@dataclass
class PdfPage:
    """One page: lines of text at the top and, optionally, a filled (colour, shape).
    ``font_size`` in points; lines are ``1.3 * font_size`` apart (11 pt fits ~50 lines of
    ~12 words, a dense document page)."""

    lines: list[str] = field(default_factory=list)
    shape: tuple[str, str] | None = None
    font_size: int = 20


def build_pdf(objects: list[bytes], trailer_extra: bytes = b"") -> bytes:
    """A PDF file from its numbered objects (``objects[0]`` is object 1, the catalog)."""
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R %s>>\n" % (len(objects) + 1, trailer_extra)
    out += b"startxref\n%d\n%%%%EOF\n" % xref
    return bytes(out)


def pdf_stream(content: bytes) -> bytes:
    return b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream"


def _pdf_text(text: str) -> bytes:
    escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    return escaped.encode("latin-1", "replace")


def _pdf_shape(colour: str, shape: str, width: float, height: float) -> bytes:
    """A filled shape covering ~45 % of the page's longer side, centred below the text."""
    r, g, b = (v / 255 for v in COLOURS[colour])
    extent = 0.45 * max(width, height)
    cx, cy = width / 2, height * 0.45
    half = extent / 2
    if shape == "circle":
        k = _BEZIER_K * half
        x0, x1, y0, y1 = cx - half, cx + half, cy - half, cy + half
        path = (
            f"{x1:.2f} {cy:.2f} m "
            f"{x1:.2f} {cy + k:.2f} {cx + k:.2f} {y1:.2f} {cx:.2f} {y1:.2f} c "
            f"{cx - k:.2f} {y1:.2f} {x0:.2f} {cy + k:.2f} {x0:.2f} {cy:.2f} c "
            f"{x0:.2f} {cy - k:.2f} {cx - k:.2f} {y0:.2f} {cx:.2f} {y0:.2f} c "
            f"{cx + k:.2f} {y0:.2f} {x1:.2f} {cy - k:.2f} {x1:.2f} {cy:.2f} c h"
        )
    elif shape == "square":
        path = f"{cx - half:.2f} {cy - half:.2f} {extent:.2f} {extent:.2f} re"
    else:
        path = (
            f"{cx:.2f} {cy + half:.2f} m {cx + half:.2f} {cy - half:.2f} l "
            f"{cx - half:.2f} {cy - half:.2f} l h"
        )
    return f"q {r:.3f} {g:.3f} {b:.3f} rg {path} f Q\n".encode()


def pdf_bytes(pages: list[PdfPage], page_size: tuple[int, int] = PDF_PAGE_SIZE) -> bytes:
    """A PDF with a Helvetica text layer and vector shapes: deterministic bytes."""
    if not pages:
        raise ValueError("a PDF needs at least one page")
    width, height = page_size
    page_numbers = [4 + 2 * i for i in range(len(pages))]
    kids = b" ".join(b"%d 0 R" % n for n in page_numbers)
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, len(pages)),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    for number, page in zip(page_numbers, pages, strict=True):
        content = bytearray()
        if page.shape:
            content += _pdf_shape(*page.shape, width, height)
        step = round(1.3 * page.font_size)
        for i, line in enumerate(page.lines):
            content += b"BT /F1 %d Tf 54 %d Td (%s) Tj ET\n" % (
                page.font_size,
                height - 60 - step * i,
                _pdf_text(line),
            )
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %d %d] "
            b"/Resources << /Font << /F1 3 0 R >> >> /Contents %d 0 R >>"
            % (width, height, number + 1)
        )
        objects.append(pdf_stream(bytes(content)))
    return build_pdf(objects)


def image_pdf_bytes(
    images: list[Image.Image], page_size: tuple[int, int] = PDF_PAGE_SIZE, quality: int = 85
) -> bytes:
    """A scanned document: one JPEG per page filling it, and no text layer at all (the
    words exist only as pixels, as in a scanner's PDF)."""
    if not images:
        raise ValueError("a PDF needs at least one page")
    width, height = page_size
    page_numbers = [3 + 3 * i for i in range(len(images))]
    kids = b" ".join(b"%d 0 R" % n for n in page_numbers)
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, len(images)),
    ]
    for number, image in zip(page_numbers, images, strict=True):
        jpeg = io.BytesIO()
        image.convert("L").save(jpeg, format="JPEG", quality=quality)
        data = jpeg.getvalue()
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %d %d] "
            b"/Resources << /XObject << /Im1 %d 0 R >> >> /Contents %d 0 R >>"
            % (width, height, number + 2, number + 1)
        )
        objects.append(pdf_stream(b"q %d 0 0 %d 0 0 cm /Im1 Do Q" % (width, height)))
        objects.append(
            b"<< /Type /XObject /Subtype /Image /Width %d /Height %d /ColorSpace /DeviceGray "
            b"/BitsPerComponent 8 /Filter /DCTDecode /Length %d >>\nstream\n"
            % (image.width, image.height, len(data))
            + data
            + b"\nendstream"
        )
    return build_pdf(objects)


# -- text as pixels: scans, slides, screenshots, video text cards ----------------------------


def text_image(
    lines: list[str],
    size: tuple[int, int] = (1240, 1754),
    font_size: int = 28,
    rng: random.Random | None = None,
    background: tuple[int, int, int] = (250, 250, 247),
    ink: tuple[int, int, int] = (20, 20, 20),
    scan: bool = False,
    margin: int = 80,
) -> Image.Image:
    """``lines`` drawn as pixels (Pillow's bundled FreeType font, the same on every
    machine). With ``scan`` (and an ``rng``) it looks scanned: a paper tint, a slight tilt,
    speckle noise. The default size is an A4 page at 150 dpi."""
    from PIL import ImageFont

    font = ImageFont.load_default(size=font_size)
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    y = margin
    for line in lines:
        draw.text((margin, y), line, fill=ink, font=font)
        y += round(font_size * 1.45)
    if scan and rng is not None:
        image = image.rotate(
            rng.uniform(-1.2, 1.2), resample=Image.Resampling.BICUBIC, fillcolor=background
        )
        pixels = image.load()
        assert pixels is not None
        for _ in range(size[0] * size[1] // 400):
            x, yy = rng.randrange(size[0]), rng.randrange(size[1])
            grey = rng.randint(90, 200)
            pixels[x, yy] = (grey, grey, grey)
    return image


def text_video_bytes(
    cards: list[tuple[list[str], tuple[int, int, int], float]],
    size: tuple[int, int] = (640, 360),
    fps: int = 10,
    font_size: int = 30,
) -> bytes:
    """A video of text cards, one per ``(lines, background RGB, seconds)``: a different
    background per card makes each cut a scene change."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 1_500_000
        for lines, background, seconds in cards:
            ink = (255, 255, 255) if sum(background) < 380 else (15, 15, 15)
            picture = text_image(lines, size, font_size, background=background, ink=ink, margin=40)
            frame = av.VideoFrame.from_image(picture)
            for _ in range(max(1, round(seconds * fps))):
                for packet in stream.encode(frame):
                    out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()


# The demo's report: the red circle is on page 2 (queries must find "page:2").
REPORT_PAGES = [
    PdfPage(["Quarterly report", "Summary: a yellow square"], ("yellow", "square")),
    PdfPage(["quarterly report red circle", "Figure 1: a red circle"], ("red", "circle")),
    PdfPage(["Appendix", "This page has text only: no figure, no chart, no table."]),
]


# The demo's handbook: a fact in the fifth paragraph of page 3, among ordinary paragraphs.
HANDBOOK_FACT = (
    "The emergency generator in building C is tested every Tuesday at 07:30 by the "
    "facilities team, and the test log is kept in binder FM-2231."
)
HANDBOOK_QUESTION = "When is the emergency generator tested?"
_HANDBOOK_FILLER = (
    "Visitors sign in at reception and wear their badge at all times while on site.",
    "Desks are shared; please clear yours at the end of each day and lock your drawer.",
    "The canteen serves lunch from noon until two, and coffee is free in every kitchen.",
    "Report any damage to the service desk so that repairs can be planned quickly.",
    "Fire doors must stay closed; the assembly point is the lawn behind building A.",
    "Meeting rooms are booked through the calendar and released if unused for 15 minutes.",
)


def handbook_pages() -> list[PdfPage]:
    """A 4-page site handbook: six paragraphs a page, :data:`HANDBOOK_FACT` the fifth
    paragraph of page 3, so it is findable only by what the paragraph itself says."""
    import textwrap

    pages = []
    for number in range(1, 5):
        paragraphs = [
            f"Section {number}.{k + 1}. "
            + " ".join(_HANDBOOK_FILLER[(number + k + j) % 6] for j in range(3))
            for k in range(6)
        ]
        if number == 3:
            paragraphs[4] = f"Section 3.5. {HANDBOOK_FACT} {_HANDBOOK_FILLER[2]}"
        lines = [f"Site handbook, page {number}", ""]
        for para in paragraphs:
            lines += textwrap.wrap(para, 88) + [""]
        pages.append(PdfPage(lines, font_size=10))
    return pages


# The demo's scanned memo: a PDF page that is only a picture (no text layer).
MEMO_LINES = [
    "MEMO 2026-114",
    "",
    "To: all staff        From: facilities",
    "",
    "From 1 December the visitor car park closes at 19:00.",
    "Late visitors use gate 4 on Harbour Street and call",
    "security on extension 5120.",
]
MEMO_QUESTION = "When does the visitor car park close?"


def write_scanned_memo(path: Path, seed: int = 114) -> Path:
    """Write :data:`MEMO_LINES` as a one-page scanned PDF: pixels only, no text layer."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    page = text_image(MEMO_LINES, font_size=34, rng=random.Random(seed), scan=True)
    path.write_bytes(image_pdf_bytes([page]))
    return path


def write_pdf(path: Path, pages: list[PdfPage] | None = None) -> Path:
    """Write ``pages`` (default: the demo report) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pdf_bytes(pages if pages is not None else REPORT_PAGES))
    return path


# The demo's clip: a blue square for 2 s, then a green triangle for 2 s (cut at 2.000 s).
CLIP_SEGMENTS: list[tuple[str, str, float]] = [("blue", "square", 2.0), ("green", "triangle", 2.0)]


def video_bytes(
    segments: list[tuple[str, str, float]] | None = None,
    fps: int = 10,
    size: int = 128,
    seed: int = 5,
    container: str = "mp4",
    codec: str = "mpeg4",
) -> bytes:
    """An MPEG-4 video (PyAV) of still shapes, one per (colour, shape, seconds) segment."""
    import av

    segments = segments if segments is not None else CLIP_SEGMENTS
    rng = random.Random(seed)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as out:
        stream = out.add_stream(codec, rate=fps)
        assert isinstance(stream, av.VideoStream)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for colour, shape, seconds in segments:
            frame = av.VideoFrame.from_image(render(colour, shape, rng, size))
            for _ in range(max(1, round(seconds * fps))):
                for packet in stream.encode(frame):
                    out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()


def write_video(
    path: Path, segments: list[tuple[str, str, float]] | None = None, **kw: Any
) -> Path:
    """Write a video of ``segments`` (default: the demo clip) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(video_bytes(segments, **kw))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--per-class", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--format", default="png", choices=sorted(FORMATS))
    parser.add_argument(
        "--with-media",
        action="store_true",
        help="also write quarterly-report.pdf (red circle on page 2) and shapes-clip.mp4",
    )
    args = parser.parse_args(argv)
    pairs = write_corpus(args.directory, args.per_class, args.seed, args.size, args.format)
    print(f"wrote {len(pairs)} images to {args.directory}")
    if args.with_media:
        write_pdf(args.directory / "quarterly-report.pdf")
        write_video(args.directory / "shapes-clip.mp4")
        print("wrote quarterly-report.pdf and shapes-clip.mp4")


if __name__ == "__main__":
    main()
