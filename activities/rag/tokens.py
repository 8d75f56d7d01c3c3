"""Token counting for prompts: tiktoken in the configured LLM's encoding (``o200k_base``
for gpt-4o-mini) when that encoding's file is available offline, never downloading it;
otherwise a conservative approximation (see :func:`count_tokens`). ``MMRAG_TOKENIZER``
overrides the encoding ("approx": always the approximation). Both settings come from
``settings.get_settings()``, the one parser of the environment, read once per process."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from functools import lru_cache
from typing import Any

from settings import get_settings

log = logging.getLogger(__name__)


DEFAULT_LLM_MODEL = "gpt-4o-mini"
# The encoding for a model tiktoken does not know (a vLLM-served model, a new release):
# o200k_base, the encoding of OpenAI's current models.
FALLBACK_ENCODING = "o200k_base"
# tiktoken's BPE file per encoding: where tiktoken downloads it from (its cache file is named
# by the SHA-1 of this URL) and its SHA-256 (else tiktoken deletes it and downloads it
# again). Copied from tiktoken_ext/openai_public.py; o200k_harmony shares o200k_base's file.
_BPE_FILES = {
    "o200k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
    "o200k_harmony": (
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
    "cl100k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
    "p50k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/p50k_base.tiktoken",
        "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069",
    ),
    "r50k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken",
        "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
    ),
}

# Chat format overhead (OpenAI's published rule for gpt-3.5/4-family chat models): ~3
# tokens framing each message plus 3 priming the reply.
TOKENS_PER_MESSAGE = 3
TOKENS_REPLY_PRIMING = 3

_APPROX_PIECE_RE = re.compile(
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\w]?[^\W\d_]+|\d{1,3}| ?[^\s\w]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"
)
_APPROX_SEGMENT_RE = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[^\W\d_]+")


@lru_cache(maxsize=64)
def _encoding_for_model(model: str) -> str:
    try:
        import tiktoken.model  # a name table only: loads no BPE file

        return tiktoken.model.encoding_name_for_model(model)
    except KeyError:
        return FALLBACK_ENCODING


def tokenizer_encoding(model: str | None = None) -> str:
    """The tiktoken encoding that prompts for ``model`` are counted in.

    ``model`` defaults to the configured LLM (``Settings.llm_model``, else gpt-4o-mini), so
    the retrieve step counts in the tokenizer of the model the generate step will call:
    gpt-4o/4.1/5 and o-series use ``o200k_base``, gpt-4 and gpt-3.5 ``cl100k_base``, and a
    name tiktoken does not know gets :data:`FALLBACK_ENCODING`. ``MMRAG_TOKENIZER`` set to
    an encoding name (e.g. ``cl100k_base``) overrides the choice.
    """
    settings = get_settings()
    override = settings.tokenizer.strip()
    if override and override.lower() != "approx":
        return override
    if model is None:
        model = settings.llm_model.strip() or DEFAULT_LLM_MODEL
    return _encoding_for_model(model)


def _tiktoken_cache_file(encoding: str) -> str | None:
    """The path where tiktoken would find ``encoding``'s BPE file without downloading, if
    present and intact."""
    if encoding not in _BPE_FILES:
        return None
    url, sha256 = _BPE_FILES[encoding]
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            cache_dir = os.environ[var]
            break
    else:
        import tempfile

        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if not cache_dir:
        return None
    path = os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())
    try:
        with open(path, "rb") as f:
            ok = hashlib.sha256(f.read()).hexdigest() == sha256
    except OSError:
        return None
    return path if ok else None


@lru_cache(maxsize=8)
def _encoder(encoding: str) -> Any | None:
    """tiktoken's ``encoding`` if its BPE file is already on disk, else ``None``.

    Never downloads: ``tiktoken.get_encoding`` fetches the file over HTTPS on a cache miss,
    which on an offline worker would put a failing network call on the query path. Loaded
    once per process and encoding (it takes ~0.3 s).
    """
    if _tiktoken_cache_file(encoding) is None:
        url = _BPE_FILES.get(encoding, ("",))[0]
        log.info(
            "tiktoken %s not in its cache (%s); counting tokens approximately",
            encoding,
            f"set TIKTOKEN_CACHE_DIR to a folder holding {url} as "
            f"{hashlib.sha1(url.encode()).hexdigest()}"
            if url
            else "no offline file known for it: set MMRAG_TOKENIZER to o200k_base or cl100k_base",
        )
        return None
    try:
        import tiktoken

        return tiktoken.get_encoding(encoding)
    except Exception as exc:  # e.g. tiktoken's own loader changed
        log.warning("tiktoken %s unusable (%s); counting tokens approximately", encoding, exc)
        return None


def _active_encoder() -> Any | None:
    if get_settings().tokenizer.strip().lower() == "approx":
        return None
    return _encoder(tokenizer_encoding())


def tokenizer_name() -> str:
    """``"tiktoken:o200k_base"`` (the configured model's encoding) or ``"approx"``: which
    counter :func:`count_tokens` uses (worth recording with a query's figures)."""
    return f"tiktoken:{tokenizer_encoding()}" if _active_encoder() is not None else "approx"


def approx_tokens(text: str) -> int:
    """A conservative, dependency-free estimate of the token count (calibrated on
    cl100k_base; o200k_base's larger vocabulary usually needs fewer tokens still).

    Splits the text the way cl100k's pre-tokeniser does (letters, up to three digits,
    punctuation runs, whitespace) and charges each piece: one token per started 5 letters
    of a lower/mixed-case word segment (CamelCase split), per started 2 letters of an
    all-caps segment, one per 1–3 digit group, one per 2 punctuation characters, one per
    whitespace run, and one per 2 UTF-8 bytes of non-ASCII text. Measured against the real
    encoding on English prose, Markdown, Python source, German, Japanese, Russian, emoji
    and number-heavy text: 1.1–1.45× the true count for whole documents and never below
    0.95× on windows of 60+ characters, so a prompt fused within budget with it fits the
    real budget (at the price of using ~20–40 % less of it).
    """
    n = 0
    for m in _APPROX_PIECE_RE.finditer(text):
        piece = m.group(0)
        if not piece.isascii():
            n += math.ceil(len(piece.encode()) / 2)
            continue
        core = piece.lstrip(" ")
        if core[:1].isalpha() or core[1:2].isalpha():
            lead = 0 if core[:1].isalpha() else 1
            n += lead
            for seg in _APPROX_SEGMENT_RE.findall(core[lead:]):
                n += 1 + (len(seg) - 1) // (2 if seg.isupper() else 5)
        elif core[:1].isdigit() or not core.strip():
            n += 1
        else:
            n += math.ceil(len(core) / 2)
    return n


def count_tokens(text: str) -> int:
    """Tokens in ``text`` under the configured LLM's encoding (:func:`tokenizer_encoding`:
    ``o200k_base`` for the default gpt-4o-mini).

    Exact when tiktoken's file for that encoding is in its cache (``TIKTOKEN_CACHE_DIR``, or
    the default ``$TMPDIR/data-gym-cache``, under the SHA-1 of its download URL); otherwise,
    and always when ``MMRAG_TOKENIZER=approx``, the conservative :func:`approx_tokens`. It
    never downloads anything (see :func:`_encoder`). Special-token text such as
    ``<|endoftext|>`` is counted as ordinary text.
    """
    if not text:
        return 0
    enc = _active_encoder()
    if enc is None:
        return approx_tokens(text)
    return len(enc.encode(text, disallowed_special=()))


def chat_tokens(system: str, user: str) -> int:
    """Prompt tokens of a system + user chat request, framing included."""
    return count_tokens(system) + count_tokens(user) + 2 * TOKENS_PER_MESSAGE + TOKENS_REPLY_PRIMING
