"""Hybrid retrieval (issue 15): the lexical leg in Postgres full-text search, fused with the
dense leg, on the real servers and workers.

What a user relies on: a fact deep inside a PDF is found by its exact words, and so is a
part number; Forget removes a document from the lexical index too; one tenant never sees
another's lexical hits; every structured filter applies to lexical hits as to vector hits;
whatever a question contains (the full-text engine's own operators, quotes, backslashes,
SQL) is searched for as words; and the prompt says what a source is (its caption, tags and
text), never a file name dressed as a caption.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
import sqlalchemy as sa
from temporalio.client import Client

from activities.rag.fusion import SourceChunk, fuse_prompt
from activities.rag.rerank import DENSE, LEXICAL, SearchHit, fuse_rrf, rerank
from activities.store import lexical
from starters.ingest import start_ingest
from starters.lifecycle import start_forget
from starters.synthetic_corpus import PdfPage, write_pdf
from tests.conftest import Workers
from tests.helpers import collection, engine, milvus_pks, png_bytes, store, wait_searchable
from tests.llm_server import LlmTestServer, user_text
from workflows.activities.ask import RetrieveInput
from workflows.contracts import (
    ASK_WORKFLOW,
    QUERY_TASK_QUEUE,
    TASK_QUEUE,
    AskFilters,
    AskInput,
    AskResult,
    ForgetInput,
    asset_id_for,
)

PDF = "application/pdf"
FACT = "The spare impeller for pump station Q7 is kept in locker 5521."
QUESTION = "Where is the spare impeller for pump station Q7 kept?"


def _paragraphs(page: int) -> list[str]:
    """Five short paragraphs of plant-report prose; page 3's fifth holds the fact."""
    lines: list[str] = []
    for n in range(1, 6):
        if page == 3 and n == 5:
            lines += ["The spare impeller for pump station Q7", "is kept in locker 5521.", ""]
            continue
        lines += [
            f"Section {page}.{n}: the plant ran at full load,",
            f"shift {n} logged {page * 10 + n} inspections.",
            "",
        ]
    return lines


@dataclass
class Corpus:
    tenant: str
    other: str  # a second tenant with its own documents
    report: str  # asset ids
    parts: str
    photo: str
    notes: str  # tenant B's document


async def _ingest(client: Client, tenant: str, paths: list[Path], tags: dict[str, str]) -> None:
    handle = await start_ingest(client, tenant, [str(p) for p in paths], tags=tags)
    result = await asyncio.wait_for(handle.result(), timeout=240)
    assert result.failed == 0, result.failures  # type: ignore[attr-defined]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def corpus(
    worker: Workers, client: Client, tmp_path_factory: pytest.TempPathFactory
) -> Corpus:
    """Tenant A: a four-page report (the fact in paragraph five of page three), a parts
    list with three near-identical part numbers, a photo named IMG_2034.png; tenant B: a
    report of its own."""
    suffix = uuid.uuid4().hex[:8]
    tenant, other = f"hyb-a-{suffix}", f"hyb-b-{suffix}"
    root = tmp_path_factory.mktemp("hybrid")
    report = write_pdf(root / "report.pdf", [PdfPage(_paragraphs(p)) for p in range(1, 5)])
    parts = write_pdf(
        root / "parts.pdf",
        [
            PdfPage(["Part AX-4412-B: hydraulic valve,", "stored in aisle 3."]),
            PdfPage(["Part AX-4421-B: coolant seal,", "stored in aisle 9."]),
            PdfPage(["Part BX-4421-C: fan belt,", "stored in aisle 1."]),
        ],
    )
    photo = root / "IMG_2034.png"
    photo.write_bytes(png_bytes((64, 64), (200, 40, 40)))
    await _ingest(client, tenant, [report, parts, photo], {"team": "ops"})
    b_root = tmp_path_factory.mktemp("hybrid-b")
    b_doc = write_pdf(b_root / "notes.pdf", [PdfPage(["Tenant B's notes:", "nothing to see."])])
    await _ingest(client, other, [b_doc], {"team": "ops"})
    wait_searchable(tenant, len(milvus_pks(tenant)))
    wait_searchable(other, len(milvus_pks(other)))
    return Corpus(
        tenant,
        other,
        asset_id_for(tenant, report.resolve().as_uri()),
        asset_id_for(tenant, parts.resolve().as_uri()),
        asset_id_for(tenant, photo.resolve().as_uri()),
        asset_id_for(other, b_doc.resolve().as_uri()),
    )


async def _ask(
    client: Client, tenant: str, text: str, queue: str = TASK_QUEUE, **kw: object
) -> AskResult:
    top_k = kw.pop("top_k", 3)
    assert isinstance(top_k, int)
    inp = AskInput(tenant, text=text, top_k=top_k, **kw)  # type: ignore[arg-type]
    return await asyncio.wait_for(
        client.execute_workflow(
            ASK_WORKFLOW,
            inp,
            id=f"ask/{tenant}/{uuid.uuid4().hex}",
            task_queue=queue,
            result_type=AskResult,
        ),
        timeout=90,
    )


def _lexical(tenant: str, question: str, filters: AskFilters | None = None) -> list[str]:
    """The lexical leg alone: ``asset_id:chunk`` of its hits, best first."""
    with engine().connect() as conn:
        found = lexical.search(conn, tenant, question, filters or AskFilters(), 10)
    return [f"{h.asset_id}:{h.chunk}" for h in found.hits]


def _rows(tenant: str, asset_id: str) -> int:
    t = lexical.lexical_chunks
    with engine().connect() as conn:
        return int(
            conn.execute(
                sa.select(sa.func.count()).where(t.c.tenant == tenant, t.c.asset_id == asset_id)
            ).scalar_one()
        )


# --- found by their words ------------------------------------------------------------------


@pytest.mark.parametrize("queue", [TASK_QUEUE, QUERY_TASK_QUEUE])
async def test_a_fact_in_paragraph_five_of_page_three_is_found_by_its_words(
    corpus: Corpus, client: Client, queue: str
) -> None:
    result = await _ask(client, corpus.tenant, QUESTION, queue, generate=False)
    best = result.sources[0]
    assert best.asset_id == corpus.report and best.chunk.startswith("page:3"), result.sources
    assert "locker 5521" in best.snippet
    assert "locker 5521" in result.answer  # the extractive answer quotes it
    # The lexical leg alone puts page three first.
    assert _lexical(corpus.tenant, QUESTION)[0].startswith(f"{corpus.report}:page:3")


async def test_a_part_number_finds_its_own_page_not_its_neighbours(
    corpus: Corpus, client: Client
) -> None:
    result = await _ask(client, corpus.tenant, "AX-4421-B", generate=False, top_k=1)
    (best,) = result.sources
    assert best.asset_id == corpus.parts and best.chunk.startswith("page:2"), best
    assert "aisle 9" in best.snippet
    hits = _lexical(corpus.tenant, "Which aisle holds part AX-4421-B?")
    assert hits[0].startswith(f"{corpus.parts}:page:2")
    assert not any(h.startswith(f"{corpus.parts}:page:1") for h in hits[:1])


# --- isolation and filters -------------------------------------------------------------------


async def test_tenant_b_never_gets_tenant_a_lexical_hits(corpus: Corpus, client: Client) -> None:
    assert _lexical(corpus.tenant, "locker 5521")  # tenant A's words are indexed ...
    assert _lexical(corpus.other, "locker 5521") == []  # ... and tenant B finds none of them
    assert _lexical(corpus.other, "AX-4421-B impeller Q7 hydraulic") == []
    result = await _ask(client, corpus.other, QUESTION, generate=False, top_k=5)
    assert result.sources and {s.asset_id for s in result.sources} == {corpus.notes}
    assert all("5521" not in s.snippet for s in result.sources)
    assert "5521" not in result.answer


def test_every_structured_filter_applies_to_lexical_hits(corpus: Corpus) -> None:
    words = "locker 5521"
    report_hit = f"{corpus.report}:page:3"
    excluded = {
        "media_types": AskFilters(media_types=["image/png"]),
        "created_after": AskFilters(created_after=4_000_000_000),
        "created_before": AskFilters(created_before=1),
        "tags": AskFilters(tags={"team": "finance"}),
        "tags, one of two": AskFilters(tags={"team": "ops", "site": "north"}),
        "asset_ids": AskFilters(asset_ids=[corpus.parts]),
    }
    for name, filters in excluded.items():
        assert _lexical(corpus.tenant, words, filters) == [], name
    included = AskFilters(
        media_types=[PDF],
        created_after=1,
        created_before=4_000_000_000,
        tags={"team": "ops"},
        asset_ids=[corpus.report],
    )
    assert _lexical(corpus.tenant, words, included)[0].startswith(report_hit)
    # A filter the Milvus side refuses is refused here too (never silently dropped).
    with pytest.raises(lexical.BadLexicalFilter):
        _lexical(corpus.tenant, words, AskFilters(tags={"a=b": "c"}))


async def test_an_ask_filter_keeps_lexical_hits_out(corpus: Corpus, client: Client) -> None:
    result = await _ask(
        client,
        corpus.tenant,
        QUESTION,
        generate=False,
        top_k=5,
        filters=AskFilters(asset_ids=[corpus.parts, corpus.photo]),
    )
    assert result.sources and corpus.report not in {s.asset_id for s in result.sources}


# --- hostile query strings -----------------------------------------------------------------

HOSTILE = [
    "!locker & !5521",  # tsquery NOT / AND
    "locker | 5521 <-> impeller:*",  # OR, FOLLOWED BY, prefix
    "locker 5521' OR '1'='1",  # SQL quoting
    "locker 5521'); DROP TABLE lexical_chunks; --",
    '"locker" \\"5521\\" \\\\',  # quotes and backslashes
    "locker:A 5521:*B",  # weight labels
]


def test_tsquery_syntax_in_a_question_would_be_operators_if_parsed_raw() -> None:
    """The attack: handed to ``to_tsquery``, a question's text is the engine's query
    language (``!`` negates, ``:*`` is a prefix) or a syntax error; the lexical leg never
    parses it (see the next test)."""
    with engine().connect() as conn:
        negated = conn.execute(sa.text("SELECT to_tsquery('english', :q)::text"), {"q": HOSTILE[0]})
        assert negated.scalar_one() == "!'locker' & !'5521'"
    with engine().connect() as conn, pytest.raises(sa.exc.ProgrammingError):
        conn.execute(sa.text("SELECT to_tsquery('english', :q)"), {"q": HOSTILE[3]})


async def test_hostile_question_strings_are_searched_as_words(
    corpus: Corpus, client: Client
) -> None:
    for text in HOSTILE:
        hits = _lexical(corpus.tenant, text)
        assert hits and hits[0].startswith(f"{corpus.report}:page:3"), (text, hits)
    result = await _ask(client, corpus.tenant, HOSTILE[3], generate=False)
    assert result.sources[0].asset_id == corpus.report
    assert _rows(corpus.tenant, corpus.report) > 0  # the table is still there


# --- the prompt -----------------------------------------------------------------------------


async def test_the_prompt_carries_captions_tags_and_text_never_file_names(
    corpus: Corpus, client: Client, llm: LlmTestServer
) -> None:
    caption = "A forklift lifting a crimson crate on loading dock seven"
    assert lexical.set_caption(
        engine(), corpus.tenant, corpus.photo, "image", caption, "sha256:test"
    )
    llm.set_mode("ok")
    question = f"What is the forklift on the dock lifting? ({uuid.uuid4().hex[:6]})"
    result = await _ask(
        client,
        corpus.tenant,
        question,
        top_k=1,
        filters=AskFilters(asset_ids=[corpus.photo]),
    )
    assert result.sources and result.sources[0].asset_id == corpus.photo
    prompt = next(
        user_text(r) for r in reversed(llm.answer_requests) if question[-7:] in user_text(r)
    )
    assert f"Caption: {caption}" in prompt
    assert "Tags: team=ops" in prompt
    assert 'type="image"' in prompt
    for name in ("IMG", "2034"):
        assert name not in prompt.replace(question, ""), name
    # A PDF passage's source says which page it is, and carries its text.
    await _ask(client, corpus.tenant, QUESTION + " (pdf)", top_k=1)
    prompt = next(user_text(r) for r in reversed(llm.answer_requests) if "(pdf)" in user_text(r))
    assert 'type="PDF page 3' in prompt and "locker 5521" in prompt
    assert "report" not in prompt


def test_ocr_text_is_labelled_as_read_in_the_image_and_nothing_is_repeated() -> None:
    ocr = SourceChunk(
        "S1",
        "a1",
        "file:///photos/IMG_2034.jpg",
        "image",
        "image/jpeg",
        0.9,
        snippet="EXIT 12",
        caption="A green sign above a door reading EXIT 12",
        tags=["site=dock7"],
        origin="ocr",
    )
    frame = SourceChunk(
        "S2", "a2", "file:///v/clip_0001.mp4", "frame:12.500", "video/mp4", 0.8,
        snippet="Gate B closes at 18:00", origin="ocr",
    )  # fmt: skip
    bare = SourceChunk("S3", "a3", "file:///p/DSC_0042.jpg", "image", "image/jpeg", 0.7)
    prompt = fuse_prompt("exit sign?", [ocr, frame, bare], token_budget=2000, per_chunk_tokens=200)
    assert "Caption: A green sign above a door reading EXIT 12" in prompt.user
    assert prompt.user.count("EXIT 12") == 1  # the OCR text is inside the caption: not repeated
    assert "Tags: site=dock7" in prompt.user
    assert 'type="video frame at 12.5 s"' in prompt.user
    assert "Text read in it (OCR): Gate B closes at 18:00" in prompt.user
    assert "matched by its picture" in prompt.user  # S3 says what it is, not "DSC 0042"
    for name in ("IMG", "2034", "DSC", "0042", "clip_0001"):
        assert name not in prompt.user, name


# --- forget ---------------------------------------------------------------------------------


async def test_forget_removes_lexical_entries(
    worker: Workers, client: Client, tmp_path: Path, tenant: str
) -> None:
    doc = write_pdf(tmp_path / "memo.pdf", [PdfPage(["Locker 7781 holds the", "torque wrench."])])
    await _ingest(client, tenant, [doc], {})
    asset_id = asset_id_for(tenant, doc.resolve().as_uri())
    assert _rows(tenant, asset_id) > 0 and _lexical(tenant, "locker 7781")
    handle = await start_forget(client, ForgetInput(tenant, asset_id=asset_id, reason="T-1"))
    await asyncio.wait_for(handle.result(), timeout=120)
    assert _rows(tenant, asset_id) == 0
    assert _lexical(tenant, "locker 7781 torque wrench") == []
    deadline = time.monotonic() + 15  # Asks read Milvus with Bounded consistency
    while store().count(collection(), tenant, strong=False):
        assert time.monotonic() < deadline, "the forgotten vectors are still searchable"
        await asyncio.sleep(0.2)
    result = await _ask(client, tenant, "Which locker holds the torque wrench?", generate=False)
    assert asset_id not in {s.asset_id for s in result.sources}


# --- fusion and re-ranking (pure) ------------------------------------------------------------


def _hit(chunk: str, **kw: object) -> SearchHit:
    return SearchHit("a", chunk, f"file:///x/{chunk}.png", "image/png", **kw)  # type: ignore[arg-type]


def test_fusion_keeps_what_one_leg_finds_and_weights_each_leg() -> None:
    dense = [_hit("d1", dense_score=0.9), _hit("both", dense_score=0.5)]
    lexical_hits = [
        _hit("both", lexical_score=3.0, lexical_coverage=1.0, snippet="words"),
        _hit("l1", lexical_score=2.0, lexical_coverage=1.0),
        _hit("weak", lexical_score=1.0, lexical_coverage=0.1),
    ]
    fused = fuse_rrf({DENSE: dense, LEXICAL: lexical_hits}, {DENSE: 1.0, LEXICAL: 1.0}, 60, 0.25)
    # Found by both legs first; then each leg's best, whichever leg; a chunk holding a
    # tenth of the question's words last.
    assert [h.chunk for h in fused] == ["both", "d1", "l1", "weak"]
    both = fused[0]
    assert (both.dense_score, both.lexical_score, both.snippet) == (0.5, 3.0, "words")
    assert both.score == pytest.approx(1 / 61 + 0.25 / 62)
    assert fused[1].score == pytest.approx(1 / 61)
    muted = fuse_rrf({DENSE: dense, LEXICAL: lexical_hits}, {DENSE: 1.0, LEXICAL: 0.0}, 60)
    assert [h.chunk for h in muted][:2] == ["d1", "both"]  # the lexical weight 0: dense order


def test_rerank_reads_a_chunks_words_never_its_file_name() -> None:
    named = SearchHit("a", "image", "file:///x/red-circle.png", "image/png", score=1.0)
    tagged = SearchHit("b", "image", "file:///x/IMG_1.png", "image/png", score=0.9)
    tagged.tags = ["colour=red", "shape=circle"]
    captioned = SearchHit("c", "image", "file:///x/IMG_2.png", "image/png", score=0.8)
    captioned.caption = "A red circle on grey"
    ranked = rerank("a red circle", [named, tagged, captioned])
    assert [h.asset_id for h in ranked] == ["b", "c", "a"]


async def test_a_caption_survives_re_encoding_the_same_bytes_not_a_change(
    worker: Workers, client: Client, tmp_path: Path, tenant: str
) -> None:
    """A forced re-ingest (as a re-index) re-writes an asset's lexical rows: the caption
    of unchanged content stays (never captioned twice); a changed object's goes with it."""
    photo = tmp_path / "IMG_0001.png"
    photo.write_bytes(png_bytes((48, 48), (30, 160, 60)))
    await _ingest(client, tenant, [photo], {})
    asset_id = asset_id_for(tenant, photo.resolve().as_uri())
    assert lexical.set_caption(engine(), tenant, asset_id, "image", "A green square", "h:1")

    def caption() -> str:
        t = lexical.lexical_chunks
        with engine().connect() as conn:
            return str(
                conn.execute(
                    sa.select(t.c.caption).where(t.c.tenant == tenant, t.c.asset_id == asset_id)
                ).scalar_one()
            )

    handle = await start_ingest(client, tenant, [str(photo)], force=True)
    again = await asyncio.wait_for(handle.result(), timeout=120)
    assert (again.ingested, again.failed) == (1, 0), again  # type: ignore[attr-defined]
    assert caption() == "A green square"
    photo.write_bytes(png_bytes((48, 48), (200, 200, 30)))  # new bytes, a new generation
    await _ingest(client, tenant, [photo], {})
    assert caption() == ""


def test_hybrid_weight_decides_how_much_the_lexical_leg_counts() -> None:
    """An image + text Ask: the lexical leg reads the text alone, so an even or image-heavy
    hybrid ranks by the vectors as ``hybrid_weight`` always meant; a text Ask counts it all."""

    def share(has_image: bool, weight: float) -> float:
        inp = RetrieveInput("t", "q", [], "", 5, AskFilters(), True, 300)
        inp.has_image, inp.hybrid_weight = has_image, weight
        return inp.lexical_share

    assert share(False, 0.9) == 1.0
    assert [share(True, w) for w in (0.0, 0.1, 0.25, 0.5, 0.9)] == pytest.approx(
        [1.0, 0.8, 0.5, 0.0, 0.0]
    )
