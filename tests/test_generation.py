"""Unit tests of the generation side of ``Ask``: guardrails, token budget, prompt fusion,
the extractive answer, and the LLM client against a real HTTP OpenAI-compatible server.

Fast (no Temporal, no Milvus); every test that talks HTTP gets its own server, and so its
own circuit breaker (breakers are shared per endpoint URL, which includes the port).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pybreaker
import pytest

from activities.llm import client
from activities.llm.client import (
    LlmConfig,
    LlmGenerator,
    LlmUnavailableError,
    PermanentLlmError,
    TransientLlmError,
)
from activities.rag import fusion, tokens
from activities.rag.fusion import (
    EXTRACTIVE_LABEL,
    FusedPrompt,
    SourceChunk,
    extractive_answer,
    fuse_prompt,
)
from activities.rag.guardrails import (
    I_DONT_KNOW,
    extract_citations,
    iban_ok,
    insert_citations,
    luhn_ok,
    redact_pii,
    source_texts,
    validate_answer,
)
from activities.rag.summaries import summarize_extractive, truncate_to_tokens
from activities.rag.tokens import approx_tokens, chat_tokens, count_tokens
from settings import get_settings
from tests.llm_server import LlmTestServer

API_KEY = "sk-test-0123456789abcdefSECRET"

PII_QUESTION = (
    "I'm jane.roe@example.com, call me on +44 20 7946 0958 or (555) 123-4567; "
    "card 4111 1111 1111 1111, IBAN DE89 3704 0044 0532 0130 00, SSN 123-45-6789. "
    "What colour is the square?"
)
PII_VALUES = [
    "jane.roe@example.com",
    "7946 0958",
    "123-4567",
    "4111 1111 1111 1111",
    "DE89 3704 0044 0532 0130 00",
    "123-45-6789",
]


def _sources(n: int = 3, words: int = 20) -> list[SourceChunk]:
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
    out = []
    for i in range(n):
        colour = colours[i % len(colours)]
        filler = " ".join(f"detail{i}x{j}" for j in range(words))
        out.append(
            SourceChunk(
                id=f"S{i + 1}",
                asset_id=f"asset{i}",
                uri=f"file:///media/{i}.png",
                chunk="" if i % 2 == 0 else f"page:{i}",
                media_type="image" if i % 2 == 0 else "pdf",
                score=1.0 - i / 10,
                snippet=f"The square in figure {i} is {colour}. {filler}.",
                caption=f"A {colour} square on a grey background.",
            )
        )
    return out


# --- redaction ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        (
            "write to john.doe+rag@mail.example.co.uk today",
            "EMAIL",
            "john.doe+rag@mail.example.co.uk",
        ),
        ("call +44 20 7946 0958 today", "PHONE", "+44 20 7946 0958"),
        ("call +1 (555) 123-4567", "PHONE", "+1 (555) 123-4567"),
        ("office (555) 123-4567.", "PHONE", "(555) 123-4567"),
        ("office 555-123-4567", "PHONE", "555-123-4567"),
        ("office 555.123.4567", "PHONE", "555.123.4567"),
        ("toll free 1-800-555-0199", "PHONE", "1-800-555-0199"),
        ("Berlin +49 30 123456789", "PHONE", "+49 30 123456789"),
        ("Paris +33 1 23 45 67 89", "PHONE", "+33 1 23 45 67 89"),
        ("London 020 7946 0958", "PHONE", "020 7946 0958"),
        ("mobile 07700 900123", "PHONE", "07700 900123"),
        ("tel: 5551234567", "PHONE", "5551234567"),
        ("card 4111 1111 1111 1111 exp 12/29", "CARD", "4111 1111 1111 1111"),
        ("card 4111-1111-1111-1111", "CARD", "4111-1111-1111-1111"),
        ("card 5555555555554444.", "CARD", "5555555555554444"),
        ("amex 3782 822463 10005", "CARD", "3782 822463 10005"),
        ("IBAN DE89 3704 0044 0532 0130 00, thanks", "IBAN", "DE89 3704 0044 0532 0130 00"),
        ("IBAN GB82WEST12345698765432", "IBAN", "GB82WEST12345698765432"),
        ("SSN 123-45-6789", "ID", "123-45-6789"),
        ("her number is 078-05-1120.", "ID", "078-05-1120"),
        ("passport no. X1234567 expires", "ID", "X1234567"),
        ("NI AB 12 34 56 C", "ID", "AB 12 34 56 C"),
    ],
)
def test_redact_pii_finds(text: str, kind: str, value: str) -> None:
    redacted, counts = redact_pii(text)
    assert value not in redacted
    assert f"[{kind}]" in redacted
    assert counts[kind] == 1
    assert sum(counts.values()) == 1, counts
    # Redacting again changes nothing.
    assert redact_pii(redacted) == (redacted, dict.fromkeys(counts, 0))


@pytest.mark.parametrize(
    "text",
    [
        "In 2019 and 2020 the price rose from $1,299.99 to $1,499.00 (page 123, pp. 45-67).",
        "Order 12345 shipped 2024-01-15 10:30, due 01-12-2024 10:30.",
        "ISBN 978-3-16-148410-0 and ISBN 9783161484100.",
        "version 3.11.7 at build 4.2; -40 to 85 C; 48.8566, 2.3522.",
        "years 2019 2020 2021 2022 and the timestamp 1700000000000.",
        "1,000,000 users; 1 299 000 units; score 98.6%; room 101; Fig. 3.2.1.",
        "an invalid card 4111 1111 1111 1112 and an impossible 000-12-3456.",
        "3 +5 = 8 between 10:00 and 12:00; tracking 1Z999AA10123456784.",
        "a bare number 5551234567 with no keyword.",
    ],
)
def test_redact_pii_leaves_ordinary_numbers(text: str) -> None:
    redacted, counts = redact_pii(text)
    assert redacted == text
    assert sum(counts.values()) == 0


def test_redact_pii_counts_several() -> None:
    redacted, counts = redact_pii(PII_QUESTION)
    assert counts == {"EMAIL": 1, "PHONE": 2, "CARD": 1, "IBAN": 1, "ID": 1, "IP": 0}
    for value in PII_VALUES:
        assert value not in redacted
    assert redacted.endswith("What colour is the square?")


def test_checksums() -> None:
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("DE89 3704 0044 0532 0130 00") and not iban_ok("DE89 3704 0044 0532 0130 01")


# --- tokens --------------------------------------------------------------------------------


def test_count_tokens_basics() -> None:
    assert count_tokens("") == 0
    assert count_tokens("hello") >= 1
    short, long = count_tokens("a red square"), count_tokens("a red square " * 50)
    assert long > 10 * short


def test_count_tokens_never_downloads(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    """With no cached encoding, counting falls back to the approximation without any
    network call (socket creation is made to fail)."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MMRAG_TOKENIZER", raising=False)

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("count_tokens tried to open a network connection")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    tokens._encoder.cache_clear()
    try:
        assert tokens.tokenizer_name() == "approx"
        assert count_tokens("multimodal retrieval") == approx_tokens("multimodal retrieval")
    finally:
        tokens._encoder.cache_clear()


def test_tokenizer_encoding_follows_the_configured_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Prompts are counted in the encoding of the model that will read them: gpt-4o-mini
    (the default) and gpt-4o use o200k_base, gpt-4 cl100k_base, and a model tiktoken does
    not know (a vLLM-served one) the current o200k_base; MMRAG_TOKENIZER overrides."""

    def configured(**env: str) -> str:
        """The encoding a worker started with ``env`` counts in (settings are read once)."""
        for name in ("MMRAG_TOKENIZER", "MMRAG_LLM_MODEL"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()
        return tokens.tokenizer_encoding()

    try:
        assert configured() == "o200k_base"
        assert tokens.tokenizer_encoding("gpt-4o") == "o200k_base"
        assert tokens.tokenizer_encoding("gpt-4") == "cl100k_base"
        assert tokens.tokenizer_encoding("meta-llama/Llama-3.1-8B-Instruct") == "o200k_base"
        assert configured(MMRAG_LLM_MODEL="gpt-3.5-turbo") == "cl100k_base"
        assert configured(MMRAG_LLM_MODEL="gpt-3.5-turbo", MMRAG_TOKENIZER="o200k_base") == (
            "o200k_base"
        )
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()


def test_truncate_to_tokens_cuts_at_words() -> None:
    text = "alpha beta gamma delta epsilon zeta eta theta iota kappa " * 5
    cut = truncate_to_tokens(text, 8)
    assert count_tokens(cut) <= 8
    assert cut.endswith("…")
    assert text.startswith(cut[:-1].rstrip())
    assert all(w in text.split() for w in cut[:-1].split())


def test_summarize_extractive_selects_sentences() -> None:
    text = (
        "The warehouse opened in 1998. It stores frozen food. "
        "The loading dock faces north. Its roof is painted green."
    )
    assert summarize_extractive(text, 200) == text
    summary = summarize_extractive(text, 12, question="What colour is the roof?")
    assert "roof is painted green" in summary
    assert count_tokens(summary) <= 12
    # Without a question: leading sentences, whole ones.
    two = "The warehouse opened in 1998. It stores frozen food. …"
    lead = summarize_extractive(text, count_tokens(two) + 2)
    assert lead == two
    cut = summarize_extractive(text, 6)
    assert cut.startswith("The warehouse") and cut.endswith("…")
    assert count_tokens(cut) <= 6


# --- prompt fusion -------------------------------------------------------------------------


def test_fuse_prompt_redacts_question_and_sources() -> None:
    src = _sources(2)
    src[1].snippet = "Contact bob@example.org or 555-123-4567 about card 5555 5555 5555 4444."
    prompt = fuse_prompt(PII_QUESTION, src, token_budget=2000, per_chunk_tokens=100)
    blob = prompt.system + prompt.user + prompt.context
    for value in [*PII_VALUES, "bob@example.org", "555-123-4567", "5555 5555 5555 4444"]:
        assert value not in blob
    assert prompt.redactions == {"EMAIL": 2, "PHONE": 3, "CARD": 2, "IBAN": 1, "ID": 1, "IP": 0}
    assert prompt.used == ["S1", "S2"]
    assert '<source id="S1"' in prompt.user and '<source id="S2"' in prompt.user
    assert prompt.user.index('<source id="S1"') < prompt.user.index('<source id="S2"')
    assert list(source_texts(prompt.context)) == ["S1", "S2"]
    assert "answer only" in prompt.system.lower() or "ONLY" in prompt.system
    assert I_DONT_KNOW in prompt.system


def test_fuse_prompt_respects_budget_and_drops_lowest_ranked() -> None:
    sources = _sources(8, words=60)
    roomy = fuse_prompt("What colour is the square?", sources, 100_000, per_chunk_tokens=40)
    assert roomy.used == [s.id for s in sources]
    for body in source_texts(roomy.user).values():
        assert count_tokens(body) <= 40 + 1  # caption and text lines, joined by "\n"

    budget = roomy.tokens // 2
    tight = fuse_prompt("What colour is the square?", sources, budget, per_chunk_tokens=40)
    assert tight.tokens <= budget
    assert chat_tokens(tight.system, tight.user) == tight.tokens
    assert 0 < len(tight.used) < len(sources)
    assert tight.used == [s.id for s in sources[: len(tight.used)]]  # a prefix: rank kept
    dropped = sources[len(tight.used)].id
    assert f'<source id="{dropped}"' not in tight.user


def test_fuse_prompt_budget_too_small() -> None:
    with pytest.raises(ValueError, match="too small"):
        fuse_prompt("q", _sources(1), token_budget=20, per_chunk_tokens=40)


def test_fuse_prompt_long_question_is_shortened() -> None:
    question = "Tell me about the square. " * 400
    prompt = fuse_prompt(question, _sources(3), token_budget=1200, per_chunk_tokens=40)
    assert prompt.tokens <= 1200
    assert prompt.used  # the question did not eat the whole budget


# --- extractive answer ---------------------------------------------------------------------


def test_extractive_answer_is_labelled_cited_and_redacted() -> None:
    sources = _sources(4)
    sources[0].snippet = "The square is red. Ask alice@example.com for the original scan."
    answer = extractive_answer("What colour is the square?", sources)
    assert answer.startswith(EXTRACTIVE_LABEL)
    assert extract_citations(answer) == ["S1", "S2", "S3"]
    assert "alice@example.com" not in answer and "[EMAIL]" in answer
    assert "red" in answer
    assert extractive_answer("q", []).startswith(EXTRACTIVE_LABEL)
    assert I_DONT_KNOW in extractive_answer("q", [])


# --- validation and citations --------------------------------------------------------------

CONTEXT = "Caption: A red square on a grey background.\nText: The invoice total is 42 EUR."


@pytest.mark.parametrize(
    ("answer", "ok", "reason"),
    [
        ("The square is red, on a grey background [S1].", True, ""),
        ("The invoice total is 42 EUR [S1, S2].", True, ""),
        ("", False, "empty"),
        ("   \n", False, "empty"),
        ("The square is red [S3].", False, "S3"),
        ("The square is red on a grey background.", False, "cites none"),
        ("Napoleon commissioned purple towers across Europe in 1850 [S1].", False, "not grounded"),
        ("I don't know based on the retrieved sources.", False, "does not know"),
    ],
)
def test_validate_answer(answer: str, ok: bool, reason: str) -> None:
    result = validate_answer(answer, ["S1", "S2"], CONTEXT)
    assert result.ok is ok, result
    assert reason in result.reason


def test_validate_answer_threshold_is_configurable() -> None:
    half = "The square is red and the moon is made of cheese [S1]."
    assert not validate_answer(half, ["S1"], CONTEXT).ok
    assert validate_answer(half, ["S1"], CONTEXT, min_grounding=0.3).ok


def test_insert_citations_once() -> None:
    answer = "The square is red [S1]. The total is 42 EUR [S3]."
    once = insert_citations(answer, ["S1", "S3", "S1"])
    assert once.endswith("\n\nSources: [S1] [S3]")
    assert once.count("Sources:") == 1
    assert insert_citations(once, ["S1", "S3"]) == once
    # The model wrote its own line: replaced by the canonical one, not repeated.
    own = answer + "\nSources: [S1], [S3]"
    assert insert_citations(own, ["S1", "S3"]) == once
    assert insert_citations(answer, []) == answer


# --- configuration -------------------------------------------------------------------------


def test_llm_config_from_env() -> None:
    cfg = LlmConfig.from_env({})
    assert not cfg.enabled
    assert (cfg.model, cfg.breaker_fail_max, cfg.breaker_reset_s) == ("gpt-4o-mini", 5, 30.0)
    cfg = LlmConfig.from_env(
        {
            "OPENAI_API_KEY": API_KEY,
            "MMRAG_LLM_MODEL": "m",
            "MMRAG_LLM_TIMEOUT_S": "2.5",
            "MMRAG_BREAKER_FAIL_MAX": "3",
            "MMRAG_BREAKER_RESET_S": "1",
        }
    )
    assert cfg.enabled and cfg.model == "m" and cfg.timeout_s == 2.5
    assert (cfg.breaker_fail_max, cfg.breaker_reset_s) == (3, 1.0)
    assert API_KEY not in repr(cfg) and API_KEY not in str(cfg)
    assert LlmConfig.from_env({"OPENAI_BASE_URL": "http://vllm:8000/v1"}).enabled
    with pytest.raises(ValueError, match="MMRAG_LLM_TIMEOUT_S"):
        LlmConfig.from_env({"MMRAG_LLM_TIMEOUT_S": "soon"})


# --- the LLM client against the test server ------------------------------------------------


@pytest.fixture
def server() -> Iterator[LlmTestServer]:
    with LlmTestServer(api_key=API_KEY) as srv:
        yield srv


def _generator(srv: LlmTestServer, **overrides: object) -> LlmGenerator:
    settings: dict[str, object] = {
        "base_url": srv.base_url,
        "api_key": API_KEY,
        "model": "test-model",
        "timeout_s": 2.0,
        "breaker_fail_max": 3,
        "breaker_reset_s": 0.5,
    }
    settings.update(overrides)
    return LlmGenerator(LlmConfig(**settings))  # type: ignore[arg-type]


def _prompt(question: str = "What colour is the square?") -> FusedPrompt:
    return fuse_prompt(question, _sources(3), token_budget=1500, per_chunk_tokens=60)


def test_generate_ok_is_grounded_and_valid(server: LlmTestServer) -> None:
    gen = _generator(server)
    prompt = _prompt()
    result = gen.generate(prompt, "test-model", max_tokens=64)
    assert result.text == "A red square on a grey background. [S1]"
    assert not result.cached and result.model == "test-model"
    assert result.prompt_tokens > 0 and result.completion_tokens > 0
    assert validate_answer(result.text, prompt.used, prompt.context).ok
    body = server.requests[-1]
    assert body["model"] == "test-model" and body["max_tokens"] == 64
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert server.headers[-1].get("x-stainless-retry-count") == "0"
    assert gen.breaker_state() == "closed"


def test_no_pii_reaches_the_llm(server: LlmTestServer) -> None:
    gen = _generator(server)
    sources = _sources(2)
    sources[1].snippet = "Invoice for jane.roe@example.com, card 4111-1111-1111-1111."
    prompt = fuse_prompt(PII_QUESTION, sources, token_budget=1500, per_chunk_tokens=60)
    gen.generate(prompt, "test-model", max_tokens=64)
    sent = server.request_bodies_text()
    assert server.request_count == 1
    for value in [*PII_VALUES, "4111-1111-1111-1111"]:
        assert value not in sent
    assert "[EMAIL]" in sent and "[CARD]" in sent


def test_identical_prompts_hit_the_cache(server: LlmTestServer) -> None:
    gen = _generator(server)
    prompt = _prompt()
    first = gen.generate(prompt, "test-model", max_tokens=64)
    t0 = time.perf_counter()
    second = gen.generate(prompt, "test-model", max_tokens=64)
    assert time.perf_counter() - t0 < 0.01
    assert second.cached and not first.cached and second.text == first.text
    assert server.request_count == 1
    gen.generate(prompt, "test-model", max_tokens=65)  # a different request: not cached
    assert server.request_count == 2


def test_vision_sends_image_parts(server: LlmTestServer) -> None:
    gen = _generator(server)
    url = "data:image/png;base64,iVBORw0KGgo="
    result = gen.generate(_prompt(), "test-model", max_tokens=32, image_data_urls=[url])
    assert "[S1]" in result.text
    content = server.requests[-1]["messages"][1]["content"]
    assert content[0]["type"] == "text"
    assert content[1] == {"type": "image_url", "image_url": {"url": url}}
    with pytest.raises(ValueError, match="data:image"):
        gen.generate(_prompt(), "test-model", 32, image_data_urls=["https://example.com/a.png"])


def test_429_is_transient_with_retry_after(server: LlmTestServer) -> None:
    gen = _generator(server)
    server.set_mode("throttle", count=2, retry_after=3)
    for _ in range(2):
        with pytest.raises(TransientLlmError) as info:
            gen.generate(_prompt(), "test-model", max_tokens=64)
        assert info.value.status == 429 and info.value.retry_after_s == 3.0
    assert gen.generate(_prompt(), "test-model", max_tokens=64).text.endswith("[S1]")
    assert server.request_count == 3  # no hidden client retries
    assert gen.breaker_state() == "closed"


@pytest.mark.parametrize(("mode", "params"), [("fail", {}), ("down", {}), ("slow", {"delay": 2})])
def test_server_errors_and_timeouts_are_transient(
    server: LlmTestServer, mode: str, params: dict[str, float]
) -> None:
    gen = _generator(server, timeout_s=0.3)
    server.set_mode(mode, **params)
    t0 = time.perf_counter()
    with pytest.raises(TransientLlmError):
        gen.generate(_prompt(), "test-model", max_tokens=64)
    assert time.perf_counter() - t0 < 1.5


def test_breaker_opens_fails_fast_then_recovers(server: LlmTestServer) -> None:
    gen = _generator(server, breaker_fail_max=3, breaker_reset_s=0.4)
    transitions: list[str] = []

    class Recorder(pybreaker.CircuitBreakerListener):
        def state_change(self, cb: object, old_state: object, new_state: object) -> None:
            transitions.append(new_state.name)  # type: ignore[attr-defined]

    gen.breaker.add_listener(Recorder())
    server.set_mode("fail")
    for i in range(3):  # the third failure trips the breaker; each still reached the server
        with pytest.raises(TransientLlmError):
            gen.generate(_prompt(f"question {i}?"), "test-model", max_tokens=64)
    assert gen.breaker_state() == "open"
    seen = server.request_count

    t0 = time.perf_counter()
    with pytest.raises(LlmUnavailableError, match="circuit breaker is open"):
        gen.generate(_prompt("another question?"), "test-model", max_tokens=64)
    assert time.perf_counter() - t0 < 0.05
    assert server.request_count == seen  # refused without an HTTP request

    server.set_mode("ok")
    time.sleep(0.45)
    result = gen.generate(_prompt("after the outage?"), "test-model", max_tokens=64)
    assert result.text.endswith("[S1]")
    assert transitions == ["open", "half-open", "closed"]
    assert gen.breaker_state() == "closed"


def test_half_open_failure_reopens(server: LlmTestServer) -> None:
    gen = _generator(server, breaker_fail_max=1, breaker_reset_s=0.2)
    server.set_mode("fail")
    with pytest.raises(TransientLlmError):
        gen.generate(_prompt("a?"), "test-model", max_tokens=64)
    time.sleep(0.25)
    with pytest.raises(TransientLlmError):  # the trial call is made, and fails
        gen.generate(_prompt("b?"), "test-model", max_tokens=64)
    assert gen.breaker_state() == "open"
    with pytest.raises(LlmUnavailableError):
        gen.generate(_prompt("c?"), "test-model", max_tokens=64)


def test_401_is_permanent_and_never_shows_the_key(server: LlmTestServer) -> None:
    wrong_key = "sk-wrong-key-9f8e7d6c5b4a39281706"
    gen = _generator(server, api_key=wrong_key, breaker_fail_max=1)
    for _ in range(3):  # permanent errors do not trip the breaker
        with pytest.raises(PermanentLlmError) as info:
            gen.generate(_prompt(), "test-model", max_tokens=64)
    err = info.value
    assert err.status == 401
    assert "OPENAI_API_KEY" in str(err)
    assert wrong_key not in str(err) and wrong_key not in repr(err)
    assert err.__cause__ is None
    assert wrong_key in json.dumps(server.headers[-1])  # it was sent, and echoed back ...
    assert server.request_count == 3
    assert gen.breaker_state() == "closed"


@pytest.mark.parametrize(
    ("status", "hint"), [(400, "accepts this request"), (404, "MMRAG_LLM_MODEL")]
)
def test_4xx_is_permanent_with_a_hint(server: LlmTestServer, status: int, hint: str) -> None:
    gen = _generator(server)
    server.set_mode("status", status=status)
    with pytest.raises(PermanentLlmError, match=hint):
        gen.generate(_prompt(), "test-model", max_tokens=64)


def test_hallucinated_answer_fails_validation(server: LlmTestServer) -> None:
    gen = _generator(server)
    server.set_mode("hallucinate")
    prompt = _prompt()
    result = gen.generate(prompt, "test-model", max_tokens=64)
    check = validate_answer(result.text, prompt.used, prompt.context)
    assert not check.ok and "S9" in check.reason


def test_breaker_does_not_serialise_concurrent_calls(server: LlmTestServer) -> None:
    """pybreaker's ``call()`` holds a lock for the whole call; the generator must not."""
    gen = _generator(server)
    server.set_mode("slow", delay=0.4)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        results = list(
            pool.map(lambda i: gen.generate(_prompt(f"q{i}?"), "test-model", 32), range(4))
        )
    assert all(r.text.endswith("[S1]") for r in results)
    assert time.perf_counter() - t0 < 1.2  # serialised would take >= 1.6 s


def test_server_stops_cleanly_with_a_slow_request_in_flight() -> None:
    srv = LlmTestServer(mode="slow", delay=30).start()
    gen = _generator(srv, timeout_s=5.0)
    caller = threading.Thread(
        target=lambda: pytest.raises(TransientLlmError, gen.generate, _prompt(), "m", 16)
    )
    caller.start()
    time.sleep(0.2)
    t0 = time.perf_counter()
    srv.stop()
    caller.join(timeout=6)
    assert time.perf_counter() - t0 < 6 and not caller.is_alive()
    assert srv.request_count == 1


def test_generator_env_has_no_key_in_repr() -> None:
    cfg = LlmConfig(base_url="http://user:pw@host:9/v1", api_key=API_KEY)
    gen = LlmGenerator(cfg, breaker=pybreaker.CircuitBreaker())
    assert API_KEY not in repr(gen.config)
    assert client.safe_url(cfg.base_url) == "http://host:9/v1"
    gen.close()


# --- chunk summarisation by the LLM ----------------------------------------------------------

CHUNK_CAP = 60
CHUNK_QUESTION = "Where is the blue container stored?"
CHUNK_PII = ["ops.lead@example.com", "+44 20 7946 0958", "4111 1111 1111 1111"]


def _long_sources(n: int = 3) -> list[SourceChunk]:
    """Sources far over :data:`CHUNK_CAP`, made of real sentences, with PII in the text."""
    out = []
    for i in range(n):
        sentences = [
            f"Shelf {j} in hall {i} holds {j + 3} crates of spare parts." for j in range(25)
        ]
        sentences.insert(7, f"The blue container of hall {i} is stored in bay {i + 40}.")
        sentences.insert(12, f"Questions go to {CHUNK_PII[0]} or {CHUNK_PII[1]}.")
        sentences.insert(18, f"The deposit was paid with card {CHUNK_PII[2]}.")
        out.append(
            SourceChunk(
                id=f"S{i + 1}",
                asset_id=f"asset{i}",
                uri=f"file:///docs/{i}.pdf",
                chunk=f"page:{i + 1}",
                media_type="application/pdf",
                score=1.0 - i / 10,
                snippet=" ".join(sentences),
                caption=f"inventory hall {i}",
            )
        )
    return out


def _extractive(sources: list[SourceChunk]) -> FusedPrompt:
    return fuse_prompt(CHUNK_QUESTION, sources, token_budget=2000, per_chunk_tokens=CHUNK_CAP)


def _summarised(
    gen: LlmGenerator, sources: list[SourceChunk], first: FusedPrompt
) -> tuple[FusedPrompt, dict[str, client.ChunkSummary]]:
    used = [fusion.redacted_chunk(s) for s in sources if s.id in first.used]
    return client.fuse_with_llm_summaries(
        gen, first.question, used, first.shortened, 2000, CHUNK_CAP
    )


def _bodies(prompt: FusedPrompt) -> dict[str, str]:
    """Source id -> its text between the prompt's <source> delimiters."""
    return source_texts(prompt.user)


def test_fuse_prompt_reports_cut_sources_and_fuses_again_identically() -> None:
    sources = [*_long_sources(2), _sources(1, words=2)[0]]
    sources[2].id = "S3"
    first = _extractive(sources)
    assert first.used == ["S1", "S2", "S3"] and first.shortened == ["S1", "S2"]
    for value in CHUNK_PII:
        assert value not in first.question + first.user
    # What the retrieve step ships (redacted) fuses to exactly the same prompt.
    again = fuse_prompt(
        first.question, [fusion.redacted_chunk(s) for s in sources], 2000, CHUNK_CAP
    )
    assert (again.user, again.context, again.used) == (first.user, first.context, first.used)
    passage = fusion.chunk_passage(sources[0])
    assert "bay 40" in passage and "[EMAIL]" in passage and "[CARD]" in passage
    assert not any(value in passage for value in CHUNK_PII)


def test_fuse_prompt_shows_summaries_redacted_and_within_the_cap() -> None:
    sources = _long_sources(2)
    summaries = {
        "S1": "The blue container of hall 0 is stored in bay 40; ask ops.lead@example.com.",
        "S2": " ".join(f"Shelf {j} in hall 1 holds {j + 3} crates." for j in range(40)),
    }
    prompt = fuse_prompt(CHUNK_QUESTION, sources, 2000, CHUNK_CAP, summaries)
    bodies = _bodies(prompt)
    assert bodies["S1"] == "The blue container of hall 0 is stored in bay 40; ask [EMAIL]."
    assert count_tokens(bodies["S2"]) <= CHUNK_CAP and bodies["S2"].startswith("Shelf")
    assert prompt.redactions.get("EMAIL") == 1
    assert "ops.lead@example.com" not in prompt.user + prompt.context
    assert bodies["S1"] in prompt.context  # grounding is checked against the summaries


@pytest.mark.parametrize(
    ("summary", "ok"),
    [
        ("The blue container of hall 0 is stored in bay 40.", True),
        ("Shelf 3 holds 6 crates; the blue container is in bay 40.", True),
        ("", False),
        ("   ", False),
        ("The blue container is in bay 40 [S1].", False),
        ("I don't know.", False),
        ("Napoleon painted the Eiffel Tower purple in 1850 with his engineers.", False),
    ],
)
def test_validate_summary(summary: str, ok: bool) -> None:
    from activities.rag.guardrails import validate_summary

    passage = fusion.chunk_passage(_long_sources(1)[0])
    assert validate_summary(summary, passage).ok is ok


def test_llm_summarises_each_cut_chunk_without_pii_and_the_prompt_uses_it(
    server: LlmTestServer,
) -> None:
    from tests.llm_server import summary_answer

    gen = _generator(server)
    sources = [*_long_sources(2), _sources(1, words=2)[0]]
    sources[2].id = "S3"
    first = _extractive(sources)
    prompt, results = _summarised(gen, sources, first)
    requests = server.summary_requests
    assert len(requests) == 2 and server.request_count == 2  # one per cut chunk, S3 fits
    sent = server.request_bodies_text()
    for value in CHUNK_PII:
        assert value not in sent
    assert "[EMAIL]" in sent and "[CARD]" in sent
    assert all(r[gen.config.max_tokens_param] == CHUNK_CAP for r in requests)
    assert {sid: r.method for sid, r in results.items()} == {"S1": "llm", "S2": "llm"}
    bodies = _bodies(prompt)
    summaries = {summary_answer(r) for r in requests}
    assert {bodies["S1"], bodies["S2"]} == summaries
    assert all(count_tokens(bodies[sid]) <= CHUNK_CAP for sid in ("S1", "S2"))
    assert bodies["S3"] == _bodies(first)["S3"]  # under the cap: untouched
    assert prompt.used == first.used and prompt.tokens <= 2000
    # The answer is generated from, and validated against, the summarised context.
    answer = gen.generate(prompt, "test-model", max_tokens=64)
    assert validate_answer(answer.text, prompt.used, prompt.context).ok
    assert _bodies(prompt)["S1"].split(".")[0] in answer.text


def test_repeated_summaries_come_from_the_cache(server: LlmTestServer) -> None:
    gen = _generator(server)
    sources = _long_sources(2)
    first = _extractive(sources)
    prompt1, _ = _summarised(gen, sources, first)
    assert server.request_count == 2
    prompt2, results = _summarised(gen, sources, first)
    assert server.request_count == 2  # no second summarisation request
    assert all(r.method == "llm" and r.cached for r in results.values())
    assert prompt2.user == prompt1.user
    other = fuse_prompt("Which hall has shelf 4?", sources, 2000, CHUNK_CAP)
    _summarised(gen, sources, other)  # another question: summarised again
    assert server.request_count == 4


@pytest.mark.parametrize(
    ("mode", "reason"),
    [("fail", "HTTP 500"), ("empty", "empty"), ("hallucinate", "cite"), ("down", "")],
)
def test_failed_summaries_fall_back_to_extractive_and_the_answer_still_works(
    server: LlmTestServer, mode: str, reason: str
) -> None:
    gen = _generator(server, breaker_fail_max=5)
    server.set_summary_mode(mode)
    sources = _long_sources(2)
    first = _extractive(sources)
    prompt, results = _summarised(gen, sources, first)
    assert all(r.method == "extractive" and reason in r.reason for r in results.values())
    assert prompt.user == first.user and prompt.context == first.context
    answer = gen.generate(prompt, "test-model", max_tokens=64)
    assert validate_answer(answer.text, prompt.used, prompt.context).ok
    assert len(server.answer_requests) == 1
    # A failed summary is not cached: once the LLM recovers, it is asked again.
    server.set_summary_mode(None)
    _, results = _summarised(gen, sources, first)
    assert all(r.method == "llm" and not r.cached for r in results.values())


def test_open_breaker_skips_summaries_fast(server: LlmTestServer) -> None:
    gen = _generator(server, breaker_fail_max=1, breaker_reset_s=30)
    server.set_mode("fail")
    with pytest.raises(TransientLlmError):
        gen.generate(_prompt(), "test-model", max_tokens=16)
    seen = server.request_count
    sources = _long_sources(3)
    first = _extractive(sources)
    t0 = time.perf_counter()
    prompt, results = _summarised(gen, sources, first)
    assert time.perf_counter() - t0 < 0.2
    assert server.request_count == seen
    assert all(r.method == "extractive" and "breaker" in r.reason for r in results.values())
    assert prompt.user == first.user


def test_summaries_are_requested_concurrently(server: LlmTestServer) -> None:
    gen = _generator(server, timeout_s=5.0)
    server.set_summary_mode("slow", delay=0.4)
    sources = _long_sources(4)
    first = _extractive(sources)
    t0 = time.perf_counter()
    _, results = _summarised(gen, sources, first)
    assert len(results) == 4 and all(r.method == "llm" for r in results.values())
    assert time.perf_counter() - t0 < 1.2  # one after another would take >= 1.6 s
    gen.close()


def test_identical_passages_are_summarised_once(server: LlmTestServer) -> None:
    gen = _generator(server)
    page = _long_sources(1)[0]
    text_chunk = SourceChunk(**{**page.__dict__, "id": "S2", "chunk": "page:1:text"})
    first = _extractive([page, text_chunk])
    assert first.shortened == ["S1", "S2"]
    prompt, results = _summarised(gen, [page, text_chunk], first)
    assert server.request_count == 1  # a PDF page's image and text chunk share their text
    assert results["S1"] == results["S2"] and results["S1"].method == "llm"
    assert _bodies(prompt)["S1"] == _bodies(prompt)["S2"]
