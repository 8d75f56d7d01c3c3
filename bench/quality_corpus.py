"""A labelled retrieval corpus the repository generates: files, and questions whose answer
locations are known.

Why generated: a quality figure needs questions with one known right place (an asset and
its page, passage or frame), and real user content cannot ship with the repository. Every
file is drawn from one seeded ``random.Random``, so a seed names a corpus, byte for byte.

Four slices, each what issue 15 says retrieval missed:

- **documents**: multi-page PDFs with a real text layer; each fact sits in a deep
  paragraph (the fourth or later) of page 2 or 3, among paragraphs of shared filler prose
  built from the same nouns ("pump", "invoice", "warehouse"), so only the fact's own names
  and codes single it out;
- **scans**: text that exists only as pixels: scanned pages as PNG images, scanned PDFs
  with no text layer (the fact on page 2), slides and screenshots;
- **photos**: synthetic shapes (``starters.synthetic_corpus.render``) with neutral file
  names (``IMG_0042.png``), ingested one album at a time with the tag ``album=NAME``; a
  question names a colour, a shape and an album, and exactly one photo is all three;
- **frames**: short videos of text cards (a new background per card, so each cut is a
  scene change); the fact is on the second or third card.

Names, codes and places in facts are made-up words (``Quenmark``, ``KV-48213``), unique in
the corpus, as a user's own project names and part numbers are.

    .venv/bin/python bench/quality_corpus.py DIR [--seed 15] [--scale 1.0]

writes the files under DIR and ``DIR/questions.json``. ``bench/quality.py`` ingests and asks.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path

# The repository root instead of bench/ on the path: bench/http.py must not shadow the
# standard library's http when this file runs as a script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from starters.synthetic_corpus import (  # noqa: E402
    CLASSES,
    PdfPage,
    image_pdf_bytes,
    pdf_bytes,
    render,
    text_image,
    text_video_bytes,
)

SLICES = ("documents", "scans", "photos", "frames")
ALBUMS = ("harbour", "orchard", "garage", "library", "stadium", "bakery")
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]

# Filler prose: the nouns the facts use, so a question's ordinary words match everywhere.
_SUBJECTS = (
    "The pump station",
    "Each warehouse",
    "The regional office",
    "The maintenance team",
    "Every invoice",
    "The compressor line",
    "The project board",
    "The supplier",
    "The audit",
    "The quarterly review",
    "The training programme",
    "The site manager",
)
_VERBS = (
    "reviews",
    "records",
    "schedules",
    "inspects",
    "reports on",
    "updates",
    "approves",
    "tracks",
    "documents",
    "summarises",
)
_OBJECTS = (
    "the delivery plan for the next period",
    "spare parts and seals for older equipment",
    "access badges and visitor registrations",
    "energy use across all buildings",
    "pallet counts and storage capacity",
    "the payment terms agreed with customers",
    "safety checks on pumps and valves",
    "staff rotas and overtime",
    "open tickets from the service desk",
    "commissioning dates of new installations",
)
_TAILS = (
    "as agreed in the previous meeting.",
    "before the end of each month.",
    "according to the standard procedure.",
    "with help from the central team.",
    "and shares the results with all departments.",
    "unless the board decides otherwise.",
    "so that nothing is lost between shifts.",
    "in line with the regional guidelines.",
)


@dataclass
class Question:
    """A question and where its answer is: ``asset`` (path relative to the corpus root),
    ``page`` (1-based, 0 for no page), ``frame_from``/``frame_to`` (seconds, for frames)."""

    id: str
    slice: str
    kind: str  # pdf | scan-png | scan-pdf | slide | screenshot | photo | video
    question: str
    answer: str
    asset: str
    page: int = 0
    frame_from: float = -1.0
    frame_to: float = -1.0
    ocr_needed: bool = False


@dataclass
class Corpus:
    root: Path
    questions: list[Question]
    ingests: list[tuple[str, dict[str, str]]]  # (sub-directory, tags): one IngestBatch each
    items: int
    pages: int
    pages_by_folder: dict[str, int]

    def manifest(self) -> dict[str, object]:
        return {
            "items": self.items,
            "pages": self.pages,
            "pages_by_folder": self.pages_by_folder,
            "ingests": [{"dir": d, "tags": t} for d, t in self.ingests],
            "questions": [asdict(q) for q in self.questions],
        }


class _Names:
    """Made-up words and codes, never the same twice."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def word(self) -> str:
        onsets = [
            "b",
            "br",
            "d",
            "dr",
            "f",
            "g",
            "gr",
            "k",
            "kr",
            "l",
            "m",
            "n",
            "p",
            "pr",
            "qu",
            "r",
            "s",
            "st",
            "t",
            "tr",
            "v",
            "w",
            "z",
        ]
        vowels = ["a", "e", "i", "o", "u", "ai", "ou"]
        codas = ["", "", "n", "r", "l", "s", "th", "x"]
        while True:
            w = "".join(
                self.rng.choice(onsets) + self.rng.choice(vowels) + self.rng.choice(codas)
                for _ in range(self.rng.choice((2, 3)))
            ).capitalize()
            if w not in self.used and 6 <= len(w) <= 12:
                self.used.add(w)
                return w

    def code(self, prefix: str) -> str:
        while True:
            c = f"{prefix}-{self.rng.randint(10000, 99999)}"
            if c not in self.used:
                self.used.add(c)
                return c

    def person(self) -> str:
        return f"{self.word()} {self.word()}"

    def date(self) -> str:
        return f"{self.rng.randint(1, 28)} {self.rng.choice(MONTHS)} {self.rng.randint(2015, 2026)}"


def _fact(names: _Names) -> tuple[str, str, str]:
    """One fact sentence, a question about it and the answer's key words."""
    rng = names.rng
    kind = rng.randrange(8)
    n = names.word()
    if kind == 0:
        d, p = names.date(), names.person()
        return (
            f"The {n} pump station was commissioned on {d} by the engineer {p}.",
            f"When was the {n} pump station commissioned?",
            d,
        )
    if kind == 1:
        code, company = names.code("INV"), names.word()
        amount = f"{rng.randint(1, 99)},{rng.randint(100, 999)} EUR"
        return (
            f"Invoice {code} from {company} Traders totals {amount} and is payable in 30 days.",
            f"What is the total of invoice {code}?",
            amount,
        )
    if kind == 2:
        pn = names.code(rng.choice(("PN", "KV", "SX", "TR")))
        return (
            f"Part number {pn} is the replacement seal for the {n} compressor.",
            f"Which part number is the replacement seal for the {n} compressor?",
            pn,
        )
    if kind == 3:
        count, product = rng.randint(120, 4800), rng.choice(("copper wire", "olive oil", "tiles"))
        return (
            f"The {n} warehouse currently stores {count} pallets of {product}.",
            f"How many pallets does the {n} warehouse store?",
            str(count),
        )
    if kind == 4:
        p = names.person()
        return (
            f"Access badges for the {n} office are issued by {p} on the second floor.",
            f"Who issues access badges for the {n} office?",
            p,
        )
    if kind == 5:
        hours = rng.randint(3, 72)
        return (
            f"The {n} valve must be inspected every {hours} hours after a pressure alarm.",
            f"How often must the {n} valve be inspected after a pressure alarm?",
            f"{hours} hours",
        )
    if kind == 6:
        town = names.word()
        return (
            f"The {n} project moves its assembly line to {town} in the autumn.",
            f"Where does the {n} project move its assembly line?",
            town,
        )
    budget = f"{rng.randint(2, 90)}0,000 EUR"
    return (
        f"The training budget of the {n} department is {budget} for next year.",
        f"What is the training budget of the {n} department?",
        budget,
    )


def _paragraph(rng: random.Random, sentences: int = 3) -> str:
    return " ".join(
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
        for _ in range(sentences)
    )


def _page_lines(paragraphs: list[str], width: int = 88) -> list[str]:
    lines: list[str] = []
    for para in paragraphs:
        lines += textwrap.wrap(para, width) + [""]
    return lines


def generate(root: Path, seed: int = 15, scale: float = 1.0) -> Corpus:
    """Write the corpus under ``root`` and return its questions. ``scale`` multiplies every
    count (0.25 for a quick run; at 1.0: ~230 items, ~120 questions)."""
    rng = random.Random(seed)
    names = _Names(rng)
    root = Path(root)
    questions: list[Question] = []
    items = pages = 0

    def count(n: int) -> int:
        return max(1, round(n * scale))

    # -- documents: 3-page PDFs, the fact deep on page 2 or 3 -------------------------------
    docs = root / "documents"
    docs.mkdir(parents=True, exist_ok=True)
    n_docs, n_facts = count(50), count(40)
    for i in range(n_docs):
        fact_page = rng.choice((2, 3)) if i < n_facts else 0
        pdf_pages = []
        for page in (1, 2, 3):
            paragraphs = [_paragraph(rng) for _ in range(6)]
            if page == fact_page:
                fact, question, answer = _fact(names)
                slot = rng.randint(3, 5)  # the 4th to 6th paragraph
                paragraphs[slot] = f"{_paragraph(rng, 1)} {fact} {_paragraph(rng, 1)}"
                name = f"documents/report-{i:03d}.pdf"
                questions.append(
                    Question(f"doc-{i:03d}", "documents", "pdf", question, answer, name, page)
                )
            pdf_pages.append(PdfPage(_page_lines(paragraphs), font_size=10))
        (docs / f"report-{i:03d}.pdf").write_bytes(pdf_bytes(pdf_pages))
        items, pages = items + 1, pages + 3

    # -- scans: PNG pages, scanned PDFs, slides, screenshots -------------------------------
    scans = root / "scans"
    scans.mkdir(parents=True, exist_ok=True)
    n_png, n_png_facts = count(25), count(15)
    for i in range(n_png):
        lines = [f"Memo {rng.randint(100, 999)}", ""]
        lines += textwrap.wrap(_paragraph(rng, 4), 64)
        if i < n_png_facts:
            fact, question, answer = _fact(names)
            lines += [""] + textwrap.wrap(fact, 64)
            questions.append(
                Question(
                    f"scan-{i:03d}",
                    "scans",
                    "scan-png",
                    question,
                    answer,
                    f"scans/scan-{i:03d}.png",
                    ocr_needed=True,
                )
            )
        lines += [""] + textwrap.wrap(_paragraph(rng, 2), 64)
        text_image(lines, rng=rng, scan=True).save(scans / f"scan-{i:03d}.png")
        items, pages = items + 1, pages + 1
    for i in range(count(8)):
        first = text_image(
            ["Scanned record", ""] + textwrap.wrap(_paragraph(rng, 5), 64), rng=rng, scan=True
        )
        fact, question, answer = _fact(names)
        second_lines = textwrap.wrap(_paragraph(rng, 3), 64) + [""] + textwrap.wrap(fact, 64)
        second = text_image(second_lines, rng=rng, scan=True)
        (scans / f"scanned-{i:03d}.pdf").write_bytes(image_pdf_bytes([first, second]))
        questions.append(
            Question(
                f"scanpdf-{i:03d}",
                "scans",
                "scan-pdf",
                question,
                answer,
                f"scans/scanned-{i:03d}.pdf",
                2,
                ocr_needed=True,
            )
        )
        items, pages = items + 1, pages + 2
    for kind, size, font in (("slide", (1280, 720), 40), ("screenshot", (1280, 800), 24)):
        for i in range(count(8)):
            fact, question, answer = _fact(names)
            if kind == "slide":
                lines = [f"Quarterly update {i + 1}", ""] + textwrap.wrap(fact, 48)
            else:
                lines = ["Service desk - ticket view", "Status: open   Priority: normal", ""]
                lines += textwrap.wrap(fact, 80) + ["", "[ Close ]   [ Reply ]   [ Escalate ]"]
            text_image(lines, size, font, margin=60).save(scans / f"{kind}-{i:03d}.png")
            questions.append(
                Question(
                    f"{kind}-{i:03d}",
                    "scans",
                    kind,
                    question,
                    answer,
                    f"scans/{kind}-{i:03d}.png",
                    ocr_needed=True,
                )
            )
            items, pages = items + 1, pages + 1

    # -- photos: one album per ingest, tagged album=NAME; neutral file names ---------------
    ingests: list[tuple[str, dict[str, str]]] = [("documents", {}), ("scans", {})]
    photo_no = 0
    photo_index: list[tuple[str, str, str, str]] = []
    for album in ALBUMS:
        folder = root / "photos" / album
        folder.mkdir(parents=True, exist_ok=True)
        for colour, shape in CLASSES:
            name = f"IMG_{photo_no:04d}.png"
            render(colour, shape, rng, 64).save(folder / name)
            photo_index.append((album, colour, shape, f"photos/{album}/{name}"))
            photo_no += 1
            items, pages = items + 1, pages + 1
        ingests.append((f"photos/{album}", {"album": album}))
    for k, (album, colour, shape, path) in enumerate(rng.sample(photo_index, count(24))):
        questions.append(
            Question(
                f"photo-{k:03d}",
                "photos",
                "photo",
                f"the photo of a {colour} {shape} in the {album} album",
                f"{colour} {shape}, album {album}",
                path,
            )
        )

    # -- frames: text-card videos, the fact on card 2 or 3 ---------------------------------
    videos = root / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    backgrounds = [(30, 60, 140), (240, 200, 40), (20, 120, 70), (150, 30, 40), (230, 230, 225)]
    card_s = 3.0
    for i in range(count(20)):
        fact_card = rng.choice((1, 2))
        cards = []
        colours = rng.sample(backgrounds, 3)
        for c in range(3):
            if c == fact_card:
                fact, question, answer = _fact(names)
                lines = textwrap.wrap(fact, 34)
            else:
                lines = [f"Site briefing {i + 1}", f"part {c + 1} of 3"]
            cards.append((lines, colours[c], card_s))
        (videos / f"briefing-{i:03d}.mp4").write_bytes(text_video_bytes(cards))
        questions.append(
            Question(
                f"frame-{i:03d}",
                "frames",
                "video",
                question,
                answer,
                f"videos/briefing-{i:03d}.mp4",
                frame_from=fact_card * card_s - 0.5,
                frame_to=(fact_card + 1) * card_s,
                ocr_needed=True,
            )
        )
        items, pages = items + 1, pages + 3
    ingests.append(("videos", {}))

    by_folder = {"documents": 3 * n_docs, "videos": 3 * count(20)}
    by_folder["scans"] = n_png + 2 * count(8) + 2 * count(8)
    by_folder |= {f"photos/{album}": len(CLASSES) for album in ALBUMS}
    corpus = Corpus(root, questions, ingests, items, pages, by_folder)
    (root / "questions.json").write_text(json.dumps(corpus.manifest(), indent=1))
    return corpus


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args(argv)
    corpus = generate(args.directory, args.seed, args.scale)
    by_slice = {s: sum(1 for q in corpus.questions if q.slice == s) for s in SLICES}
    print(
        f"wrote {corpus.items} items ({corpus.pages} pages, images and keyframes) and "
        f"{len(corpus.questions)} questions {by_slice} to {args.directory}"
    )


if __name__ == "__main__":
    main()
