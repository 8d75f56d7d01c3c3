"""PDF pages as chunks: each page rendered (pypdfium2) plus its text layer.

Each page becomes an image chunk ``page:N`` (1-based) whose snippet is the page's text, and,
when the page has words, a text chunk ``page:N:text`` embedded with CLIP's text tower, so a
question can match a page by what it shows or by what it says.

Bounds: the page count is checked before any page is touched (``pdf_max_pages``: a PDF
with thousands of pages is refused, not rendered), every page is rendered so that its
longer side is ``render_max_side`` pixels whatever size the page declares, and text is
cut to ``media.MAX_TEXT_CHARS`` per page. Time and memory of a hostile page are bounded
by the decoder sandbox that runs this module in the worker.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from activities.media.formats import (
    BadMediaError,
    MediaChunk,
    MediaInput,
    MediaLimits,
    Step,
    clean_text,
    finite_positive,
    has_words,
)
from activities.media.images import pad_square

# PDFium is not thread-safe: one call into it at a time per process. (The sandbox runs one
# document per process anyway; this guards in-process use such as the fuzz tests.)
_PDFIUM = threading.RLock()
_MAX_SCALE = 4.0  # a tiny page is rendered at most 4x (288 dpi)
_PAPER = (255, 255, 255)

_OPEN_ERRORS = {
    4: (
        "encrypted PDF: it is protected by a password; save an unprotected copy (for example "
        "`qpdf --decrypt --password=... in.pdf out.pdf`) and ingest that"
    ),
    5: (
        "encrypted PDF with an unsupported security handler; save an unprotected copy and "
        "ingest that"
    ),
    3: (
        "corrupt PDF: it cannot be parsed ({detail}); repair or re-export it "
        "(e.g. `qpdf in.pdf out.pdf`)"
    ),
    2: "corrupt PDF: the file cannot be read ({detail}); re-upload it",
}


def iter_pdf(source: MediaInput, limits: MediaLimits, cursor: dict[str, Any]) -> Iterator[Step]:
    """One step per page from ``cursor["page"]`` (the number of pages already done)."""
    import pypdfium2 as pdfium

    with _PDFIUM:
        try:
            pdf = pdfium.PdfDocument(source if isinstance(source, bytes) else str(Path(source)))
        except pdfium.PdfiumError as e:
            template = _OPEN_ERRORS.get(
                getattr(e, "err_code", None) or 0, "corrupt PDF: it cannot be opened ({detail})"
            )
            raise BadMediaError(template.format(detail=str(e).rstrip("."))) from e
    try:
        with _PDFIUM:
            count = len(pdf)
        if count == 0:
            raise BadMediaError("empty PDF: it has no pages")
        if count > limits.pdf_max_pages:
            raise BadMediaError(
                f"too many pages: the PDF has {count} pages, the limit is "
                f"{limits.pdf_max_pages} (page-bomb guard, MMRAG_PDF_MAX_PAGES); split the "
                "document or raise the limit"
            )
        start = int(cursor.get("page", 0))
        for index in range(max(0, start), count):
            with _PDFIUM:
                chunks = _page_chunks(pdf, index, limits)
            yield Step(chunks, {"page": index + 1})
    finally:
        with _PDFIUM:
            pdf.close()


def _page_chunks(pdf: Any, index: int, limits: MediaLimits) -> list[MediaChunk]:
    import pypdfium2 as pdfium

    number = index + 1
    try:
        page = pdf[index]
    except pdfium.PdfiumError as e:
        raise BadMediaError(f"corrupt PDF: page {number} cannot be loaded ({e})") from e
    try:
        width, height = page.get_size()
        if not (finite_positive(width) and finite_positive(height)):
            raise BadMediaError(f"corrupt PDF: page {number} declares a {width}x{height} size")
        scale = min(_MAX_SCALE, limits.render_max_side / max(width, height))
        try:
            image = page.render(scale=scale, may_draw_forms=True).to_pil().convert("RGB")
        except pdfium.PdfiumError as e:
            raise BadMediaError(f"corrupt PDF: page {number} cannot be rendered ({e})") from e
        textpage = page.get_textpage()
        try:
            text = clean_text(textpage.get_text_range())
        finally:
            textpage.close()
    finally:
        page.close()
    chunks = [MediaChunk(f"page:{number}", image=pad_square(image, _PAPER), snippet=text)]
    if has_words(text):
        chunks.append(MediaChunk(f"page:{number}:text", text=text, snippet=text))
    return chunks
