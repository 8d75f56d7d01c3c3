"""LLM chunk summarisation in ``Ask``: sources over the per-chunk cap are summarised by the
LLM on the generate worker (no extra task-queue hop), redacted, cached, grounding-checked,
and fall back to the extractive summary per chunk when the LLM's fails.

The first tests call the generate activity in-process against the HTTP LLM test server;
the rest run whole ``Ask`` workflows on the real servers and worker processes, with two
scanned pages (PNG images) whose OCR text is far over the cap and carries PII. (A PDF's text
layer is cut into passages well under the cap, so it is an image's OCR text, a caption or a
page row from before passages that gets summarised.)
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from temporalio.client import Client, WorkflowHandle
from temporalio.worker import Replayer

from activities.generate import GenerateActivities
from activities.rag.fusion import SourceChunk, fuse_prompt, redacted_chunk
from activities.rag.tokens import count_tokens
from settings import Settings
from starters.ingest import start_ingest
from starters.synthetic_corpus import text_image
from tests.conftest import LLM_API_KEY, LLM_ENV, ServerStack, Workers
from tests.helpers import milvus_pks, wait_searchable
from tests.llm_server import LlmTestServer, summary_answer, user_text
from workers.temporal_client import data_converter
from workflows.activities.ask import Fusion, FusionChunk, GenerateInput
from workflows.ask import Ask
from workflows.contracts import ASK_WORKFLOW, TASK_QUEUE, AskFilters, AskInput, AskResult

PDF = "application/pdf"
PNG = "image/png"
PII = ["ops.lead@example.com", "+44 20 7946 0958", "4111 1111 1111 1111"]
CAP = Settings.model_fields["prompt_chunk_tokens"].default  # the test workers' cap


def _page_lines(page: int) -> list[str]:
    """28 short sentences (an A4 page at 28 px a line): ~430 tokens, over the cap."""
    lines = [f"Shelf {j} in hall {page} holds {j + 3} crates of parts." for j in range(25)]
    lines.insert(5, f"The blue container of hall {page} is in bay {page + 40}.")
    lines.insert(10, f"Ask {PII[0]} or call {PII[1]}.")
    lines.insert(15, f"The deposit was paid by card {PII[2]}.")
    return lines


# --- the generate activity in-process -------------------------------------------------------


@pytest.fixture
def server() -> Iterator[LlmTestServer]:
    with LlmTestServer(api_key=LLM_API_KEY) as srv:
        yield srv


def _activities(srv: LlmTestServer | None, **settings: object) -> GenerateActivities:
    from activities.llm.client import LlmConfig

    config = (
        LlmConfig(base_url=srv.base_url, api_key=LLM_API_KEY, model="test-llm", timeout_s=2.0)
        if srv is not None
        else LlmConfig()
    )
    return GenerateActivities(config, Settings(**settings))  # type: ignore[arg-type]


def _generate_input(question: str = "Which bay holds the blue container?") -> GenerateInput:
    """What the retrieve step sends: the extractive prompt plus the redacted sources."""
    sources = [
        SourceChunk(f"S{i}", f"a{i}", f"file:///r.pdf#{i}", f"page:{i}", PDF, 1.0, text, "")
        for i, text in ((1, " ".join(_page_lines(1))), (2, " ".join(_page_lines(2))))
    ]
    prompt = fuse_prompt(question, sources, token_budget=3000, per_chunk_tokens=CAP)
    chunks = [redacted_chunk(s) for s in sources]
    return GenerateInput(
        prompt.system,
        prompt.user,
        300,
        prompt.used,
        fusion=Fusion(
            prompt.question,
            [FusionChunk(c.id, c.media_type, c.chunk, c.caption, c.snippet) for c in chunks],
            prompt.shortened,
            3000,
            CAP,
        ),
    )


def test_generate_activity_summarises_the_shipped_chunks(server: LlmTestServer) -> None:
    inp = _generate_input()
    assert inp.fusion is not None and inp.fusion.shortened == ["S1", "S2"]
    assert not any(value in str(inp) for value in PII)  # the payload is redacted
    out = _activities(server).generate(inp)
    assert out.kind == "generated" and out.summaries == {"S1": "llm", "S2": "llm"}
    assert out.summarize_ms > 0
    summaries = [summary_answer(r) for r in server.summary_requests]
    assert len(summaries) == 2 and all(s in out.context for s in summaries)
    final = user_text(server.answer_requests[-1])
    assert all(s in final for s in summaries) and inp.user_prompt != final


def test_generate_activity_leaves_summaries_off_when_configured(server: LlmTestServer) -> None:
    inp = _generate_input()
    out = _activities(server, llm_summarize_chunks=False).generate(inp)
    assert out.kind == "generated" and not out.summaries and not out.context
    assert not server.summary_requests
    assert user_text(server.answer_requests[-1]) == inp.user_prompt


def test_generate_activity_without_an_llm_stays_extractive() -> None:
    out = _activities(None).generate(_generate_input())
    assert out.kind == "extractive" and not out.summaries


# --- whole asks --------------------------------------------------------------------------------


@dataclass
class Doc:
    tenant: str
    path: Path


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def doc(worker: Workers, client: Client, tmp_path_factory: pytest.TempPathFactory) -> Doc:
    """One tenant holding two scanned inventory pages (PNG, pixels only) whose OCR text,
    each image's one snippet, is far over the per-chunk cap."""
    tenant = f"sum-{uuid.uuid4().hex[:8]}"
    path = tmp_path_factory.mktemp("summarize")
    for page in (1, 2):
        text_image(_page_lines(page)).save(path / f"inventory-{page}.png")
    handle = await start_ingest(client, tenant, [str(path)])
    result = await asyncio.wait_for(handle.result(), timeout=180)
    assert result.failed == 0, result.failures
    wait_searchable(tenant, len(milvus_pks(tenant)))
    return Doc(tenant, path)


async def _start(client: Client, doc: Doc, **kw: object) -> WorkflowHandle[Any, AskResult]:
    inp = AskInput(
        doc.tenant,
        text=str(kw.pop("text", "Which bay holds the blue container of hall 1?")),
        top_k=4,
        filters=AskFilters(media_types=[PNG]),
        **kw,  # type: ignore[arg-type]
    )
    return await client.start_workflow(
        ASK_WORKFLOW,
        inp,
        id=f"ask/{doc.tenant}/{uuid.uuid4().hex}",
        task_queue=TASK_QUEUE,
        result_type=AskResult,
    )


async def _ask(client: Client, doc: Doc, **kw: object) -> AskResult:
    return await asyncio.wait_for((await _start(client, doc, **kw)).result(), timeout=90)


async def test_ask_summarises_long_sources_with_the_llm(
    doc: Doc, client: Client, llm: LlmTestServer
) -> None:
    llm.set_mode("ok")
    llm.set_summary_mode(None)
    llm.reset()
    handle = await _start(client, doc, max_answer_tokens=91)
    result = await asyncio.wait_for(handle.result(), timeout=90)
    assert result.answer_kind == "generated" and not result.degraded, result
    assert len(result.sources) == 2  # the two scanned pages
    assert result.stage_ms["summarized_llm"] == 2 and result.stage_ms["summarized_extractive"] == 0
    assert result.stage_ms["summarize"] > 0
    # One request per over-cap chunk, capped at the per-chunk budget, with no PII in it.
    requests = llm.summary_requests
    assert len(requests) == 2
    assert all(r["max_tokens"] == CAP for r in requests)
    sent = llm.request_bodies_text()
    for value in [*PII, LLM_API_KEY]:
        assert value not in sent
    assert "[EMAIL]" in sent and "[CARD]" in sent
    # The final prompt carries the LLM's summaries, each within the cap.
    final = user_text(llm.answer_requests[-1])
    for summary in {summary_answer(r) for r in requests}:
        assert summary in final and count_tokens(summary) <= CAP
    assert "Shelf 0 in hall 1" not in final  # the extractive lead is gone
    # The workflow's history replays on today's code.
    history = await handle.fetch_history()
    await Replayer(workflows=[Ask], data_converter=data_converter()).replay_workflow(history)


async def test_repeated_ask_reuses_the_chunk_summaries(
    doc: Doc, client: Client, llm: LlmTestServer
) -> None:
    llm.set_mode("ok")
    llm.set_summary_mode(None)
    await _ask(client, doc, max_answer_tokens=92)
    llm.reset()
    again = await _ask(client, doc, max_answer_tokens=93)  # a new answer, the same chunks
    assert again.answer_kind == "generated" and again.stage_ms["summarized_llm"] == 2
    assert not llm.summary_requests and len(llm.answer_requests) == 1


async def test_failed_summaries_fall_back_to_extractive_and_the_ask_answers(
    doc: Doc, client: Client, llm: LlmTestServer
) -> None:
    llm.set_mode("ok")
    llm.set_summary_mode("fail")  # HTTP 500 for summaries only
    llm.reset()
    try:
        result = await _ask(
            client, doc, text="Which bay holds the blue container of hall 2?", max_answer_tokens=94
        )
    finally:
        llm.set_summary_mode(None)
    assert result.answer_kind == "generated" and not result.degraded, result
    assert result.stage_ms["summarized_extractive"] == 2 and result.stage_ms["summarized_llm"] == 0
    assert len(llm.summary_requests) == 2 and len(llm.answer_requests) == 1
    final = user_text(llm.answer_requests[-1])
    assert "Text read in it (OCR): " in final and "bay 42" in final  # extractive, question-led
    for value in PII:
        assert value not in llm.request_bodies_text()


async def test_without_an_llm_long_sources_stay_extractive(
    doc: Doc, client: Client, llm: LlmTestServer, worker: Workers, test_stack: ServerStack
) -> None:
    worker.generate.stop()
    plain = test_stack.start_worker("generate", OPENAI_BASE_URL="", OPENAI_API_KEY="")
    try:
        llm.reset()
        result = await _ask(client, doc, max_answer_tokens=95)
        assert result.answer_kind == "extractive" and not result.degraded
        assert "summarize" not in result.stage_ms and llm.request_count == 0
        assert "bay 41" in result.answer
    finally:
        plain.stop()
        worker.generate = test_stack.start_worker(
            "generate", OPENAI_BASE_URL=llm.base_url, **LLM_ENV
        )
