"""Re-ranking of search hits for ``Ask``: CLIP similarity fused with how well each chunk's
words (snippet, file name, tags) match the question, so a text query finds the image whose
caption names it even when pixels alone rank it lower."""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from urllib.parse import unquote

RERANK_POOL = 4  # candidates fetched per requested result when re-ranking
TEXT_WEIGHT = 0.35  # weight of the caption/snippet match in the fused re-rank score
_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset(
    [
        "a",
        "an",
        "the",
        "of",
        "on",
        "in",
        "at",
        "to",
        "and",
        "or",
        "is",
        "are",
        "with",
        "for",
        "by",
        "from",
        "this",
        "that",
        "what",
        "which",
    ]
)


def caption_of(hit: dict[str, object]) -> str:
    """The words a chunk carries besides its pixels: snippet, file name and tags."""
    name = PurePosixPath(unquote(str(hit.get("uri", "")))).stem.replace("-", " ").replace("_", " ")
    tags = " ".join(str(t) for t in hit.get("tags") or [])  # type: ignore[attr-defined]
    return " ".join(p for p in (str(hit.get("snippet") or ""), name, tags) if p)


def _terms(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP}


def rerank(question: str, hits: list[dict[str, object]]) -> list[dict[str, object]]:
    """Cross-modal score fusion: CLIP similarity fused with the query's match of each
    chunk's caption (snippet, file name, tags); stable for ties."""
    query = _terms(question)
    if not query:
        return hits
    for hit in hits:
        overlap = len(query & _terms(caption_of(hit))) / len(query)
        hit["fused"] = (1 - TEXT_WEIGHT) * float(hit["score"]) + TEXT_WEIGHT * overlap  # type: ignore[arg-type]
    return sorted(hits, key=lambda h: -float(h["fused"]))  # type: ignore[arg-type]
