"""PDF pages as chunks: each page rendered (pypdfium2) plus its text, cut into passages.

Each page becomes an image chunk ``page:N`` (1-based; no snippet: its words live in its
passages) and, when the page has words, one text chunk per passage, ``page:N:p:K``
(activities/media/passages.py), embedded with CLIP's text tower and snippet of its own, so
a question can match a page by what it shows or a passage by what it says. The words are
the page's text layer or, when that is empty or thin (a scan; fewer than
``ocr_min_text_chars`` letters and digits), what OCR reads on the page rendered again at
``ocr_max_side`` pixels (activities/media/ocr.py); each passage's ``origin`` says which.

Bounds: the page count is checked before any page is touched (``pdf_max_pages``: a PDF
with thousands of pages is refused, not rendered), every page is rendered so that its
longer side is ``render_max_side`` pixels whatever size the page declares, and text is
cut to ``PAGE_TEXT_CHARS`` per page; OCR has its own time budget per document. Time and
memory of a hostile page are bounded by the decoder sandbox that runs this module in the
worker.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from activities.media.formats import (
    MAX_TEXT_CHARS,
    OCR,
    TEXT_LAYER,
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
from activities.media.ocr import OcrBudget, budget_for
from activities.media.passages import passages

# PDFium is not thread-safe: one call into it at a time per process. (The sandbox runs one
# document per process anyway; this guards in-process use such as the fuzz tests.)
_PDFIUM = threading.RLock()
_MAX_SCALE = 4.0  # a tiny page is rendered at most 4x (288 dpi)
_PAPER = (255, 255, 255)
PAGE_TEXT_CHARS = 4 * MAX_TEXT_CHARS  # a dense page's whole text: every passage is findable

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
        budget = budget_for(limits, float(cursor.get("ocr_s", 0.0)))
        for index in range(max(0, start), count):
            with _PDFIUM:
                chunks = _page_chunks(pdf, index, limits, budget)
            cursor_out = {"page": index + 1, "ocr_s": round(budget.spent_s, 3)}
            yield Step(chunks, cursor_out, note=budget.take_note())
    finally:
        with _PDFIUM:
            pdf.close()


def _page_chunks(pdf: Any, index: int, limits: MediaLimits, budget: OcrBudget) -> list[MediaChunk]:
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
            text = clean_text(textpage.get_text_range(), PAGE_TEXT_CHARS)
        finally:
            textpage.close()
        origin = TEXT_LAYER
        if budget.enabled and sum(c.isalnum() for c in text) < limits.ocr_min_text_chars:
            read = _ocr_page(page, number, width, height, limits, budget)
            if len(read) > len(text):
                text, origin = read, OCR
    finally:
        page.close()
    chunks = [MediaChunk(f"page:{number}", image=pad_square(image, _PAPER))]
    size, overlap = limits.passage_tokens, limits.passage_overlap_tokens
    for k, passage in enumerate((p for p in passages(text, size, overlap) if has_words(p)), 1):
        chunks.append(
            MediaChunk(f"page:{number}:p:{k}", text=passage, snippet=passage, origin=origin)
        )
    return chunks


def _ocr_page(
    page: Any, number: int, width: float, height: float, limits: MediaLimits, budget: OcrBudget
) -> str:
    """A scanned (or text-less) page's words: rendered at ``ocr_max_side`` and read."""
    import pypdfium2 as pdfium

    scale = min(2 * _MAX_SCALE, limits.ocr_max_side / max(width, height))
    try:
        image = page.render(scale=scale, may_draw_forms=True).to_pil()
    except pdfium.PdfiumError:
        return ""  # rendered once already: the page's image chunk stands without its words
    return clean_text(budget.read(image, f"page {number}"), PAGE_TEXT_CHARS)
