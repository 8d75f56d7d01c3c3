"""The quality bench's labelled corpus (bench/quality_corpus.py) says where each answer is:
if a label were wrong, every recall figure in docs/quality.md would be wrong with it. The
corpus is generated the same way every time, and each document question's answer is in
the text layer of the page its label names and in no other page."""

from __future__ import annotations

import json
from pathlib import Path

import pypdfium2

from bench.quality_corpus import SLICES, generate


def _page_texts(path: Path) -> list[str]:
    pdf = pypdfium2.PdfDocument(str(path))
    try:
        return [" ".join(pdf[i].get_textpage().get_text_range().split()) for i in range(len(pdf))]
    finally:
        pdf.close()


def test_corpus_labels_point_at_the_answer(tmp_path: Path) -> None:
    corpus = generate(tmp_path / "a", seed=15, scale=0.25)
    assert {q.slice for q in corpus.questions} == set(SLICES)
    assert len({q.question for q in corpus.questions}) == len(corpus.questions)
    for q in corpus.questions:
        assert (corpus.root / q.asset).is_file(), q
        if q.kind == "pdf":
            texts = _page_texts(corpus.root / q.asset)
            pages = [i + 1 for i, text in enumerate(texts) if q.answer in text]
            assert pages == [q.page], (q, pages)
        if q.kind == "scan-pdf":  # a scan: the words exist only as pixels
            assert not any(_page_texts(corpus.root / q.asset)), q
        if q.kind == "video":
            assert 0 <= q.frame_from < q.frame_to
    manifest = json.loads((corpus.root / "questions.json").read_text())
    assert len(manifest["questions"]) == len(corpus.questions)
    assert sum(manifest["pages_by_folder"].values()) == corpus.pages


def test_same_seed_same_corpus(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", seed=3, scale=0.1)
    b = generate(tmp_path / "b", seed=3, scale=0.1)
    assert [q.question for q in a.questions] == [q.question for q in b.questions]
    for q in a.questions:
        assert (a.root / q.asset).read_bytes() == (b.root / q.asset).read_bytes(), q.asset
