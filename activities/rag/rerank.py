"""Ranking of an Ask's candidates: the two retrieval legs fused by reciprocal rank fusion,
then re-ranked by how much of the question each chunk's own words hold.

- **Search hits are typed** (:class:`SearchHit`), from Milvus (dense) and from the lexical
  index alike, through fusion, re-ranking and the prompt.
- **Reciprocal rank fusion** (:func:`fuse_rrf`): each leg gives a chunk
  ``weight_leg / (k + rank_leg)``, a lexical hit's scaled by its share of the question's
  words relative to the best lexical hit's; the fused score is the best leg's plus a share
  of the other's (MMRAG_FUSION_AGREEMENT; 1 is the classic sum). Ranks, not scores: a
  cosine and a ``ts_rank`` are not on one scale. Why not the plain sum (measured in
  docs/retrieval.md): where one leg is noise, the chunks it ranks high that the other leg
  also returned somewhere bury the one chunk the strong leg is sure of, and fusion must not
  lose what one leg finds when the other is weak. The weights and ``k`` are settings
  (MMRAG_FUSION_DENSE_WEIGHT, MMRAG_FUSION_LEXICAL_WEIGHT, MMRAG_RRF_K).
- **Re-ranking** (:func:`rerank`): the fused score (scaled to the best candidate's) blended
  with the share of the question's words found in the chunk's text, caption and tags. Never
  the file name: a name such as ``IMG_2034`` says nothing of the content, and a descriptive
  one is already searchable by the lexical leg.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

RERANK_POOL = 4  # candidates fetched per requested result when re-ranking
TEXT_WEIGHT = 0.35  # weight of the question's match of the chunk's words in the re-rank score
_WORD = re.compile(r"[^\W_]+")
_STOP = frozenset(
    {
        *("a", "an", "the", "of", "on", "in", "at", "to", "and", "or", "is", "are", "was"),
        *("were", "be", "with", "for", "by", "from", "this", "that", "what", "which", "who"),
        *("whom", "whose", "when", "where", "why", "how", "does", "do", "did", "it", "its"),
        "as",
    }
)

DENSE = "dense"
LEXICAL = "lexical"


@dataclass
class SearchHit:
    """One candidate chunk of an Ask.

    ``snippet`` is the chunk's text (a passage, a page's text, OCR text); ``caption`` a
    captioner's description of an image or frame; ``origin`` where the text came from
    ("ocr", "text-layer", ""); ``tags`` as stored (``key=value``). ``dense_score`` is the
    CLIP cosine, ``lexical_score`` the lexical rank, each None when that leg did not find
    the chunk; ``score`` is the fused (then re-ranked) score shown to the user."""

    asset_id: str
    chunk: str
    uri: str
    media_type: str
    created_at: int = 0
    tags: list[str] = field(default_factory=list)
    snippet: str = ""
    caption: str = ""
    origin: str = ""
    dense_score: float | None = None
    lexical_score: float | None = None
    lexical_coverage: float = 0.0  # share of the question's words it holds (lexical leg)
    score: float = 0.0

    @property
    def key(self) -> tuple[str, str]:
        return (self.asset_id, self.chunk)

    @classmethod
    def from_milvus(cls, hit: Mapping[str, object]) -> SearchHit:
        """A hit as activities/store/vectors.py ``search`` returns it."""
        tags = hit.get("tags") or []
        return cls(
            asset_id=str(hit.get("asset_id", "")),
            chunk=str(hit.get("chunk", "")),
            uri=str(hit.get("uri", "")),
            media_type=str(hit.get("media_type", "")),
            created_at=int(hit.get("created_at") or 0),  # type: ignore[call-overload]
            tags=[str(t) for t in tags],  # type: ignore[attr-defined]
            snippet=str(hit.get("snippet") or ""),
            dense_score=float(hit.get("score") or 0.0),  # type: ignore[arg-type]
            score=float(hit.get("score") or 0.0),  # type: ignore[arg-type]
        )


def with_stored(hit: SearchHit, stored: SearchHit | None) -> SearchHit:
    """A dense hit completed with what the lexical index stores for its chunk: the full text
    (a Milvus snippet is capped at 2 KiB), its origin and caption."""
    if stored is None:
        return hit
    hit.snippet = stored.snippet or hit.snippet
    hit.caption = stored.caption
    hit.origin = stored.origin
    return hit


def fuse_rrf(
    legs: Mapping[str, Sequence[SearchHit]],
    weights: Mapping[str, float],
    k: int,
    agreement: float = 1.0,
) -> list[SearchHit]:
    """Reciprocal rank fusion of ranked lists of hits, one hit per chunk, best first.

    Each leg gives a chunk ``weights[leg] / (k + rank)`` (1-based rank); a lexical hit's is
    scaled by its share of the question's words relative to the best lexical hit's
    (``lexical_coverage``: below a chunk holding every word of the question, one holding a
    single common word is a weak find). A chunk's fused score is
    its best leg's plus ``agreement`` times the others' (1: the classic sum; an Ask's is
    MMRAG_FUSION_AGREEMENT): below 1 the legs' top hits stay on
    top whichever leg found them, so fusion never buries what one leg is sure of under
    what a weak leg ranks high everywhere, and a chunk both legs found ranks above one
    found by one leg at the same rank. Ties keep the first leg's order."""
    fused: dict[tuple[str, str], SearchHit] = {}
    parts: dict[tuple[str, str], list[float]] = {}
    for leg, hits in legs.items():
        weight = float(weights.get(leg, 1.0))
        best = max((h.lexical_coverage for h in hits), default=0.0) if leg == LEXICAL else 0.0
        for rank, hit in enumerate(hits, 1):
            kept = fused.setdefault(hit.key, hit)
            if kept is not hit:
                if hit.dense_score is not None:
                    kept.dense_score = hit.dense_score
                if hit.lexical_score is not None:
                    kept.lexical_score = hit.lexical_score
                    kept.lexical_coverage = hit.lexical_coverage
                kept.snippet = kept.snippet or hit.snippet
                kept.caption = kept.caption or hit.caption
                kept.origin = kept.origin or hit.origin
            share = hit.lexical_coverage / best if leg == LEXICAL and best > 0 else 1.0
            parts.setdefault(hit.key, []).append(weight * share / (k + rank))
    scores = {key: max(p) + agreement * (sum(p) - max(p)) for key, p in parts.items()}
    out = []
    for key in sorted(fused, key=lambda key: -scores[key]):  # stable: ties keep arrival order
        hit = fused[key]
        hit.score = scores[key]
        out.append(hit)
    return out


def words_of(hit: SearchHit) -> str:
    """The words a chunk carries besides its pixels: its text, caption and tags (never its
    file name)."""
    tags = " ".join(t.replace("=", " ") for t in hit.tags)
    return " ".join(p for p in (hit.snippet, hit.caption, tags) if p)


def terms(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP}


def rerank(question: str, hits: list[SearchHit]) -> list[SearchHit]:
    """Re-rank fused candidates: ``(1 - TEXT_WEIGHT) * score / best score + TEXT_WEIGHT *
    share of the question's words in the chunk's words``; stable for ties. Scores stay
    comparable whatever fused them (a cosine alone when the lexical leg is off)."""
    query = terms(question)
    if not query or not hits:
        return hits
    best = max(h.score for h in hits) or 1.0
    for hit in hits:
        overlap = len(query & terms(words_of(hit))) / len(query)
        hit.score = (1 - TEXT_WEIGHT) * hit.score / best + TEXT_WEIGHT * overlap
    return sorted(hits, key=lambda h: -h.score)
