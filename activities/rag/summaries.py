"""Extractive summaries: a passage cut to a token budget by keeping the sentences that bear
most on the question, in their own order (no network, no model). What prompt fusion uses
when no LLM summary is available."""

from __future__ import annotations

import re

from activities.rag.guardrails import content_words
from activities.rag.tokens import count_tokens

ELLIPSIS = "…"
_SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?…])\s+|\s*\n\s*\n\s*|\s*\n(?=\s*[-*•]\s)")
_SPACES_RE = re.compile(r"[ \t\r\f\v]+")


def tidy_lines(text: str) -> str:
    """``text`` with each line's runs of spaces folded and the lines trimmed."""
    return "\n".join(
        _SPACES_RE.sub(" ", line).strip() for line in text.strip().splitlines()
    ).strip()


def fits(text: str, max_tokens: int) -> bool:
    """Whether ``text`` has at most ``max_tokens`` tokens; cheap for long texts, because no
    token spans two whitespace-separated words (so words are a lower bound)."""
    if len(text.split()) > max_tokens:
        return False
    return count_tokens(text) <= max_tokens


def truncate_to_tokens(text: str, max_tokens: int, *, marker: str = ELLIPSIS) -> str:
    """The longest prefix of ``text`` ending at a word boundary that, with ``marker``
    appended, fits ``max_tokens``; ``text`` itself if it fits; ``""`` if nothing does."""
    if fits(text, max_tokens):
        return text
    if max_tokens <= 0:
        return ""
    # Only the first max_tokens words can be kept (each word is at least one token).
    cuts = [m.start() for m in re.finditer(r"\s+", text)][: max_tokens + 1]
    lo, hi, best = 0, len(cuts) - 1, ""
    while lo <= hi:  # binary search on the number of whole words kept
        mid = (lo + hi) // 2
        cand = text[: cuts[mid]].rstrip(" ,;:-") + marker
        if count_tokens(cand) <= max_tokens:
            best, lo = cand, mid + 1
        else:
            hi = mid - 1
    if not best:  # a single overlong word: cut inside it
        word = text.split()[0] if text.split() else ""
        while word and count_tokens(word + marker) > max_tokens:
            word = word[: len(word) * 3 // 4]
        best = word + marker if word else ""
    return best


def summarize_extractive(text: str, max_tokens: int, question: str = "") -> str:
    """Shorten ``text`` to at most ``max_tokens`` by *selecting* its own sentences.

    Whole text if it fits. Otherwise sentences are taken by relevance to ``question``
    (content-word overlap, ties in document order; skipping any that no longer fit) or,
    without a question, as a leading run; they are re-assembled in document order, gaps
    marked with "…". If the first pick alone does not fit, it is cut at a word boundary.
    Nothing is paraphrased, so the summary stays verifiable against the source.
    """
    text = tidy_lines(text)
    if max_tokens <= 0 or not text:
        return ""
    if fits(text, max_tokens):
        return text
    sentences = [s for s in _SENTENCE_SPLIT_RE.split(text) if s and s.strip()]
    q_words = set(content_words(question))

    def relevance(i: int) -> tuple[int, int]:
        return (-len(q_words.intersection(content_words(sentences[i]))), i)

    order = sorted(range(len(sentences)), key=relevance) if q_words else list(range(len(sentences)))
    chosen: list[int] = []
    summary = ""
    for i in order:
        trial = _join_selected(sentences, sorted([*chosen, i]))
        if fits(trial, max_tokens):
            chosen.append(i)
            summary = trial
        elif not chosen:
            # The first choice does not fit: cut it at a word boundary rather than skip it.
            return truncate_to_tokens(sentences[i], max_tokens)
        elif not q_words:
            break  # document order: keep a contiguous lead
    return summary


def _join_selected(sentences: list[str], idx: list[int]) -> str:
    out: list[str] = []
    prev = -1
    for i in idx:
        if out and i != prev + 1:
            out.append(ELLIPSIS)
        out.append(sentences[i])
        prev = i
    if idx and idx[-1] != len(sentences) - 1:
        out.append(ELLIPSIS)
    return " ".join(out)
