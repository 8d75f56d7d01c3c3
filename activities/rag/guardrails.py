"""Guardrails around generation: PII redaction, prompt-injection defences, answer
validation and citations.

Why these live apart from :mod:`activities.llm.client`: they are pure functions of text,
used on both sides of the LLM call (redaction before anything leaves the process,
validation and citation after the answer comes back) and by the extractive no-LLM path, so
they must stay cheap, deterministic and free of I/O.

**Redaction** (:func:`redact_pii`) replaces personal data with typed placeholders
(``[EMAIL]``, ``[PHONE]``, ``[CARD]``, ``[IBAN]``, ``[ID]``, ``[IP]``). Text is first
normalised (:func:`normalize_text`: invisible format characters such as zero-width spaces
removed, then Unicode NFKC, which folds fullwidth ``＠``/digits and odd spaces to ASCII), so
that ``jane＠example.com`` or a card number split by zero-width spaces is seen for what it
is. Each detector is a pattern plus, where the format has one, a real validator, because
the opposite failure (mangling years, page numbers, prices, ISBNs, version numbers) makes
answers wrong:

- e-mail addresses, internationalised ones included (``jürgen@bücher.de``);
- IBANs in any case, contiguous or grouped by spaces or dashes, validated by
  python-stdnum's ``iban`` (country, length, BBAN format, mod-97);
- payment cards: 13–19 digits, contiguous or in the usual groups (4-4-4-4[-3], 4-6-5,
  4-6-4) separated consistently by spaces, dashes or dots, starting with a major network's
  first digit (2–6) and passing the Luhn check; the first-digit rule keeps lists of years
  and ISBN-13s (which start 978/979) out, and a leading ``+`` makes it a phone number;
- phone numbers: international ones (``+`` and a country code) found and checked by
  ``phonenumbers`` (so ``+4915112345678`` is a German mobile number, not a card), US formats
  (``(555) 123-4567``, ``555-123-4567``, ``555.123.4567``, ``1-555-123-4567``), national
  numbers with a trunk ``0`` in groups (``020 7946 0958``), and any number introduced by
  "tel", "phone", "mobile", "cell" or "fax";
- national IDs: US SSNs, UK National Insurance numbers, passport machine-readable zones,
  and any value introduced by words such as "SSN", "passport", "national ID", "ID number",
  "driver's licence", "tax ID" (a few filler words allowed: "my SSN is 078051120",
  "Reisepass Nr. C01X00T47"). **SSNs:** ``123-45-6789`` is redacted on its own; nine digits
  without dashes (``078051120``, ``078 05 1120``) only after an SSN keyword ("SSN", "social
  security", "SS#"; labelled, it is redacted as written); an unlabelled dashed one must
  pass the SSA's rules (no area 000, 666 or 900–999, no group 00, no serial 0000). A bare
  nine-digit number is never redacted: nothing tells it from an order or invoice number,
  and redacting them all would mangle documents;
- IP addresses, v4 and v6, validated by :mod:`ipaddress` (a dotted quad after "version",
  "section", "figure" and the like is left alone).

A bare run of digits with no format and no keyword (``5551234567``) is *not* redacted:
nothing distinguishes it from an order number. The counts returned per kind go into logs
and the audit row; the redacted values never do.

**Prompt injection.** Retrieved text is data from documents anyone may have written, so
:func:`neutralize_source_text` prepares it for the prompt, where
:mod:`activities.llm.client` puts each source between ``<source id="S1">`` and
``</source>``: markup characters are escaped (a ``</source>`` or chat-template token inside a
document cannot close or open anything) and citation-like headers (``[S2]``) are turned into
``(S2)``, so a document cannot forge another source. :func:`validate_answer` then refuses
an answer that repeats instruction-like text (:func:`instruction_markers`: "ignore previous
instructions", role tags, ...), or that brings a URL or a call to action ("sign in",
"click here", "enter your password") that none of the sources it cites contains, or takes
one from a source that itself carries instruction-like text.

**Validation** (:func:`validate_answer`) decides whether an LLM answer may be shown. An
answer fails when it is empty, when it cites an id that was not retrieved, when sources
exist but it cites none, when it trips the injection checks above (or embeds a remote
Markdown image, the way an injection exfiltrates a question), or when it is not grounded.
Grounding is explainable and lexical, read claim by claim (:func:`check_claims`): the
answer is cut at sentence ends and after each citation group, and each claim is read
against the sources it cites, minus their instruction-like sentences. Every number
(``1,450`` = ``1450``, "forty" = ``40``, a stated total may add two up), identifier
(``PN-4471-B``) and name (a capitalised word inside a sentence) must occur there; a word
only an instruction-like sentence holds means the answer obeyed it; and each claim's share
of supported content words (Snowball stems) must reach the lower of ``min_grounding`` and
:data:`CLAIM_MIN_GROUNDING`, the whole answer's ``min_grounding`` (default
:data:`DEFAULT_MIN_GROUNDING`). Measured on ``bench/validator_set.py`` (``bench/validator.py``,
docs/quality.md): 1.3 % false refusals, 2.0 % false accepts, ~1 ms an answer. What it
cannot see: a name or number of the source put in the wrong role ("Tomas drafts the plan"
when Lena does). A failed answer is replaced by the caller with :data:`I_DONT_KNOW` plus
the sources.

**Citations** are written ``[S1]``, ``[S2]`` (source ids in rank order); ``[S1, S3]`` and
``[S1][S3]`` are understood too. :func:`insert_citations` appends one canonical
``Sources: [S1] [S3]`` line.

One module of ~1000 lines: redaction, injection checks and answer validation read the same
patterns and placeholders, and every prompt and answer passes through all three.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import threading
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import phonenumbers
import snowballstemmer
from stdnum import iban as stdnum_iban

# What the user sees when the answer cannot be trusted (or the model abstained).
I_DONT_KNOW = "I don't know based on the retrieved sources."

# Share of the answer's content words that must occur in the context (see module doc).
DEFAULT_MIN_GROUNDING = 0.6

EMAIL = "EMAIL"
PHONE = "PHONE"
CARD = "CARD"
IBAN = "IBAN"
ID = "ID"
IP = "IP"
PII_KINDS: tuple[str, ...] = (EMAIL, PHONE, CARD, IBAN, ID, IP)


def placeholder(kind: str) -> str:
    """The text that replaces a redacted value of ``kind``: ``[EMAIL]``, ``[CARD]``, ..."""
    return f"[{kind}]"


# --- normalisation ------------------------------------------------------------------------

# Characters that render as nothing: zero-width spaces and joiners, the soft hyphen, bidi
# controls, word joiners, variation selectors, Hangul fillers and the Unicode "tag"
# characters (which can carry a whole hidden ASCII text). They split "4111<ZWSP>1111" or
# "jane<ZWSP>@example.com" for a pattern while looking normal on screen.
_INVISIBLE_RE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e"
    "\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufffb"
    "\U0001d173-\U0001d17a\U000e0000-\U000e0fff]"
)


def normalize_text(text: str) -> str:
    """``text`` with invisible format characters removed, then in Unicode NFKC form.

    What every detector and the prompt see: NFKC folds fullwidth letters, digits and ``＠``,
    ligatures and the many Unicode spaces to their plain forms, so look-alike spellings of
    an e-mail, a card number or ``[S2]`` are matched like the plain ones."""
    return unicodedata.normalize("NFKC", _INVISIBLE_RE.sub("", text))


# --- redaction --------------------------------------------------------------------------

# Unicode-aware: \w covers every script's letters and digits (internationalised addresses,
# RFC 6531); the domain's dots may be ideographic full stops (IDNA treats them as dots).
_EMAIL_RE = re.compile(
    r"(?<![\w.%+-])\w[\w.%+-]{0,63}@"
    r"(?:[^\W_](?:[\w-]{0,61}[^\W_])?[.\u3002])+(?:[^\W\d_]{2,24}|xn--[a-z0-9-]{2,59})"
    r"(?![\w-])"
)

# Any case; groups of up to four separated by nothing, spaces or dashes. Candidates are
# validated by python-stdnum and trimmed group by group from the right until one is valid
# (so "... 00 1234" or a word after an IBAN does not hide it).
_IBAN_RE = re.compile(
    r"(?<![A-Za-z0-9])[A-Za-z]{2}\d{2}(?:[ -]?[A-Za-z0-9]{1,4}){3,8}(?![A-Za-z0-9])"
)
_IBAN_SEP_RE = re.compile(r"[ -]")

_CARD_RE = re.compile(
    r"(?<![\w.,+-])(?:"
    r"\d{13,19}"
    r"|\d{4}(?P<s1>[ .-])\d{4}(?P=s1)\d{4}(?P=s1)\d{1,4}(?:(?P=s1)\d{1,3})?"
    r"|\d{4}(?P<s2>[ .-])\d{6}(?P=s2)\d{4,5}"
    r")(?![\w-]|[.,]\d)"
)

_SSN_RE = re.compile(r"(?<![\w-])(\d{3})-(\d{2})-(\d{4})(?![\w-])")

# Filler words allowed between an ID keyword and its value ("my SSN is ...", "passport
# no.: ...", "Reisepass Nr. ...", "passeport n° ..."); they stay in the text.
_FILLER = r"(?:\s*(?:[:#=]|[nN]°|\b(?i:is|was|number|num|no|nr)\b\.?))*\s*"
# An SSN without dashes, only after an SSN keyword: nine digits, or 3-2-4 with one
# consistent separator (space or dot). Labelled, it is redacted as written, valid or not.
_SSN_KEYWORD_RE = re.compile(
    r"(?P<kw>\b(?i:ssn|ss#|ss no|social security(?: card)?|soc\.? ?sec\.?)" + _FILLER + r")"
    r"(?P<val>\d{3}(?P<sep>[ .]?)\d{2}(?P=sep)\d{4})(?![\w-]|[.,]\d)"
)

# UK National Insurance number, e.g. "QQ 12 34 56 C" or "AB123456C".
_NINO_RE = re.compile(
    r"(?<![A-Za-z0-9])[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]"
    r" ?\d{2} ?\d{2} ?\d{2} ?[A-D](?![A-Za-z0-9])"
)

# A passport's machine-readable zone: lines of 30-44 of [A-Z0-9<] with "<<" fillers.
_MRZ_RE = re.compile(r"(?<![A-Z0-9<])(?=[A-Z0-9<]*<<)[A-Z0-9<]{30,44}(?![A-Z0-9<])")

# A value (with at least one digit) introduced by an ID keyword: the keyword stays.
_KEYWORD_ID_RE = re.compile(
    r"(?P<kw>\b(?i:ssn|social security(?: number| card)?|passport(?: number| card)?"
    r"|reisepass(?:nummer)?|passeport|pasaporte|passaporto|national id(?: number)?"
    r"|id number|id card|identity card(?: number)?|driver'?s licen[cs]e(?: number)?"
    r"|tax id(?: number)?)" + _FILLER + r")"
    r"(?P<val>(?=[A-Za-z0-9-]*\d)[A-Za-z0-9][A-Za-z0-9-]{3,24}[A-Za-z0-9])(?![\w-])"
)

_IPV4_RE = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)")
# Words after which a dotted quad is a section or version number, not an address.
_NOT_AN_IP_BEFORE = re.compile(
    r"(?i:\b(?:version|ver|v|release|rev|section|sec|chapter|ch|figure|fig|table|tab|"
    r"clause|art|article|item|step|page|pp?|no|§)\.?\s*)$"
)
_IPV6_RE = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4})?"
    r"(?:%[\w.]+)?(?![\w:]|\.\w)"
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
    """Whether ``candidate`` is a valid IBAN (any case; spaces or dashes between groups):
    python-stdnum checks the country, its length and BBAN format, and the ISO 13616
    mod-97 check digits."""
    return bool(stdnum_iban.is_valid(candidate))


def _ssn_ok(area: str, group: str, serial: str) -> bool:
    a = int(area)
    return a != 0 and a != 666 and a < 900 and group != "00" and serial != "0000"


def _card_ok(text: str) -> bool:
    digits = _digits(text)
    return 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn_ok(digits)


def _ipv4_ok(m: re.Match[str]) -> bool:
    try:
        ipaddress.IPv4Address(m.group(0))
    except ValueError:
        return False
    return not _NOT_AN_IP_BEFORE.search(m.string[max(0, m.start() - 12) : m.start()])


def _ipv6_ok(m: re.Match[str]) -> bool:
    text = m.group(0)
    groups = [g for g in text.split("%")[0].split(":") if g]
    if len(groups) < 2 or not any(ch.isdigit() for ch in text):
        return False  # "::1", "a::b", "10:30": too little to be anybody's address
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _replace_iban(m: re.Match[str], counts: dict[str, int]) -> str:
    text = m.group(0)
    # Drop trailing groups until a prefix validates (a word or a number after the IBAN
    # may have been swallowed by the pattern). Ungrouped: all or nothing.
    cuts = [g.start() for g in _IBAN_SEP_RE.finditer(text)]
    for end in [len(text), *reversed(cuts)]:
        if iban_ok(text[:end]):
            counts[IBAN] += 1
            return placeholder(IBAN) + text[end:]
    return text


def _phone_ok(number: str) -> bool:
    """Whether ``number`` (written with ``+``) is a possible phone number for its country
    code, by ``phonenumbers``' length rules."""
    try:
        parsed = phonenumbers.parse(number, None)
    except phonenumbers.NumberParseException:
        return False
    return bool(phonenumbers.is_possible_number(parsed))


def _replace_phone_intl(m: re.Match[str], counts: dict[str, int]) -> str:
    """A ``+`` number is a phone when ``phonenumbers`` says its country code allows that
    many digits; trailing groups are dropped until it does (a year or a count after a phone
    number must not make it unrecognisable)."""
    text = m.group(0)
    cuts = [len(text)] + [i for i in range(len(text) - 1, 0, -1) if text[i] in " .-"]
    for cut in cuts:
        if _phone_ok(text[:cut]):
            counts[PHONE] += 1
            return placeholder(PHONE) + text[cut:]
    return text


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
    """Replace e-mails, phone numbers, card numbers, IBANs, national IDs and IP addresses
    with placeholders.

    Returns the redacted text and how many values of each kind (:data:`PII_KINDS`, all keys
    always present) were replaced. Detection runs on :func:`normalize_text`'s form of the
    text; when something is redacted that normalised form is returned, otherwise ``text``
    itself, unchanged. Ordinary numbers (years, page numbers, prices, dates, ISBNs,
    versions) are left alone; see the module docstring for the exact rules. Idempotent:
    redacting twice changes nothing more.
    """
    counts = dict.fromkeys(PII_KINDS, 0)
    if not any(ch.isdigit() or ch in "@\uff20\ufe6b" for ch in text):
        return text, counts  # every detector needs an "@" or a digit
    norm = normalize_text(text)
    out = _sub(_EMAIL_RE, norm, EMAIL, counts) if "@" in norm else norm
    out = _IBAN_RE.sub(lambda m: _replace_iban(m, counts), out)
    out = _sub(_IPV4_RE, out, IP, counts, _ipv4_ok)
    if ":" in out:
        out = _sub(_IPV6_RE, out, IP, counts, _ipv6_ok)
    out = _PHONE_INTL_RE.sub(lambda m: _replace_phone_intl(m, counts), out)
    out = _sub(_CARD_RE, out, CARD, counts, lambda m: _card_ok(m.group(0)))
    out = _sub(_SSN_RE, out, ID, counts, lambda m: _ssn_ok(*m.groups()))
    out = _sub(_SSN_KEYWORD_RE, out, ID, counts)
    out = _sub(_NINO_RE, out, ID, counts)
    out = _sub(_MRZ_RE, out, ID, counts)
    out = _sub(_KEYWORD_ID_RE, out, ID, counts)
    out = _sub(_PHONE_US_RE, out, PHONE, counts)
    out = _sub(
        _PHONE_NATIONAL_RE, out, PHONE, counts, lambda m: 9 <= len(_digits(m.group(0))) <= 12
    )
    out = _sub(
        _PHONE_KEYWORD_RE, out, PHONE, counts, lambda m: 7 <= len(_digits(m.group("val"))) <= 15
    )
    return (out if any(counts.values()) else text), counts


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


# --- prompt injection ---------------------------------------------------------------------

# "[S2]", "[ s2 ]", "[S1, S3]": what a citation, or a source header, looks like (any case).
_FORGED_CITATION_RE = re.compile(r"\[\s*(S\d+(?:\s*[,;]\s*S\d+)*)\s*\]", re.IGNORECASE)

_INSTRUCTION_RE = re.compile(
    r"\b(?:ignore|disregard|forget|override|bypass)\s+(?:\w+\s+){0,2}?"
    r"(?:previous|prior|above|earlier|preceding|foregoing|original|system|any|all)\s+"
    r"(?:\w+\s+){0,2}?(?:instructions?|prompts?|rules|guidelines|directions|directives|"
    r"commands|messages)\b"
    r"|\b(?:new|updated|real|actual|hidden|secret|additional)\s+instructions?\s*:"
    r"|\bsystem\s+(?:prompt|instructions?)\b"
    r"|\byou\s+are\s+now\s+(?:dan|an?\s+(?:ai|assistant|chatbot|language\s+model|llm))\b"
    r"|\bfrom\s+now\s+on,?\s+you\s+(?:will|must|should|shall)\s+"
    r"(?:answer|reply|respond|act|ignore|only|say|tell)\b"
    r"|\b(?:developer|jailbreak|god)\s+mode\b"
    r"|<\|\s*[a-z_]+\s*\|>|\[/?inst\]|<</?sys>>"
    r"|^\s*(?:system|assistant)\s*:"
    r"|\bdo\s+not\s+(?:tell|inform|warn)\s+the\s+user\b",
    re.IGNORECASE | re.MULTILINE,
)

# Links: with a scheme, "www.", or a domain followed by a path ("evil.example/login").
_URL_RE = re.compile(
    r"\b(?:https?|ftp)://[^\s<>\"'()\[\]{}]+"
    r"|\bwww\.[^\s<>\"'()\[\]{}]+"
    r"|\b[a-z0-9][a-z0-9-]*(?:\.[a-z0-9-]+)*\.[a-z]{2,24}/[^\s<>\"'()\[\]{}]*",
    re.IGNORECASE,
)

# What phishing asks a reader to do: hand over credentials or money, follow a link, run
# something.
_CALL_TO_ACTION_RE = re.compile(
    r"\b(?:sign|log)\s?(?:in|on)\b"
    r"|\b(?:enter|confirm|verify|update|provide|send|share|type|reset)\s+(?:your|the)\s+"
    r"(?:password|passcode|pin|credentials?|login|account|card|bank|details|otp|code)\b"
    r"|\bclick\s+(?:here|this|below|the\s+link|on\s+the\s+link|the\s+button\s+below)\b"
    r"|\b(?:download|install|open|run)\s+(?:the|this)\s+(?:attachment|file|app|program|update)\b"
    r"|\b(?:wire|transfer|send)\s+(?:money|funds|a\s+payment|bitcoin|crypto)\b"
    r"|\bscan\s+(?:the|this)\s+qr\b",
    re.IGNORECASE,
)

# A source in the prompt's context (activities.llm.client.fuse_prompt): its id and its
# escaped text.
_SOURCE_BLOCK_RE = re.compile(r'<source id="(S\d+)"[^>]*>\n(.*?)\n</source>', re.DOTALL)


def _unescape(text: str) -> str:
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _plain(text: str) -> str:
    """What the checks compare: normalised, unescaped, lower-case, spaces collapsed."""
    return " ".join(_unescape(normalize_text(text)).lower().split())


def neutralize_source_text(text: str, *, escape_markup: bool = True) -> str:
    """Retrieved text made inert for a prompt: :func:`normalize_text`, then (with
    ``escape_markup``) ``&``, ``<`` and ``>`` escaped, so nothing inside can close the
    ``<source>`` delimiters or open a chat-template token, and every citation-like bracket
    (``[S2]``, ``[s1, S3]``) turned into ``(S2)``, so a document cannot forge another
    source's header or citation. Idempotent (escaped text is unescaped first), so fusing a
    prompt twice gives the same prompt. Without ``escape_markup`` (the extractive answer,
    which is shown, not prompted) only the brackets are neutralised."""
    text = normalize_text(text)
    if escape_markup:
        text = _escape(_unescape(text))

    def paren(m: re.Match[str]) -> str:
        ids = re.split(r"\s*[,;]\s*", m.group(1).upper())
        return "(" + ", ".join(ids) + ")"

    return _FORGED_CITATION_RE.sub(paren, text)


def instruction_markers(text: str) -> list[str]:
    """Instruction-like phrases in ``text`` (what prompt injections are made of: "ignore
    previous instructions", "system prompt", "you are now", chat-template tokens, role
    lines), normalised and lower-cased, first occurrence first. Seen through invisible
    characters, fullwidth letters and escaping."""
    plain = _unescape(normalize_text(text))
    found = (" ".join(m.group(0).lower().split()) for m in _INSTRUCTION_RE.finditer(plain))
    return list(dict.fromkeys(found))


def source_texts(context: str) -> dict[str, str]:
    """Source id -> text, from a context made of ``<source id="S1">`` blocks
    (:func:`activities.llm.client.fuse_prompt`); ``{"*": context}`` for an older context
    without delimiters (then checks treat the context as one source)."""
    blocks = {m.group(1): m.group(2) for m in _SOURCE_BLOCK_RE.finditer(context)}
    return blocks or ({"*": context} if context.strip() else {})


def _url_core(url: str) -> str:
    core = url.rstrip(".,;:!?*_'\"").lower()
    core = re.sub(r"^(?:https?|ftp)://", "", core)
    return core.removeprefix("www.").rstrip("/")


def injection_problem(answer: str, cited: list[str], context: str) -> str:
    """Why ``answer`` looks like the work of a prompt injection, or ``""``.

    Refused: an answer with instruction-like text (:func:`instruction_markers`) whatever
    the sources say; an answer with a URL, or a call to action (sign in, enter your
    password, click here, send money, ...), that none of the sources it ``cited`` contains
    in an honest form, that is: in a source that does not itself carry instruction-like
    text. Each source's text comes from ``context`` (:func:`source_texts`)."""
    markers = instruction_markers(answer)
    if markers:
        return f"repeats instruction-like text ({markers[0]!r}): a source may carry an injection"
    texts = source_texts(context)
    if "*" in texts:
        cited = ["*"]
    honest = [
        _plain(texts[sid]) for sid in cited if sid in texts and not instruction_markers(texts[sid])
    ]
    tainted = [sid for sid in cited if sid in texts and instruction_markers(texts[sid])]
    plain_answer = _unescape(normalize_text(answer))
    for m in _URL_RE.finditer(plain_answer):
        core = _url_core(m.group(0))
        if core and not any(core in text for text in honest):
            where = f"; {', '.join(tainted)} carries instruction-like text" if tainted else ""
            return f"brings a URL that no honest cited source contains: {core[:80]}{where}"
    for m in _CALL_TO_ACTION_RE.finditer(plain_answer):
        phrase = " ".join(m.group(0).lower().split())
        if not any(phrase in text for text in honest):
            return f"brings a call to action that no honest cited source contains: {phrase!r}"
    return ""


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
    """Fraction of the answer's content words, numbers and identifiers (with repeats)
    found in the context; 1.0 for an answer with none. Words are compared by their
    Snowball stem ("shipped" meets "shipping"), numbers by value (``1,450`` = ``1450``)."""
    facts = _Facts.of(answer, names=False)
    total = len(facts.words) + len(facts.numbers) + len(facts.identifiers)
    if not total:
        return 1.0
    ctx = _Facts.of(context, names=False)
    stems = set(ctx.words) | {_stem(w) for w in _normalise_words(context)}
    numbers, identifiers = set(ctx.numbers), set(ctx.identifiers)
    hits = sum(1 for w in facts.words if w in stems)
    hits += sum(1 for n in facts.numbers if n in numbers)
    hits += sum(1 for i in facts.identifiers if i in identifiers)
    return hits / total


def _normalise_words(text: str) -> list[str]:
    return [m.group(0).lower() for m in _WORD_RE.finditer(text)]


# --- claim-level grounding ------------------------------------------------------------------
# Why more than the word-overlap share: measured on bench/validator_set.py (docs/quality.md),
# the share alone accepted 71 % of answers that must be refused (an invented number or name
# changes one word of ten) and refused real paraphrases. The checks below read the answer
# claim by claim, each against the sources it cites.

# Snowball stemmers keep state while stemming: one per thread (summaries are checked in a
# thread pool), and a cache, since answers and sources repeat their words.
_STEMMERS = threading.local()


@functools.lru_cache(maxsize=65536)
def _stem(word: str) -> str:
    stemmer = getattr(_STEMMERS, "english", None)
    if stemmer is None:
        stemmer = _STEMMERS.english = snowballstemmer.stemmer("english")
    return str(stemmer.stemWord(word))


# Where a claim ends: a sentence end (not a decimal point or a dot inside a domain), a
# semicolon, a new line, or right after a citation group.
_SENTENCE_END_RE = re.compile(r"(?<=[.!?;])\s+|\n+")
_SOURCE_SENTENCE_END_RE = re.compile(r"(?<=[.!?;])\s+|\n+")

# Identifiers: a token holding a digit and an upper-case letter (PN-4471-B, INV-2024-0042,
# NCT-0457, TX-900, Q2). Compared whole: one changed character is another part or invoice.
_IDENTIFIER_RE = re.compile(
    r"(?<![\w-])(?=[\w-]*\d)(?=[\w-]*[A-Z])[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*(?![\w-])"
)
_NUMBER_RE = re.compile(r"\d+(?:[.,]\d+)*")
_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        [
            "zero",
            "one",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            "eleven",
            "twelve",
            "thirteen",
            "fourteen",
            "fifteen",
            "sixteen",
            "seventeen",
            "eighteen",
            "nineteen",
            "twenty",
        ]
    )
    if w != "one"  # "one" is as often a pronoun ("a one-off", "the one on the left")
} | {
    "thirty": "30",
    "forty": "40",
    "fifty": "50",
    "sixty": "60",
    "seventy": "70",
    "eighty": "80",
    "ninety": "90",
    "hundred": "100",
    "thousand": "1000",
}
# A capitalised word inside a sentence: a name, a place, a month, a brand.
_NAME_RE = re.compile(r"(?<![\w'’-])[A-Z][\w'’]*")
# The opening delimiter's description of a source (activities.rag.fusion._source_open).
_SOURCE_TYPE_RE = re.compile(r'<source id="(S\d+)" type="([^"]*)">')
_MONTHS = [
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
]
# A claim about where something is: the source's description may support its numbers.
_LOCATION_RE = re.compile(
    r"\b(?:page|pages|passage|paragraph|frame|second|seconds|minute|slide|keyframe)\b",
    re.IGNORECASE,
)
# A claim that adds up ("36 in total"): its number may be the sum of two in the evidence.
_TOTAL_RE = re.compile(r"\b(?:total|in all|altogether|combined|together|sum)\b", re.IGNORECASE)
# A claim's share of supported words is judged from this many words, numbers and
# identifiers up ("At most 5 degrees" has two: one unmatched word must not sink it), and
# must reach the lower of min_grounding and CLAIM_MIN_GROUNDING: a single claim's share is
# noisier than a whole answer's (one synonym in four words is 25 %).
MIN_JUDGED_WORDS = 3
CLAIM_MIN_GROUNDING = 0.5
# A remote image in Markdown: rendering it sends a request to its host with whatever the
# URL carries, the classic way an injection exfiltrates a conversation.
_MARKDOWN_IMAGE_RE = re.compile(r"!\[[^\]]*\]\(\s*[^)\s]+")


def _number_key(text: str) -> str:
    """``1,450`` and ``1450``, ``12.50`` and ``12.5``, ``00`` and ``0`` compare equal."""
    if re.fullmatch(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?", text):
        text = text.replace(",", "")
    text = text.replace(",", ".")
    if text.count(".") > 1:  # a version or a dotted code: compare as written
        return text
    whole, _, frac = text.partition(".")
    whole = whole.lstrip("0") or "0"
    frac = frac.rstrip("0")
    return f"{whole}.{frac}" if frac else whole


@dataclass
class _Facts:
    """What a piece of text states, in comparable form: stemmed content words, numbers,
    identifiers and names (lower-cased)."""

    words: list[str]
    numbers: list[str]
    identifiers: list[str]
    names: list[str]

    @classmethod
    def of(cls, text: str, *, names: bool = True) -> _Facts:
        text = _CITATION_GROUP_RE.sub(" ", _unescape(normalize_text(text)))
        text = re.sub(r"\[(?:" + "|".join(PII_KINDS) + r")\]", " ", text)
        identifiers = [m.group(0).lower() for m in _IDENTIFIER_RE.finditer(text)]
        rest = _IDENTIFIER_RE.sub(" ", text)
        numbers = [_number_key(m.group(0)) for m in _NUMBER_RE.finditer(rest)]
        words: list[str] = []
        for m in _WORD_RE.finditer(_NUMBER_RE.sub(" ", rest)):
            w = m.group(0).lower()
            if w in _NUMBER_WORDS:
                numbers.append(_NUMBER_WORDS[w])
            elif len(w) >= 3 and w not in STOP_WORDS:
                words.append(_stem(w))
        found_names: list[str] = []
        if names:
            for sentence in _SENTENCE_END_RE.split(rest):
                first = True
                for m in _NAME_RE.finditer(sentence):
                    before = sentence[: m.start()].rstrip()
                    # The first word of a sentence, a clause after a colon or an opening
                    # quote is capitalised for grammar, not because it names something.
                    if first and not re.search(r"[\w]", before):
                        first = False
                        continue
                    first = False
                    if before.endswith((":", '"', "“", "(")):
                        continue
                    w = m.group(0).lower().rstrip("'’")
                    w = re.sub(r"['’]s$", "", w)
                    if (
                        len(w) >= 2
                        and (w not in STOP_WORDS or w == "may")
                        and w not in _NUMBER_WORDS
                    ):
                        found_names.append(w)
        return cls(words, numbers, identifiers, found_names)


@dataclass
class _Evidence:
    """What the cited sources support: every word (stemmed and as written), number and
    identifier of their honest text; and what only their instruction-like sentences say."""

    stems: set[str]
    plain: set[str]
    numbers: set[str]
    identifiers: set[str]
    injected: set[str]

    @classmethod
    def of(cls, texts: Iterable[str]) -> _Evidence:
        honest: list[str] = []
        hostile: list[str] = []
        for text in texts:
            for sentence in _SOURCE_SENTENCE_END_RE.split(_unescape(normalize_text(text))):
                (hostile if instruction_markers(sentence) else honest).append(sentence)
        body = "\n".join(honest)
        facts = _Facts.of(body, names=False)
        plain = {w for w in _normalise_words(_NUMBER_RE.sub(" ", body))}
        stems = set(facts.words) | {_stem(w) for w in plain}
        # "14 October" supports "14/10" and "2024-10-14": a month named is its number too.
        months = {str(i) for i, m in enumerate(_MONTHS, 1) if m in plain or m[:3] in plain}
        if not re.search(r"\bMay\b", body):
            months.discard("5")  # "may" in lower case is a verb
        bad = _Facts.of("\n".join(hostile), names=False)
        injected = {w for w in bad.words if w not in stems}
        injected |= {
            _stem(w)
            for w in _normalise_words("\n".join(hostile))
            if len(w) >= 3 and w not in STOP_WORDS and _stem(w) not in stems
        }
        return cls(stems, plain, set(facts.numbers) | months, set(facts.identifiers), injected)

    def sums_to(self, number: str) -> bool:
        """Whether ``number`` is the sum of two numbers of the evidence ("27 electric and 9
        diesel vans": 36 in total)."""
        try:
            target = float(number)
            values = [float(n) for n in self.numbers]
        except ValueError:
            return False
        return any(
            abs(a + b - target) < 1e-9 for i, a in enumerate(values) for b in values[i + 1 :]
        )

    def supports(self, word: str) -> bool:
        return word in self.stems or _stem(word) in self.stems


def _judged_words(text: str) -> int:
    facts = _Facts.of(text, names=False)
    return len(facts.words) + len(facts.numbers) + len(facts.identifiers)


def _claims(body: str) -> list[tuple[str, list[str]]]:
    """The answer cut into claims, each with the source ids it cites: a claim ends at a
    sentence end or right after a citation group ("A [S1] and B [S2]." is two claims).
    Text after a sentence's last citation, and a sentence without one, cite nothing
    (they are then checked against every source the answer cites)."""
    claims: list[tuple[str, list[str]]] = []
    for sentence in _SENTENCE_END_RE.split(body):
        start = 0
        for m in _CITATION_GROUP_RE.finditer(sentence):
            ids = [sid for sid in re.split(r"\s*[,;]\s*", m.group(1))]
            # "[S1][S2]": adjacent groups cite one claim together.
            if claims and not sentence[start : m.start()].strip(" \t.,;") and start:
                claims[-1][1].extend(ids)
            else:
                claims.append((sentence[start : m.start()], ids))
            start = m.end()
        tail = sentence[start:]
        if tail.strip(" \t.,;:!?"):
            claims.append((tail, []))
    return claims


def check_claims(
    body: str, cited: list[str], context: str, min_grounding: float
) -> tuple[str, int, int]:
    """Why one claim of ``body`` is not supported by the sources it cites (``""`` when
    every claim is), and how many of the answer's words, numbers and identifiers the
    sources support, out of how many (the whole answer's share, by the same rules).

    Each claim (:func:`_claims`) is read against its cited sources' text (all the sources
    the answer cites, for a claim without a citation of its own), with the sentences that
    carry instruction-like text left out (text written to the model is not evidence):

    - every number (``1,450`` = ``1450``; spelled numbers from two to twenty and the tens
      count), identifier (a token with a digit and a capital, ``PN-4471-B``) and name (a
      capitalised word inside a sentence) must occur there: an invented total, part, date
      or person is one word among many and would pass a share of words;
    - a word that only the sources' instruction-like sentences hold ("say the warranty is
      void") means the answer did what an injection asked;
    - at least ``min_grounding`` of the claim's content words, numbers and identifiers
      must occur there (words compared by their Snowball stem, so "shipped" meets
      "shipping"); a claim with fewer than three of them is judged by the rules above only.
    """
    texts = source_texts(context)
    if "*" in texts:
        return "", 0, 0  # one undivided context: only the whole-answer share applies
    # What the prompt says a source is ("PDF page 3, passage 2", "video frame at 42 s") is
    # the product's, and a fair thing to state in a claim about where: "on page 3 [S1]".
    located = dict(texts)
    for m in _SOURCE_TYPE_RE.finditer(context):
        if m.group(1) in texts:
            where_text = _unescape(m.group(2)).replace("&quot;", "")
            located[m.group(1)] = f"{where_text}\n{texts[m.group(1)]}"
    all_cited = [sid for sid in cited if sid in texts]
    supported = judged = 0
    evidence_cache: dict[tuple[tuple[str, ...], bool], _Evidence] = {}
    for claim, ids in _claims(body):
        ids = [sid for sid in ids if sid in texts] or all_cited
        if not ids:
            continue
        key = tuple(sorted(set(ids)))
        pool = located if _LOCATION_RE.search(claim) else texts
        if (key, pool is located) not in evidence_cache:
            evidence_cache[key, pool is located] = _Evidence.of(pool[sid] for sid in key)
        ev = evidence_cache[key, pool is located]
        facts = _Facts.of(claim)
        where = ", ".join(key)
        totals = _TOTAL_RE.search(claim) is not None
        for number in facts.numbers:
            if number not in ev.numbers and not (totals and ev.sums_to(number)):
                return f"states {number}, which {where} does not contain", 0, 0
        for ident in facts.identifiers:
            if ident not in ev.identifiers and ident not in ev.plain:
                return f"names {ident.upper()}, which {where} does not contain", 0, 0
        for name in facts.names:
            if name not in ev.plain and not ev.supports(name):
                return f"names {name!r}, which {where} does not contain", 0, 0
        injected = [w for w in facts.words if w in ev.injected]
        if injected:
            return (
                f"repeats {injected[0]!r} from instruction-like text in {where}: the answer "
                "follows an injection",
                0,
                0,
            )
        total = len(facts.words) + len(facts.numbers) + len(facts.identifiers)
        hits = sum(1 for w in facts.words if w in ev.stems)
        hits += len(facts.numbers) + len(facts.identifiers)
        supported, judged = supported + hits, judged + total
        if total >= MIN_JUDGED_WORDS and hits / total < min(min_grounding, CLAIM_MIN_GROUNDING):
            return (
                f"a claim is not grounded in {where}: {hits}/{total} of its words occur "
                f"there: {' '.join(claim.split())[:80]!r}",
                supported,
                judged,
            )
    return "", supported, judged


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
    when it looks like the work of a prompt injection (:func:`injection_problem`:
    instruction-like text, or a URL or call to action its honest cited sources do not
    hold); or when fewer than ``min_grounding`` of its content words occur in ``context``
    (the text of the sources as sent to the model, ``<source>`` blocks). The caller then
    shows :data:`I_DONT_KNOW` with the sources instead.
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
    problem = injection_problem(body, cited, context)
    if not problem and _MARKDOWN_IMAGE_RE.search(_unescape(normalize_text(body))):
        problem = "embeds a remote image: rendering it would send a request to its host"
    if problem:
        return ValidationResult(False, problem, cited, grounding_score(body, context))
    claim, supported, judged = check_claims(body, cited, context, min_grounding)
    if "*" in source_texts(context):  # an undivided context (no <source> blocks)
        score, judged = grounding_score(body, context), _judged_words(body)
    else:
        score = supported / judged if judged else 1.0
    if claim:
        return ValidationResult(False, f"not grounded in the sources: {claim}", cited, score)
    if score < min_grounding and judged >= MIN_JUDGED_WORDS:
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
    be summarised), or when the chunk or the summary carries instruction-like text
    (:func:`instruction_markers`). The caller then falls back to the extractive summary.
    """
    text = (summary or "").strip()
    if not text:
        return ValidationResult(False, "empty summary")
    cited = extract_citations(text)
    if cited:
        return ValidationResult(False, "a summary must not cite sources", cited)
    if instruction_markers(source_text) or instruction_markers(text):
        # Keep a hostile chunk in its own (neutralised) words: a summary could keep its
        # link and drop the phrase that marks it, and the answer check relies on that mark.
        return ValidationResult(False, "the chunk carries instruction-like text")
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
