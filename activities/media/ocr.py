"""OCR inside the decoder sandbox: Tesseract (Debian's ``tesseract-ocr``, its English model
shipped by the package: nothing is downloaded at run time) on what is likely to carry text.

Why Tesseract: measured on rendered scans, slides, screenshots, signs in photos and video
frames (bench/ocr.py, docs/media.md "OCR"), it read 99-100 % of the words of documents,
slides, screenshots and frames, where ``rapidocr-onnxruntime``'s shipped models (trained on
Chinese and English) read 50-71 % of a scan's or screenshot's words, gluing neighbouring
English words into one (``sensorsafetygallery``): useless to a lexical index, which needs
exact words and part numbers. RapidOCR was faster (~3x) and better on rotated signs over
clutter, where Tesseract reads little; that trade is recorded in docs/media.md.

Where it runs (all inside the sandboxed child, never in the worker):

- a PDF page whose text layer is empty or thin (fewer than ``ocr_min_text_chars`` letters
  and digits): the page rendered again at ``ocr_max_side`` pixels, read, and its text cut
  into passages like a text layer;
- an image or a video keyframe that :func:`text_likely` says shows text (a few
  milliseconds on a small greyscale copy), read at up to ``ocr_max_side`` pixels.

Every object has ``ocr_time_budget_s`` of OCR in all and each page, image or frame at most
``ocr_page_timeout_s``; what the budget leaves unread is named in the asset's note. A
Tesseract that fails or times out costs that page its OCR text, never the asset.
``MMRAG_OCR_ENABLED=false`` turns it all off.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from activities.media.formats import MAX_TEXT_CHARS, MediaLimits, clean_text, has_words

log = logging.getLogger(__name__)

TESSERACT = "tesseract"
# Words Tesseract itself is less sure of than this (0-100) are dropped: on photos its
# guesses at texture ("pAeE ek SES") would otherwise reach snippets and prompts.
MIN_WORD_CONFIDENCE = 55.0
# Tesseract's page segmentation: 3 = automatic layout (columns, blocks), the mode that
# read every document kind best in bench/ocr.py.
PAGE_SEGMENTATION = "3"
# Pictures smaller than this (longer side) are enlarged up to _MAX_UPSCALE before reading:
# Tesseract's layout analysis dropped half of a 640x360 frame's subtitle at its own size
# and read all of it at twice the size.
_MIN_OCR_SIDE = 1280
_MAX_UPSCALE = 2.5

# text_likely(): a tile of the greyscale copy "looks like text" when it has strong
# contrast, mostly near-black-or-white pixels (glyphs on a background), and most of its
# rows cross at least two strokes. Two such tiles are enough to try OCR.
_PRESENCE_SIDE = 640
_TILE = 24
_MIN_CONTRAST = 60
_MIN_BIMODAL = 0.75
_MIN_STROKE_ROWS = 0.25
_MIN_TEXT_TILES = 2


def tesseract_path() -> str:
    """The Tesseract binary on PATH, or "" when it is not installed."""
    return shutil.which(TESSERACT) or ""


def text_likely(image: Image.Image) -> bool:
    """A cheap check (~2-10 ms) that an image shows some text, run before OCR.

    It errs towards yes: a false positive costs one OCR call, a false negative loses the
    image's words. Measured on bench/ocr.py's corpus: every scan, slide, screenshot, sign
    and captioned frame passes; noise-textured photos, flat shapes and gradients do not.
    """
    grey = image.convert("L")
    grey.thumbnail((_PRESENCE_SIDE, _PRESENCE_SIDE))
    pixels = np.asarray(grey, dtype=np.int16)
    height, width = (d - d % _TILE for d in pixels.shape)
    if height == 0 or width == 0:
        return False
    tiles = (
        pixels[:height, :width]
        .reshape(height // _TILE, _TILE, width // _TILE, _TILE)
        .swapaxes(1, 2)
        .reshape(-1, _TILE * _TILE)
    )
    # The 2nd-darkest and 2nd-brightest pixel: a lone speck does not make contrast, and a
    # partial sort is ~10x cheaper than percentiles.
    ordered = np.partition(tiles, (1, tiles.shape[1] - 2), axis=1)
    low, high = ordered[:, 1], ordered[:, -2]
    contrast = high - low
    middle = ((low + high) / 2)[:, None]
    bimodal = (np.abs(tiles - middle) > contrast[:, None] * 0.3).mean(axis=1)
    dark = tiles < middle
    ink = dark.mean(axis=1)
    rows = dark.reshape(-1, _TILE, _TILE)
    strokes = ((rows[:, :, 1:] != rows[:, :, :-1]).sum(axis=2) >= 4).mean(axis=1)
    textish = (
        (contrast > _MIN_CONTRAST)
        & (bimodal > _MIN_BIMODAL)
        & (ink > 0.04)
        & (ink < 0.96)
        & (strokes > _MIN_STROKE_ROWS)
    )
    return int(textish.sum()) >= _MIN_TEXT_TILES


def recognise(image: Image.Image, languages: str, timeout_s: float) -> str:
    """The words Tesseract reads in ``image`` (lines joined by spaces, cleaned), "" when
    none; ``subprocess.TimeoutExpired`` after ``timeout_s``, ``OSError`` or
    ``subprocess.CalledProcessError`` when Tesseract cannot run."""
    grey = image.convert("L")
    longer = max(grey.size)
    if 0 < longer < _MIN_OCR_SIDE:  # small text (a 640x360 frame's subtitle): Tesseract
        scale = min(_MAX_UPSCALE, _MIN_OCR_SIDE / longer)  # reads it at twice the size
        grey = grey.resize(
            (round(grey.width * scale), round(grey.height * scale)), Image.Resampling.BICUBIC
        )
    header = f"P5\n{grey.width} {grey.height}\n255\n".encode()
    done = subprocess.run(
        [TESSERACT, "stdin", "stdout", "-l", languages, "--psm", PAGE_SEGMENTATION, "tsv"],
        input=header + grey.tobytes(),
        capture_output=True,
        timeout=max(0.1, timeout_s),
        check=True,
    )
    return _tsv_text(done.stdout.decode("utf-8", "replace"))


def _tsv_text(tsv: str) -> str:
    """Tesseract's TSV (one row per word with its confidence) as text: confident words in
    reading order, one space between words and lines."""
    lines: dict[tuple[str, str, str], list[str]] = {}
    for row in tsv.splitlines()[1:]:
        cols = row.split("\t")
        if len(cols) < 12 or cols[0] != "5" or not cols[11].strip():
            continue
        try:
            confidence = float(cols[10])
        except ValueError:
            continue
        if confidence >= MIN_WORD_CONFIDENCE:
            lines.setdefault((cols[2], cols[3], cols[4]), []).append(cols[11].strip())
    text = clean_text(" ".join(" ".join(words) for words in lines.values()), 4 * MAX_TEXT_CHARS)
    return text if has_words(text) else ""


@dataclass
class OcrBudget:
    """One object's OCR time: ``total_s`` in all, ``per_call_s`` per page/image/frame.

    ``spent_s`` travels in a PDF's or video's cursor, so a resumed decode keeps the budget
    it had. :meth:`take_note` says once that the budget ran out and once that OCR failed,
    for the asset's note (never once per page).
    """

    enabled: bool
    languages: str
    total_s: float
    per_call_s: float
    spent_s: float = 0.0
    _events: list[str] = field(default_factory=list)
    _said: set[str] = field(default_factory=set)

    def read(self, image: Image.Image, where: str) -> str:
        """OCR ``image`` (``where``: "page 3", "the image", "frame 12.500 s") within what
        is left of the budget; "" when off, spent or failed."""
        if not self.enabled:
            return ""
        left = min(self.per_call_s, self.total_s - self.spent_s)
        if left <= 0:
            self._event(
                "spent",
                f"OCR time budget spent ({self.total_s:g} s, MMRAG_OCR_TIME_BUDGET_S): "
                f"text from {where} on was not read",
            )
            return ""
        started = time.monotonic()
        try:
            return recognise(image, self.languages, left)
        except subprocess.TimeoutExpired:
            self._event("failed", f"OCR of {where} stopped after {left:g} s")
            return ""
        except (OSError, subprocess.CalledProcessError) as e:
            detail = getattr(e, "stderr", b"") or b""
            words = detail.decode("utf-8", "replace").strip().splitlines()[-1:] or [str(e)]
            self._event("failed", f"OCR of {where} failed ({words[0][:120]})")
            return ""
        finally:
            self.spent_s += time.monotonic() - started

    def _event(self, kind: str, words: str) -> None:
        if kind not in self._said:
            self._said.add(kind)
            self._events.append(words)

    def take_note(self) -> str:
        """What happened since the last call that the asset's note should say, or ""."""
        events, self._events = self._events, []
        return "; ".join(events)


def read_if_text(
    image: Image.Image, full: Callable[[], Image.Image], budget: OcrBudget, where: str
) -> str:
    """The words in an image or frame: :func:`text_likely` on ``image`` (the small copy
    already decoded for the encoder) first, and only then OCR on ``full()`` (the same
    picture at up to ``ocr_max_side`` pixels), so a photo without text costs milliseconds."""
    if not budget.enabled or not text_likely(image):
        return ""
    return budget.read(full(), where)


def budget_for(limits: MediaLimits, spent_s: float = 0.0) -> OcrBudget:
    """An object's OCR budget from its limits (``spent_s`` from a resumed cursor)."""
    return OcrBudget(
        enabled=limits.ocr_enabled,
        languages=limits.ocr_languages,
        total_s=limits.ocr_time_budget_s,
        per_call_s=limits.ocr_page_timeout_s,
        spent_s=max(0.0, spent_s),
    )


_warned_missing = False
_LANGUAGES = re.compile(r"[A-Za-z0-9_]+(?:\+[A-Za-z0-9_]+)*")


def _check_languages(languages: str) -> None:
    """Refuse (at worker start) languages Tesseract cannot read: a typo, or a language whose
    Debian package is not installed; else every page would fail its OCR one by one."""
    if not _LANGUAGES.fullmatch(languages):
        raise ValueError(
            f"MMRAG_OCR_LANGUAGES={languages!r}: Tesseract language codes joined by '+', "
            "e.g. eng or eng+deu"
        )
    listed = subprocess.run(
        [TESSERACT, "--list-langs"], capture_output=True, text=True, timeout=30, check=False
    )
    installed = set(listed.stdout.split()[1:] if listed.returncode == 0 else [])
    missing = [lang for lang in languages.split("+") if lang not in installed]
    if missing:
        raise ValueError(
            f"MMRAG_OCR_LANGUAGES={languages!r}: Tesseract has no {', '.join(missing)} model "
            f"here; install {' '.join('tesseract-ocr-' + m.lower() for m in missing)} "
            "(apt-get) or change the setting"
        )


def ocr_limits(limits: MediaLimits) -> MediaLimits:
    """``limits`` as a worker can honour them: OCR off, with one warning, where Tesseract
    is not installed (the worker still ingests; pages and pictures just keep no OCR text).
    """
    global _warned_missing
    if not limits.ocr_enabled:
        return limits
    if tesseract_path():
        _check_languages(limits.ocr_languages)
        return limits
    if not _warned_missing:
        _warned_missing = True
        log.warning(
            "OCR is off: no `tesseract` on PATH; install Debian's tesseract-ocr "
            "(`apt-get install tesseract-ocr`) or set MMRAG_OCR_ENABLED=false to silence this"
        )
    return dataclasses.replace(limits, ocr_enabled=False)


def ocr_allowance_s(limits: MediaLimits) -> float:
    """Time added to a PDF's or video's decode time limit for its OCR budget, so OCR never
    makes a document fail that decodes in time. (An image's OCR, at most
    ``ocr_page_timeout_s``, counts within its own decode limit.)"""
    return limits.ocr_time_budget_s if limits.ocr_enabled else 0.0
