"""A page's text cut into token-bounded passages with overlap: each passage is its own
retrievable chunk (``page:N:p:K``) with its own vector and snippet.

Why passages: a page's whole text as one CLIP text embedding is cut at CLIP's 77-token
context, so a fact in the fourth paragraph was invisible to search, and a long snippet
drowned the words that matched. A passage small enough for the text tower keeps every part
of the page findable, and the overlap keeps a sentence that straddles a boundary whole in
one of the two passages.

Tokens here are words and punctuation marks (``\\w+`` or one non-space symbol), counted
without a tokenizer file: CLIP's BPE splits a rare word into a few pieces, so the default
passage (``MMRAG_PASSAGE_TOKENS``) stays below CLIP's 77 tokens for ordinary prose.
"""

from __future__ import annotations

import re

_TOKEN = re.compile(r"\w+|[^\w\s]")
# A sentence ends on . ! or ? (possibly followed by a closing quote or bracket).
_SENTENCE_END = re.compile(r"[.!?][\"')\]]?$")


def passages(text: str, max_tokens: int, overlap: int) -> list[str]:
    """``text`` as passages of at most ``max_tokens`` tokens, each starting ``overlap``
    tokens before the previous one ended (clamped to less than ``max_tokens``).

    A passage that would stop mid-sentence stops instead at the last sentence end in its
    second half, so passages read as whole sentences where the text has them. The
    original characters are kept (a passage is a slice of ``text``); empty text gives no
    passage.
    """
    spans = [m.span() for m in _TOKEN.finditer(text)]
    if not spans:
        return []
    size = max(1, max_tokens)
    overlap = min(max(0, overlap), size - 1)
    out: list[str] = []
    start = 0
    while start < len(spans):
        end = min(len(spans), start + size)  # exclusive
        if end < len(spans):
            for cut in range(end, start + size // 2, -1):
                if _SENTENCE_END.search(text[spans[cut - 1][0] : spans[cut - 1][1]]):
                    end = cut
                    break
        out.append(text[spans[start][0] : spans[end - 1][1]])
        if end >= len(spans):
            break
        start = max(start + 1, end - overlap)
    return out


def count_tokens(text: str) -> int:
    """Tokens as :func:`passages` counts them."""
    return len(_TOKEN.findall(text))
