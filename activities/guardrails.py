"""Guardrails around generation: PII redaction, answer validation and citations.

Why these live apart from :mod:`activities.generation`: they are pure functions of text,
used on both sides of the LLM call (redaction before anything leaves the process,
validation and citation after the answer comes back) and by the extractive no-LLM path, so
they must stay cheap, deterministic and free of I/O.

**Redaction** (:func:`redact_pii`) replaces personal data with typed placeholders
(``[EMAIL]``, ``[PHONE]``, ``[CARD]``, ``[IBAN]``, ``[ID]``). Each detector is a pattern
plus, where the format has one, a checksum, because the opposite failure (mangling years,
page numbers, prices, ISBNs, version numbers) makes answers wrong:

- e-mail addresses;
- IBANs: country code, check digits, 11–30 characters, optionally grouped by four, and the
  ISO 13616 mod-97 checksum must hold;
- payment cards: 13–19 digits, contiguous or in the usual groups (4-4-4-4[-3], 4-6-5,
  4-6-4) separated consistently by spaces or dashes, starting with a major network's first
  digit (2–6: Mastercard, Amex, Diners, JCB, Visa, Mastercard, Discover, UnionPay, Maestro)
  and passing the Luhn check; the first-digit rule keeps lists of years and ISBN-13s
  (which start 978/979) out;
- national IDs: US SSNs written ``123-45-6789`` (with the SSA's impossible areas, groups
  and serials excluded), UK National Insurance numbers, and any value introduced by words
  such as "SSN", "passport no.", "national ID", "ID number", "driver's licence", "tax ID";
- phone numbers: international (``+`` country code, 8–15 digits per E.164), US formats
  (``(555) 123-4567``, ``555-123-4567``, ``555.123.4567``, ``1-555-123-4567``), national
  numbers with a trunk ``0`` in groups (``020 7946 0958``, ``07700 900123``), and any number
  introduced by "tel", "phone", "mobile", "cell" or "fax".

A bare run of digits with no format and no keyword (``5551234567``) is *not* redacted:
nothing distinguishes it from an order number. The counts returned per kind go into logs
and the audit row; the redacted values never do.

**Validation** (:func:`validate_answer`) decides whether an LLM answer may be shown. An
answer fails when it is empty, when it cites an id that was not retrieved, when sources
exist but it cites none, or when it is not grounded. Grounding is a deliberately simple,
explainable lexical check: the fraction of the answer's *content words* (lower-cased
letter/digit runs of three or more characters that are not stop words) that also occur in
the context must reach ``min_grounding`` (default :data:`DEFAULT_MIN_GROUNDING`). It catches
answers made up from the model's own knowledge; it does not prove each sentence is
entailed by the source it cites, and paraphrase-heavy models may need a lower threshold.
A failed answer is replaced by the caller with :data:`I_DONT_KNOW` plus the sources.

**Citations** are written ``[S1]``, ``[S2]`` (source ids in rank order); ``[S1, S3]`` and
``[S1][S3]`` are understood too. :func:`insert_citations` appends one canonical
``Sources: [S1] [S3]`` line.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

# What the user sees when the answer cannot be trusted (or the model abstained).
I_DONT_KNOW = "I don't know based on the retrieved sources."

# Share of the answer's content words that must occur in the context (see module doc).
DEFAULT_MIN_GROUNDING = 0.6

EMAIL = "EMAIL"
PHONE = "PHONE"
CARD = "CARD"
IBAN = "IBAN"
ID = "ID"
PII_KINDS: tuple[str, ...] = (EMAIL, PHONE, CARD, IBAN, ID)


def placeholder(kind: str) -> str:
    """The text that replaces a redacted value of ``kind``: ``[EMAIL]``, ``[CARD]``, ..."""
    return f"[{kind}]"


# --- redaction --------------------------------------------------------------------------

_EMAIL_RE = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9](?:[A-Za-z0-9._%+-]{0,63})@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])"
)

# Upper-case as printed on statements; groups of four optional. Candidates are checked by
# mod-97 and trimmed from the right until one validates (so "... 00 1234" after an IBAN
# does not hide it).
_IBAN_RE = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{1,4}){3,8}(?![A-Za-z0-9])")

_CARD_RE = re.compile(
    r"(?<![\w.,-])(?:"
    r"\d{13,19}"
    r"|\d{4}(?P<s1>[ -])\d{4}(?P=s1)\d{4}(?P=s1)\d{1,4}(?:(?P=s1)\d{1,3})?"
    r"|\d{4}(?P<s2>[ -])\d{6}(?P=s2)\d{4,5}"
    r")(?![\w-]|[.,]\d)"
)

_SSN_RE = re.compile(r"(?<![\w-])(\d{3})-(\d{2})-(\d{4})(?![\w-])")

# UK National Insurance number, e.g. "QQ 12 34 56 C" or "AB123456C".
_NINO_RE = re.compile(
    r"(?<![A-Za-z0-9])[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]"
    r" ?\d{2} ?\d{2} ?\d{2} ?[A-D](?![A-Za-z0-9])"
)

# A value (with at least one digit) introduced by an ID keyword: the keyword stays.
_KEYWORD_ID_RE = re.compile(
    r"(?P<kw>\b(?i:ssn|social security (?:number|no\.?|#)|passport(?: (?:number|no\.?|#))?"
    r"|national id(?: (?:number|no\.?|#))?|id (?:number|no\.?|#)|identity card(?: number)?"
    r"|driver'?s licen[cs]e(?: (?:number|no\.?|#))?|tax id(?: number)?)\s*[:#]?\s*)"
    r"(?P<val>(?=[A-Za-z0-9-]*\d)[A-Za-z0-9][A-Za-z0-9-]{3,24}[A-Za-z0-9])(?![\w-])"
)

_PHONE_INTL_RE = re.compile(
    r"(?<![\w+])\+\d{1,3}(?:[ .-]?(?:\(\d{1,4}\)|\d{1,5})){2,6}(?![\w-]|[.,]\d)"
)
_PHONE_US_RE = re.compile(
    r"(?<![\w.,+-])(?:1[ .-]?)?(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4}(?![\w-]|[.,]\d)"
)
# National numbers with the trunk prefix 0 (UK, DE, FR, ...): 9–12 digits in 2–4 groups.
_PHONE_NATIONAL_RE = re.compile(
    r"(?<![\w.,+:/-])(?:\(0[1-9]\d{0,3}\)|0[1-9]\d{0,3})"
    r"(?P<sep>[ -])\d{2,8}(?:(?P=sep)\d{2,8}){0,3}(?![\w:/-]|[.,]\d)"
)
_PHONE_KEYWORD_RE = re.compile(
    r"(?P<kw>\b(?i:tel|telephone|phone|mobile|cell|fax)\b\.?(?: (?i:no\.?|number))?\s*[:#]?\s*)"
    r"(?P<val>[+(]?\d[\d ()./-]{5,20}\d)(?![\w-])"
)


def _digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit())


def luhn_ok(digits: str) -> bool:
    """The Luhn (mod 10) check used by every payment card number."""
    if not digits.isdigit():
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_ok(candidate: str) -> bool:
    """ISO 13616 check: move the first four characters to the end, letters to numbers,
    and the result mod 97 must be 1."""
    s = candidate.replace(" ", "").upper()
    if not 15 <= len(s) <= 34 or not s.isalnum():
        return False
    rearranged = s[4:] + s[:4]
    numeric = "".join(str(int(ch, 36)) for ch in rearranged)
    return int(numeric) % 97 == 1


def _ssn_ok(area: str, group: str, serial: str) -> bool:
    a = int(area)
    return a != 0 and a != 666 and a < 900 and group != "00" and serial != "0000"


def _card_ok(text: str) -> bool:
    digits = _digits(text)
    return 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn_ok(digits)


def _replace_iban(m: re.Match[str], counts: dict[str, int]) -> str:
    text = m.group(0)
    parts = text.split(" ")
    # Grouped: drop trailing groups until a prefix validates (an upper-case word or a
    # number after the IBAN may have been swallowed by the pattern). Ungrouped: all or
    # nothing.
    for k in range(len(parts), 0, -1):
        cand = " ".join(parts[:k])
        if iban_ok(cand):
            counts[IBAN] += 1
            return placeholder(IBAN) + text[len(cand) :]
    return text


def _replace_phone_intl(m: re.Match[str], counts: dict[str, int]) -> str:
    text = m.group(0)
    # Drop trailing groups until the number has at most 15 digits (E.164): a year or a
    # count after a phone number must not make it unrecognisable.
    cut = len(text)
    while len(_digits(text[:cut])) > 15:
        sep = max(text.rfind(" ", 0, cut), text.rfind("-", 0, cut), text.rfind(".", 0, cut))
        if sep <= 0:
            return text
        cut = sep
    if len(_digits(text[:cut])) < 8:
        return text
    counts[PHONE] += 1
    return placeholder(PHONE) + text[cut:]


def _sub(
    pattern: re.Pattern[str],
    text: str,
    kind: str,
    counts: dict[str, int],
    accept: Callable[[re.Match[str]], bool] | None = None,
) -> str:
    def repl(m: re.Match[str]) -> str:
        if accept is not None and not accept(m):
            return m.group(0)
        counts[kind] += 1
        if "kw" in pattern.groupindex:
            return m.group("kw") + placeholder(kind)
        return placeholder(kind)

    return pattern.sub(repl, text)


def redact_pii(text: str) -> tuple[str, dict[str, int]]:
    """Replace emails, phone numbers, card numbers, IBANs and national IDs with placeholders.

    Returns the redacted text and how many values of each kind (``EMAIL``, ``PHONE``,
    ``CARD``, ``IBAN``, ``ID``; all keys always present) were replaced. Ordinary numbers
    (years, page numbers, prices, dates, ISBNs, versions) are left alone; see the module
    docstring for the exact rules. Idempotent: redacting twice changes nothing more.
    """
    counts = dict.fromkeys(PII_KINDS, 0)
    has_at = "@" in text
    if not has_at and not any(ch.isdigit() for ch in text):
        return text, counts  # every detector needs an "@" or a digit
    out = _sub(_EMAIL_RE, text, EMAIL, counts) if has_at else text
    out = _IBAN_RE.sub(lambda m: _replace_iban(m, counts), out)
    out = _sub(_CARD_RE, out, CARD, counts, lambda m: _card_ok(m.group(0)))
    out = _sub(_SSN_RE, out, ID, counts, lambda m: _ssn_ok(*m.groups()))
    out = _sub(_NINO_RE, out, ID, counts)
    out = _sub(_KEYWORD_ID_RE, out, ID, counts)
    out = _PHONE_INTL_RE.sub(lambda m: _replace_phone_intl(m, counts), out)
    out = _sub(_PHONE_US_RE, out, PHONE, counts)
    out = _sub(
        _PHONE_NATIONAL_RE, out, PHONE, counts, lambda m: 9 <= len(_digits(m.group(0))) <= 12
    )
    out = _sub(
        _PHONE_KEYWORD_RE, out, PHONE, counts, lambda m: 7 <= len(_digits(m.group("val"))) <= 15
    )
    return out, counts


def merge_counts(*many: dict[str, int]) -> dict[str, int]:
    """Sum redaction counts (for a prompt made of several redacted texts)."""
    total = dict.fromkeys(PII_KINDS, 0)
    for counts in many:
        for kind, n in counts.items():
            total[kind] = total.get(kind, 0) + n
    return total


# --- citations ----------------------------------------------------------------------------

_CITATION_GROUP_RE = re.compile(r"\[\s*(S\d+(?:\s*[,;]\s*S\d+)*)\s*\]")
_SOURCES_LINE_RE = re.compile(r"(?:\A|\n)[ \t]*Sources:(?:[ \t,;]*\[S\d+\])*[ \t,;.]*\s*\Z")


def extract_citations(answer: str) -> list[str]:
    """Source ids cited in ``answer`` (``[S1]``, ``[S1, S3]``, ``[S1][S3]``), first use
    first, without duplicates."""
    seen: dict[str, None] = {}
    for m in _CITATION_GROUP_RE.finditer(answer):
        for sid in re.split(r"\s*[,;]\s*", m.group(1)):
            seen.setdefault(sid, None)
    return list(seen)


def insert_citations(answer: str, cited: Iterable[str]) -> str:
    """Append one ``Sources: [S1] [S3]`` line listing ``cited`` (duplicates removed, order
    kept). A ``Sources:`` line already ending the answer is replaced, not repeated, so
    calling this twice (or on a model that wrote its own line) gives one line. With nothing
    cited the answer is returned without a ``Sources:`` line."""
    ids = list(dict.fromkeys(cited))
    body = _SOURCES_LINE_RE.sub("", answer).rstrip()
    if not ids:
        return body
    line = "Sources: " + " ".join(f"[{sid}]" for sid in ids)
    return f"{body}\n\n{line}" if body else line


# --- validation ---------------------------------------------------------------------------

_WORD_RE = re.compile(r"[^\W_]+", re.UNICODE)

# Function words that carry no claim; they must not make an invented answer look grounded.
_STOP_WORDS_TEXT = """
    a about above after again against all also am an and any are aren't as at be because
    been before being below between both but by can cannot could did do does doing down
    during each few for from further had has have having he her here hers herself him
    himself his how however i if in into is it its itself just let may me might more most
    must my myself no nor not now of off on once only or other ought our ours ourselves
    out over own per same shall she should so some such than that the their theirs them
    themselves then there these they this those through thus to too under until up upon
    us very was we were what when where which while who whom whose why will with within
    without would yes yet you your yours yourself yourselves shown show shows according
    source sources based image images document documents answer question retrieved
"""
STOP_WORDS = frozenset(_STOP_WORDS_TEXT.split())

_ABSTAIN_RE = re.compile(
    r"\b(?:i\s+(?:do\s+not|don'?t|cannot|can'?t)\s+know|not\s+enough\s+information"
    r"|(?:sources|context)\s+do(?:es)?\s+not\s+(?:contain|say|mention))\b",
    re.IGNORECASE,
)


def content_words(text: str) -> list[str]:
    """Lower-cased letter/digit runs of 3+ characters that are not stop words, with
    citation markers and redaction placeholders removed: what grounding is measured on."""
    text = _CITATION_GROUP_RE.sub(" ", text)
    text = re.sub(r"\[(?:" + "|".join(PII_KINDS) + r")\]", " ", text)
    return [
        w
        for w in (m.group(0).lower() for m in _WORD_RE.finditer(text))
        if len(w) >= 3 and w not in STOP_WORDS
    ]


def grounding_score(answer: str, context: str) -> float:
    """Fraction of the answer's content words (with repeats) found in the context's words;
    1.0 for an answer with no content words. Light stemming: a trailing "s" is ignored."""
    words = content_words(answer)
    if not words:
        return 1.0
    vocab = {w.removesuffix("s") for w in _normalise_words(context)}
    hits = sum(1 for w in words if w.removesuffix("s") in vocab)
    return hits / len(words)


def _normalise_words(text: str) -> list[str]:
    return [m.group(0).lower() for m in _WORD_RE.finditer(text)]


@dataclass
class ValidationResult:
    """Whether an answer may be shown; if not, ``reason`` says why (for logs and the audit
    row, never shown as the answer); ``cited`` is every id it cited, valid or not."""

    ok: bool
    reason: str
    cited: list[str] = field(default_factory=list)
    grounding: float = 0.0


def validate_answer(
    answer: str,
    source_ids: list[str],
    context: str,
    *,
    min_grounding: float = DEFAULT_MIN_GROUNDING,
) -> ValidationResult:
    """Check an LLM answer against the sources it was given.

    Fails (``ok=False``) when the answer is empty; when it says it does not know; when it
    cites an id not in ``source_ids``; when ``source_ids`` is non-empty and it cites none;
    or when fewer than ``min_grounding`` of its content words occur in ``context`` (the
    text of the sources as sent to the model). The caller then shows :data:`I_DONT_KNOW`
    with the sources instead.
    """
    text = (answer or "").strip()
    cited = extract_citations(text)
    if not text:
        return ValidationResult(False, "empty answer", cited)
    body = _SOURCES_LINE_RE.sub("", text).strip()
    if _ABSTAIN_RE.search(body) and len(content_words(body)) <= 12:
        return ValidationResult(False, "the model said it does not know", cited)
    known = set(source_ids)
    unknown = [sid for sid in cited if sid not in known]
    if unknown:
        return ValidationResult(
            False,
            f"cites {', '.join(unknown)}, which were not retrieved "
            f"(retrieved: {', '.join(source_ids) or 'none'})",
            cited,
        )
    if source_ids and not cited:
        return ValidationResult(False, "cites none of the retrieved sources", cited)
    score = grounding_score(body, context)
    if score < min_grounding:
        return ValidationResult(
            False,
            f"not grounded in the sources: {score:.0%} of its content words occur in them "
            f"(needs {min_grounding:.0%})",
            cited,
            score,
        )
    return ValidationResult(True, "", cited, score)


def validate_summary(
    summary: str,
    source_text: str,
    *,
    min_grounding: float = DEFAULT_MIN_GROUNDING,
) -> ValidationResult:
    """Check an LLM summary of one source chunk before it replaces the chunk in a prompt.

    A summary is shown to the answering model *instead of* its source, so a made-up one
    would let a made-up answer pass :func:`validate_answer` (which measures grounding
    against the prompt's context). It fails when empty, when it abstains, when it carries
    citation markers (the prompt's ``[S#]`` headers are the only ones), or when fewer than
    ``min_grounding`` of its content words occur in ``source_text`` (the chunk as sent to
    be summarised). The caller then falls back to the extractive summary.
    """
    text = (summary or "").strip()
    if not text:
        return ValidationResult(False, "empty summary")
    cited = extract_citations(text)
    if cited:
        return ValidationResult(False, "a summary must not cite sources", cited)
    if _ABSTAIN_RE.search(text) and len(content_words(text)) <= 12:
        return ValidationResult(False, "the model declined to summarise")
    score = grounding_score(text, source_text)
    if score < min_grounding:
        return ValidationResult(
            False,
            f"summary not grounded in its chunk: {score:.0%} of its content words occur in "
            f"it (needs {min_grounding:.0%})",
            [],
            score,
        )
    return ValidationResult(True, "", [], score)
