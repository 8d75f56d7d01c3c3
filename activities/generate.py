"""LLM generation on ``mmrag-gpu-generate``: the openai client behind a circuit breaker.

Transient failures (429, 5xx, timeouts) raise a retryable error, so Temporal's retry
policy backs off; an open breaker and permanent rejections raise non-retryable errors
the ``Ask`` workflow turns into a degraded answer. With no LLM configured the activity
says so and the workflow keeps its extractive answer.

Sources cut to the per-chunk cap arrive with their redacted text (``GenerateInput.fusion``)
and are summarised here by the LLM before the answer is asked for: the LLM is only reachable
from this queue, and doing it in this activity adds no hop to the ``Ask`` path. A summary
that fails only costs that chunk its LLM summary (it keeps the extractive one). The
answer is PII-redacted before it is returned, so the model's raw text never reaches the
workflow's history.
"""

from __future__ import annotations

import base64
import io
import logging
import time

from activities.llm.client import (
    ChunkSummary,
    LlmConfig,
    as_activity_errors,
    fuse_with_llm_summaries,
    get_generator,
)
from activities.media.images import decode_image
from activities.rag.fusion import FusedPrompt, SourceChunk
from activities.rag.guardrails import redact_pii
from activities.runtime import metrics
from activities.runtime.bounds import clamp_answer_tokens
from activities.runtime.errors import UnreadableObjectError
from activities.store.objects import store_for
from activities.store.roots import StorageRoots
from settings import Settings, get_settings
from workflows.activities import ask as ask_stubs
from workflows.activities import implements
from workflows.activities.ask import Fusion, GenerateInput, Generation

log = logging.getLogger(__name__)


class GenerateActivities:
    def __init__(self, config: LlmConfig | None = None, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self.config = config or LlmConfig.from_settings(self.settings)
        self.generator = get_generator(self.config) if self.config.enabled else None
        self.roots = StorageRoots.from_settings(
            self.settings.storage_roots, self.settings.state_dir
        )

    def image_data_urls(self, uris: list[str], tenant: str) -> list[str]:
        """The top image sources as small JPEG data URLs, for a vision model (when enabled).

        Pixels are read here, next to the model, never carried in a payload; a source that
        cannot be read is left out (the text context still carries it)."""
        s = self.settings
        if not s.llm_vision:
            return []
        urls = []
        roots = self.roots.for_tenant(tenant)
        for uri in uris[: max(0, s.llm_vision_images)]:
            try:
                data = store_for(uri, roots).read(uri, s.max_object_bytes)
                image = decode_image(data, s.max_object_bytes, s.max_image_pixels)
            except UnreadableObjectError as e:
                log.warning("vision: leaving out %s: %s", uri, e)
                continue
            image.thumbnail((s.llm_vision_max_side, s.llm_vision_max_side))
            buf = io.BytesIO()
            image.save(buf, "JPEG", quality=85)
            urls.append("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode())
        return urls

    def summarized_prompt(self, fusion: Fusion) -> tuple[FusedPrompt, dict[str, ChunkSummary]]:
        """The prompt fused again with the LLM's summaries of the shortened sources."""
        assert self.generator is not None
        sources = [
            SourceChunk(
                c.id, "", "", c.chunk, c.media_type, 0.0, c.snippet, c.caption, c.tags, c.origin
            )
            for c in fusion.sources
        ]
        timeout_s = min(self.settings.llm_summary_timeout_s, self.config.timeout_s)
        prompt, results = fuse_with_llm_summaries(
            self.generator,
            fusion.question,
            sources,
            fusion.shortened,
            fusion.token_budget,
            fusion.per_chunk_tokens,
            timeout_s=timeout_s,
        )
        for sid, r in results.items():
            if r.reason:
                log.info("chunk %s: extractive summary (%s)", sid, r.reason)
        return prompt, results

    @implements(ask_stubs.generate)
    def generate(self, inp: GenerateInput) -> Generation:
        started = time.perf_counter()
        if self.generator is None:
            return Generation(text="", kind="extractive", model="", ms=0.0)
        prompt = FusedPrompt(
            system=inp.system_prompt,
            user=inp.user_prompt,
            used=inp.source_ids,
            tokens=0,
            redactions={},
        )
        summaries: dict[str, ChunkSummary] = {}
        summarize_ms = 0.0
        if inp.fusion is not None and self.settings.llm_summarize_chunks:
            t0 = time.perf_counter()
            prompt, summaries = self.summarized_prompt(inp.fusion)
            summarize_ms = round((time.perf_counter() - t0) * 1000, 2)
        try:
            with as_activity_errors():
                result = self.generator.generate(
                    prompt,
                    self.config.model,
                    clamp_answer_tokens(inp.max_tokens, self.settings),  # MMRAG_MAX_ANSWER_TOKENS
                    self.image_data_urls(inp.image_uris, inp.tenant) or None,
                )
        finally:
            metrics.breaker_state(self.generator.breaker_state())
        if not result.cached:
            metrics.observe("llm_seconds", time.perf_counter() - started)
        return Generation(
            # Redacted before it is recorded in the Ask's history (finalize_answer redacts
            # again, with whatever else it shows).
            text=redact_pii(result.text)[0],
            kind="generated",
            model=result.model,
            ms=round((time.perf_counter() - started) * 1000, 2),
            cached=result.cached,
            context=prompt.context if summaries else "",
            summaries={sid: r.method for sid, r in summaries.items()},
            summarize_ms=summarize_ms,
        )
