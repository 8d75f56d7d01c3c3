"""Ask against the real servers, the tiny CLIP model and a real HTTP LLM test server."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio.client import Client

from starters.ask import ask, ask_task_queue, query_worker_polling
from starters.ingest import start_ingest
from starters.synthetic_corpus import render, write_corpus
from tests.conftest import LLM_API_KEY, ServerStack, Workers
from tests.helpers import (
    audit_events,
    milvus_pks,
    registry_rows,
    temporal_execute,
    wait_searchable,
)
from tests.llm_server import LlmTestServer
from workflows.contracts import (
    ASK_WORKFLOW,
    ENCODE_TASK_QUEUE,
    GENERATE_TASK_QUEUE,
    QUERY_TASK_QUEUE,
    TASK_QUEUE,
    AskFilters,
    AskInput,
    AskResult,
)


@dataclass
class Corpus:
    tenant: str
    directory: Path


async def _ingest(client: Client, tenant: str, sources: list[str], **kw) -> None:  # type: ignore[no-untyped-def]
    handle = await start_ingest(client, tenant, sources, **kw)
    result = await asyncio.wait_for(handle.result(), timeout=180)
    assert result.failed == 0, result.failures
    wait_searchable(tenant, len(milvus_pks(tenant)))


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def corpus(
    worker: Workers, client: Client, tmp_path_factory: pytest.TempPathFactory
) -> Corpus:
    """18 classes x 2 PNGs tagged set=a, plus 18 JPEGs tagged set=b with older mtimes."""
    tenant = f"ask-{uuid.uuid4().hex[:8]}"
    root = tmp_path_factory.mktemp("ask-corpus")
    write_corpus(root / "png", per_class=2, seed=31)
    write_corpus(root / "jpg", per_class=1, seed=32, fmt="jpeg")
    for path in (root / "jpg").iterdir():
        os.utime(path, (1_600_000_000, 1_600_000_000))  # 2020-09-13
    await _ingest(client, tenant, [str(root / "png")], tags={"set": "a"})
    await _ingest(client, tenant, [str(root / "jpg")], tags={"set": "b"})
    return Corpus(tenant, root)


def names(result: AskResult) -> list[str]:
    return [s.uri.rsplit("/", 1)[-1] for s in result.sources]


async def run_ask(client: Client, **kw) -> AskResult:  # type: ignore[no-untyped-def]
    return await asyncio.wait_for(ask(client, AskInput(**kw)), timeout=90)


async def test_text_query_generates_a_grounded_cited_answer(
    corpus: Corpus, client: Client, llm: LlmTestServer
) -> None:
    llm.set_mode("ok")
    result = await run_ask(client, tenant=corpus.tenant, text="a red circle on a white background")
    assert names(result)[0].startswith("red-circle-")
    assert result.answer_kind == "generated" and not result.degraded
    assert "[S1]" in result.answer and "Sources:" in result.answer
    assert result.llm_model == "test-llm" and result.encoder_model == "mmrag-tiny"
    assert result.index_version >= 1 and result.latency_ms > 0
    assert {"encode", "retrieve", "generate"} <= set(result.stage_ms)


async def test_image_query_ranks_the_pictured_class_first(corpus: Corpus, client: Client) -> None:
    import random

    buf = io.BytesIO()
    render("blue", "triangle", random.Random(777)).save(buf, "PNG")
    inline = base64.b64encode(buf.getvalue()).decode()
    by_image = await run_ask(client, tenant=corpus.tenant, image_base64=inline, generate=False)
    assert names(by_image)[0].startswith("blue-triangle-")


@pytest.mark.parametrize("queue", [TASK_QUEUE, QUERY_TASK_QUEUE])
async def test_hybrid_weight_moves_the_ranking_between_text_and_image(
    corpus: Corpus, client: Client, queue: str
) -> None:
    """A hybrid query whose text and image disagree (text: a red circle; image: a blue
    triangle): an image-heavy ``hybrid_weight`` ranks what the image shows first, a
    text-heavy one what the text says, and moving the weight moves the ranking step by step
    (re-rank off: the order is the vectors' alone). Both placements encode it."""
    import random

    path = corpus.directory / f"hybrid-query-{uuid.uuid4().hex[:6]}.png"
    render("blue", "triangle", random.Random(777)).save(path, "PNG")

    async def classes_at(weight: float) -> list[str]:
        inp = AskInput(
            tenant=corpus.tenant,
            text="a red circle",
            image_uri=path.as_uri(),
            hybrid_weight=weight,
            rerank=False,
            generate=False,
            top_k=6,
        )
        result = (await ask_on(client, queue, inp)).result
        assert result.answer_kind == "extractive" and len(result.sources) == 6
        return [n.rsplit("-", 1)[0] for n in names(result)]

    text_heavy, even, image_heavy = [await classes_at(w) for w in (0.1, 0.5, 0.9)]
    assert text_heavy[0] == "red-circle", text_heavy
    assert image_heavy[0] == "blue-triangle", image_heavy
    image_like = [ranked.count("blue-triangle") for ranked in (text_heavy, even, image_heavy)]
    text_like = [ranked.count("red-circle") for ranked in (text_heavy, even, image_heavy)]
    assert image_like == sorted(image_like) and image_like[0] < image_like[-1], image_like
    assert text_like == sorted(text_like, reverse=True) and text_like[0] > text_like[-1]


@dataclass
class AskRun:
    result: AskResult
    workflow_id: str
    activity_queues: list[str]  # task queue of every activity scheduled through the server
    local_activities: int  # local activity markers in the history
    patches: int  # patch markers (workflow.patched) in the history


async def ask_on(client: Client, queue: str, inp: AskInput) -> AskRun:
    handle = await client.start_workflow(
        ASK_WORKFLOW,
        inp,
        id=f"ask/{inp.tenant}/{uuid.uuid4().hex}",
        task_queue=queue,
        result_type=AskResult,
    )
    result = await asyncio.wait_for(handle.result(), timeout=90)
    events = (await handle.fetch_history()).events
    markers = [e.marker_recorded_event_attributes.marker_name for e in events]
    return AskRun(
        result,
        handle.id,
        [
            e.activity_task_scheduled_event_attributes.task_queue.name
            for e in events
            if e.HasField("activity_task_scheduled_event_attributes")
        ],
        markers.count("core_local_activity"),
        markers.count("core_patch"),
    )


@pytest.mark.parametrize("generate", [False, True], ids=["retrieval-only", "generated"])
async def test_query_queue_answers_like_the_main_queue_without_the_encode_hop(
    corpus: Corpus, client: Client, llm: LlmTestServer, generate: bool
) -> None:
    """An Ask on mmrag-query (the query role, model in the worker) gives the same sources and
    answer as one on mmrag for text, image and hybrid queries, and never schedules an
    activity on the encode queue: it encodes and retrieves in one local activity. A
    retrieval-only Ask answers in that one step on mmrag-query, in one after encoding on
    mmrag."""
    import random

    llm.set_mode("ok")
    buf = io.BytesIO()
    render("green", "square", random.Random(778)).save(buf, "PNG")
    image = base64.b64encode(buf.getvalue()).decode()
    queries = [{"text": "a purple triangle"}, {"image_base64": image}]
    queries.append({"text": "a green square", "image_base64": image})
    for query in queries:
        inp = AskInput(tenant=corpus.tenant, generate=generate, **query)
        main, fast = (
            await ask_on(client, TASK_QUEUE, inp),
            await ask_on(client, QUERY_TASK_QUEUE, inp),
        )
        assert fast.result.sources, query
        assert [s.asset_id for s in fast.result.sources] == [
            s.asset_id for s in main.result.sources
        ], query
        assert fast.result.answer_kind == main.result.answer_kind
        assert fast.result.answer_kind == ("generated" if generate else "extractive")
        assert fast.result.encoder_model == main.result.encoder_model == "mmrag-tiny"
        generation = [GENERATE_TASK_QUEUE] if generate else []
        assert main.activity_queues == [ENCODE_TASK_QUEUE, *generation]
        assert fast.activity_queues == generation
        # mmrag: retrieve_and_answer, or retrieve + finalize_answer; mmrag-query:
        # encode_and_retrieve (which answers when not generating) [+ finalize_answer]
        steps = 2 if generate else 1
        assert (main.local_activities, fast.local_activities) == (steps, steps)
    names_first = names(fast.result)[0]
    assert names_first.startswith("green-square-")


async def test_retrieval_only_ask_in_one_step_is_audited_once(
    corpus: Corpus, client: Client
) -> None:
    for queue in (TASK_QUEUE, QUERY_TASK_QUEUE):
        run = await ask_on(
            client, queue, AskInput(tenant=corpus.tenant, text="a red square", generate=False)
        )
        rows = [e for e in audit_events(corpus.tenant) if e.workflow_id == run.workflow_id]
        assert len(rows) == 1 and rows[0].action == "query.ask"
        details = rows[0].details
        assert details["answer_kind"] == "extractive" and details["latency_ms"] > 0
        assert details["sources"] == [s.asset_id for s in run.result.sources]
        timed = sum(run.result.stage_ms[k] for k in ("encode", "retrieve", "finalize"))
        assert run.result.stage_ms["finalize"] > 0 and run.result.latency_ms >= round(timed, 1)


async def test_cli_queue_auto_takes_the_query_queue_when_a_query_worker_polls(
    worker: Workers, client: Client
) -> None:
    assert await ask_task_queue(client) == QUERY_TASK_QUEUE
    assert await ask_task_queue(client, TASK_QUEUE) == TASK_QUEUE  # an explicit choice wins
    # A queue nobody polls is not taken for served (auto would fall back to mmrag).
    assert not await query_worker_polling(client, f"mmrag-query-unserved-{uuid.uuid4().hex}")


async def test_bad_query_image_fails_with_reason(corpus: Corpus, client: Client) -> None:
    from temporalio.client import WorkflowFailureError

    junk = base64.b64encode(b"not an image at all").decode()
    with pytest.raises(WorkflowFailureError) as info:
        await run_ask(client, tenant=corpus.tenant, image_base64=junk)
    assert "query image" in str(info.value.cause.cause)  # type: ignore[union-attr]


async def test_tenants_never_see_each_other(corpus: Corpus, client: Client) -> None:
    """Two tenants that both hold matching data, the very same files even: each one's Ask
    cites only its own assets, on both queues, and a tenant without data gets nothing."""
    other = f"other-{uuid.uuid4().hex[:6]}"
    await _ingest(client, other, [str(corpus.directory / "png")], tags={"set": "a"})
    owned = {
        tenant: {row.asset_id for row in registry_rows(tenant)} for tenant in (corpus.tenant, other)
    }
    assert len(owned[corpus.tenant]) == 54 and len(owned[other]) == 36
    assert not owned[corpus.tenant] & owned[other]  # same URIs, different assets
    for tenant, stranger in ((corpus.tenant, other), (other, corpus.tenant)):
        for queue in (TASK_QUEUE, QUERY_TASK_QUEUE):
            inp = AskInput(tenant=tenant, text="a red circle", generate=False, top_k=40)
            result = (await ask_on(client, queue, inp)).result
            cited = {s.asset_id for s in result.sources}
            assert len(cited) == min(40, len(owned[tenant])), (tenant, queue)
            assert cited <= owned[tenant] and not cited & owned[stranger], (tenant, queue)
            assert names(result)[0].startswith("red-circle-")
    nobody = await run_ask(
        client, tenant=f"nobody-{uuid.uuid4().hex[:6]}", text="a red circle", generate=False
    )
    assert nobody.sources == [] and nobody.answer_kind == "none"


async def test_every_filter(corpus: Corpus, client: Client) -> None:
    q = {"tenant": corpus.tenant, "text": "a green square", "generate": False, "top_k": 50}
    jpeg = await run_ask(client, **q, filters=AskFilters(media_types=["image/jpeg"]))
    assert jpeg.sources and all(s.media_type == "image/jpeg" for s in jpeg.sources)
    assert len(jpeg.sources) == 18

    tagged = await run_ask(client, **q, filters=AskFilters(tags={"set": "a"}))
    assert len(tagged.sources) == 36 and all(n.endswith(".png") for n in names(tagged))

    old = await run_ask(client, **q, filters=AskFilters(created_before=1_700_000_000))
    assert len(old.sources) == 18 and all(
        n.endswith(".jpeg") or n.endswith(".jpg") for n in names(old)
    )
    new = await run_ask(client, **q, filters=AskFilters(created_after=1_700_000_000))
    assert len(new.sources) == 36

    one = jpeg.sources[3].asset_id
    by_id = await run_ask(client, **q, filters=AskFilters(asset_ids=[one]))
    assert [s.asset_id for s in by_id.sources] == [one]


@pytest.mark.parametrize(
    "hostile",
    [
        'a" or tenant != "',
        "a') or (1 == 1",
        '\\" || true || "',
        'x" or asset_id like "%',
        "]] or [[",
        "\u202e\n\t\\u0022",
    ],
)
async def test_hostile_filter_values_stay_literals(
    corpus: Corpus, client: Client, hostile: str
) -> None:
    """A hostile value never becomes filter syntax: as a tag value or an asset id it is a
    literal that matches nothing; as a media type (never one mmrag indexes) or a tag key
    with '=' it is refused outright with a BadQuery naming the field, before any search."""
    from temporalio.client import WorkflowFailureError
    from temporalio.exceptions import ApplicationError

    q = {"tenant": corpus.tenant, "text": "a red circle", "generate": False}
    refused = {"filters.media_types": AskFilters(media_types=[hostile])}
    literals = [AskFilters(tags={"set": hostile}), AskFilters(asset_ids=[hostile])]
    if "=" in hostile:
        refused["filters.tags"] = AskFilters(tags={hostile: "a"})
    else:
        literals.append(AskFilters(tags={hostile: "a"}))
    for says, filters in refused.items():
        with pytest.raises(WorkflowFailureError) as info:
            await run_ask(client, **q, filters=filters)
        cause = info.value.cause
        assert isinstance(cause, ApplicationError) and cause.type == "BadQuery", cause
        assert says in cause.message and repr(hostile) in cause.message, cause.message
    for filters in literals:
        result = await run_ask(client, **q, filters=filters)
        assert result.sources == [], f"{filters} matched rows"


async def test_tag_values_with_quotes_match_exactly(
    worker: Workers, client: Client, tmp_path: Path
) -> None:
    tenant = f"quotes-{uuid.uuid4().hex[:6]}"
    write_corpus(tmp_path / "q", per_class=1, seed=41)
    value = 'say "hi" \\ or not'
    await _ingest(client, tenant, [str(tmp_path / "q")], tags={"note": value})
    hit = await run_ask(
        client,
        tenant=tenant,
        text="a circle",
        generate=False,
        filters=AskFilters(tags={"note": value}),
    )
    assert len(hit.sources) == 5


async def test_an_image_named_by_the_question_overtakes_plain_ones(
    worker: Workers, client: Client, tmp_path: Path
) -> None:
    """An orange circle whose name says 'red circle' overtakes plain red circles: the lexical
    leg finds its name's words (issue 15: re-ranking itself no longer reads file names, see
    tests/test_hybrid.py), with or without re-ranking."""
    import random

    tenant = f"rerank-{uuid.uuid4().hex[:6]}"
    folder = tmp_path / "r"
    folder.mkdir()
    for i in range(3):
        render("red", "circle", random.Random(i)).save(folder / f"img-{i}.png")
    render("orange", "circle", random.Random(9)).save(folder / "red-circle-label.png")
    await _ingest(client, tenant, [str(folder)])
    q = {"tenant": tenant, "text": "a red circle", "generate": False, "top_k": 4}
    plain = await run_ask(client, **q, rerank=False)
    fused = await run_ask(client, **q, rerank=True)
    assert names(plain)[0] == "red-circle-label.png"
    assert names(fused)[0] == "red-circle-label.png"


async def test_throttling_llm_is_retried_then_answers(
    corpus: Corpus, client: Client, llm: LlmTestServer
) -> None:
    llm.set_mode("throttle", count=2, retry_after=0)
    llm.reset()
    result = await run_ask(
        client, tenant=corpus.tenant, text="a purple square", max_answer_tokens=64
    )
    assert result.answer_kind == "generated" and not result.degraded
    assert llm.request_count == 3
    llm.set_mode("ok")


async def test_outage_opens_breaker_degrades_fast_then_recovers(
    corpus: Corpus, client: Client, llm: LlmTestServer
) -> None:
    llm.set_mode("fail")
    started = time.monotonic()
    first = await run_ask(
        client, tenant=corpus.tenant, text="an orange triangle", max_answer_tokens=65
    )
    assert first.degraded and first.sources and "temporarily unavailable" in first.answer
    assert time.monotonic() - started < 45
    # The breaker is open now: the next ask degrades without waiting on the LLM.
    llm.reset()
    started = time.monotonic()
    second = await run_ask(
        client, tenant=corpus.tenant, text="an orange circle", max_answer_tokens=66
    )
    assert second.degraded and "circuit breaker" in second.degraded_reason
    assert time.monotonic() - started < 5
    assert llm.request_count == 0
    # After the reset timeout a trial call goes through and closes the breaker.
    llm.set_mode("ok")
    await asyncio.sleep(4.5)
    third = await run_ask(
        client, tenant=corpus.tenant, text="an orange square", max_answer_tokens=67
    )
    assert third.answer_kind == "generated" and not third.degraded


async def test_pii_never_reaches_the_llm_or_the_audit_trail(
    corpus: Corpus, client: Client, llm: LlmTestServer
) -> None:
    llm.set_mode("ok")
    llm.reset()
    secrets = ["jane.doe@example.com", "+1 415 555 0134", "4111 1111 1111 1111", "123-45-6789"]
    question = (
        f"I am {secrets[0]}, call {secrets[1]}, card {secrets[2]}, ssn {secrets[3]}: a red circle?"
    )
    result = await run_ask(client, tenant=corpus.tenant, text=question, max_answer_tokens=68)
    assert result.sources
    sent = llm.request_bodies_text()
    assert llm.request_count >= 1
    audit = json.dumps([e.details for e in audit_events(corpus.tenant)])
    for secret in [*secrets, LLM_API_KEY]:
        assert secret not in sent
        assert secret not in audit
    asks = [e for e in audit_events(corpus.tenant) if e.action == "query.ask"]
    assert asks and all("question_sha256" in e.details for e in asks)


async def test_ask_started_from_temporal_cli(corpus: Corpus, test_stack: ServerStack) -> None:
    payload = {"tenant": corpus.tenant, "text": "a yellow circle", "generate": False, "top_k": 3}
    result = temporal_execute(
        test_stack.endpoints["temporal_address"], "Ask", payload, f"cli-ask-{uuid.uuid4().hex[:6]}"
    )
    assert len(result["sources"]) == 3
    assert result["sources"][0]["uri"].rsplit("/", 1)[-1].startswith("yellow-circle-")
    assert result["answer_kind"] == "extractive"


async def test_vision_model_gets_top_images_as_data_urls(
    corpus: Corpus, client: Client, llm: LlmTestServer, worker: Workers, test_stack: ServerStack
) -> None:
    """With MMRAG_LLM_VISION the generate worker sends the top image sources as small JPEG
    data URLs (read next to the model; pixels never cross a task queue)."""
    from tests.conftest import LLM_ENV

    worker.generate.stop()
    vision = test_stack.start_worker(
        "generate", OPENAI_BASE_URL=llm.base_url, MMRAG_LLM_VISION="true", **LLM_ENV
    )
    try:
        llm.set_mode("ok")
        llm.reset()
        result = await run_ask(
            client, tenant=corpus.tenant, text="a green triangle", max_answer_tokens=70
        )
        assert result.answer_kind == "generated"
        parts = llm.requests[-1]["messages"][-1]["content"]
        images = [p["image_url"]["url"] for p in parts if p.get("type") == "image_url"]
        assert len(images) == 2 and all(u.startswith("data:image/jpeg;base64,") for u in images)
    finally:
        vision.stop()
        worker.generate = test_stack.start_worker(
            "generate", OPENAI_BASE_URL=llm.base_url, **LLM_ENV
        )
