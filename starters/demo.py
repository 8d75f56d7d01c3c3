"""``mmrag demo``: the whole product on this machine in one command.

Starts the embedded stack, a background worker with the tiny CLIP model shipped under
tests/fixtures, generates a small synthetic corpus, ingests it through the durable
workflows, asks sample questions (text, filtered, image and hybrid) and prints where to
watch the runs in the Web UI. The stack and the worker keep running so the Web UI can be
explored; ``mmrag stack down`` stops everything.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

from rich.console import Console

from activities.clip import TINY_MODEL_DIR
from settings import get_settings
from starters.synthetic_corpus import render
from workers.temporal_client import run_client_command
from workflows.contracts import AskFilters, AskInput, Source

DEMO_TENANT = "demo"
DEMO_QUESTIONS = [
    "Which pictures show a red circle on a white background?",
    "Is there a blue triangle?",
    "Find a yellow square",
]
DEMO_PDF = "quarterly-report.pdf"
DEMO_VIDEO = "shapes-clip.mp4"
DEMO_HANDBOOK = "site-handbook.pdf"  # a fact in paragraph 5 of page 3
DEMO_SCAN = "scanned-memo.pdf"  # a scanned page: no text layer, read by OCR
TINY_MODEL_ENV = {
    "MMRAG_CLIP_MODEL": "mmrag-tiny",
    "MMRAG_CLIP_PRETRAINED": "",
    "MMRAG_CLIP_CHECKPOINT": str(TINY_MODEL_DIR / "mmrag-tiny.pt"),
    "MMRAG_DEVICE": "cpu",
}


def run_demo(console: Console) -> int:
    from stack.services import Stack, StackPorts
    from starters.background import start_background_worker
    from starters.synthetic_corpus import (
        handbook_pages,
        write_corpus,
        write_pdf,
        write_scanned_memo,
        write_video,
    )

    os.environ.update(TINY_MODEL_ENV)
    get_settings.cache_clear()
    settings = get_settings()

    console.rule("1. embedded stack (Temporal dev server, Milvus, Postgres)")
    endpoints = Stack(settings.state_dir, StackPorts.requested()).up()
    for key, value in endpoints.items():
        console.print(f"  {key:18} {value}")

    console.rule("2. workers (every role in one process, tiny CLIP model)")
    pid = start_background_worker(settings.state_dir, TINY_MODEL_ENV)
    console.print(f"  worker pid {pid}, log {settings.state_dir / 'logs' / 'worker.log'}")

    console.rule("3. demo corpus")
    corpus = settings.state_dir / "demo-corpus"
    if not corpus.exists():
        write_corpus(corpus, per_class=3, seed=2026)
    # A 3-page PDF (a red circle on page 2) and a 4 s video (blue square, then a green
    # triangle from 2 s): pages and keyframes come back with their locators.
    if not (corpus / DEMO_PDF).exists():
        write_pdf(corpus / DEMO_PDF)
    if not (corpus / DEMO_VIDEO).exists():
        write_video(corpus / DEMO_VIDEO)
    # Answers from inside documents: a 4-page handbook whose fact sits in the fifth
    # paragraph of page 3, and a memo that exists only as a scanned picture.
    if not (corpus / DEMO_HANDBOOK).exists():
        write_pdf(corpus / DEMO_HANDBOOK, handbook_pages())
    if not (corpus / DEMO_SCAN).exists():
        write_scanned_memo(corpus / DEMO_SCAN)
    (corpus / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    console.print(
        f"  {sum(1 for _ in corpus.iterdir())} files in {corpus}: images, {DEMO_PDF}, "
        f"{DEMO_HANDBOOK}, {DEMO_SCAN} (scanned), {DEMO_VIDEO} and one deliberately corrupt PNG"
    )

    console.rule("4. durable ingest (IngestBatch workflow)")
    result = run_client_command(_ingest(str(corpus), console))

    console.rule("5. questions (Ask workflows: encode -> search -> answer with sources)")
    wait_searchable(DEMO_TENANT, result.vectors)
    query_image = settings.state_dir / "demo-query.png"
    render("purple", "triangle", random.Random(7)).save(query_image)
    run_client_command(_ask_samples(query_image, console))

    console.rule("6. answers from inside documents (passages, OCR, lexical + dense)")
    from activities.media.ocr import tesseract_path

    if not tesseract_path():
        console.print(
            f"  [yellow]tesseract-ocr is not installed: {DEMO_SCAN} was not read "
            "(apt-get install tesseract-ocr tesseract-ocr-eng, then `mmrag stack down` and "
            "`make demo` again)[/yellow]"
        )
    run_client_command(_ask_documents(console))

    console.rule("7. watch it")
    ui = endpoints.get("temporal_ui_url", "http://127.0.0.1:8233")
    console.print(f"  Temporal Web UI: {ui}/namespaces/default/workflows")
    console.print(f"  search page:     {_start_web()}", highlight=False, soft_wrap=True)
    console.print("  stop everything with: .venv/bin/mmrag stack down")
    # A second `make demo` finds everything unchanged: still a working index.
    return 0 if result.ingested + result.unchanged else 1


async def _ask_samples(query_image: Path, console: Console) -> None:
    from starters.ask import ask, ask_task_queue, image_fields, print_answer
    from workers.temporal_client import connect

    client = await connect()
    samples = [
        ("text", AskInput(DEMO_TENANT, text=DEMO_QUESTIONS[0], top_k=3)),
        ("text", AskInput(DEMO_TENANT, text=DEMO_QUESTIONS[1], top_k=3)),
        (
            "text + filter tag.source=demo",
            AskInput(
                DEMO_TENANT,
                text=DEMO_QUESTIONS[2],
                top_k=3,
                filters=AskFilters(tags={"source": "demo"}),
            ),
        ),
        (
            "text + filter media_type=application/pdf (PDF pages)",
            AskInput(
                DEMO_TENANT,
                text="a red circle on a white background",
                top_k=3,
                filters=AskFilters(media_types=["application/pdf"]),
            ),
        ),
        (
            "text + filter media_type=video/mp4 (video keyframes)",
            AskInput(
                DEMO_TENANT,
                text="a green triangle on a white background",
                top_k=3,
                filters=AskFilters(media_types=["video/mp4"]),
            ),
        ),
        (
            f"image {query_image.name}",
            AskInput(DEMO_TENANT, top_k=3, **image_fields(str(query_image))),
        ),
        (
            "hybrid: image + text",
            AskInput(DEMO_TENANT, text="a purple shape", top_k=3, **image_fields(str(query_image))),
        ),
    ]
    queue = await ask_task_queue(client)
    console.print(f"  asks start on task queue {queue}")
    for label, inp in samples:
        console.print(f"\n[bold]Q ({label}):[/bold] {inp.text or '(image only)'}")
        print_answer(await ask(client, inp, queue), console)


async def _ask_documents(console: Console) -> None:
    """One question answered from a paragraph deep inside a PDF, one from a scanned page,
    each with why: the source, its page and passage, and the words that answer."""
    from starters.ask import ask, ask_task_queue, print_answer
    from starters.synthetic_corpus import HANDBOOK_QUESTION, MEMO_QUESTION
    from workers.temporal_client import connect

    client = await connect()
    queue = await ask_task_queue(client)
    for label, question in (
        ("a paragraph deep inside a PDF", HANDBOOK_QUESTION),
        ("a scanned page", MEMO_QUESTION),
    ):
        console.print(f"\n[bold]Q ({label}):[/bold] {question}")
        result = await ask(client, AskInput(DEMO_TENANT, text=question, top_k=3), queue)
        print_answer(result, console)
        if result.sources:
            why = explain_source(result.sources[0])
            console.print(f"  why: {why}", highlight=False, markup=False, soft_wrap=True)


def explain_source(source: Source) -> str:
    """Where a source's words come from, for a person: file, page, passage, and the text
    (a PDF's passage, or a scan's OCR text)."""
    name = Path(source.uri.removeprefix("file://")).name
    parts = source.chunk.split(":")
    if parts[0] == "page" and len(parts) >= 2:
        where = f"page {parts[1]}"
        if len(parts) == 4 and parts[2] == "p":
            where += f", passage {parts[3]}"
    elif parts[0] == "frame" and len(parts) == 2:
        where = f"frame at {parts[1]} s"
    else:
        where = "the image"
    text = " ".join(source.snippet.split())
    quoted = f': "{text[:240]}{"..." if len(text) > 240 else ""}"' if text else ""
    return f"[{source.id}] {name}, {where}{quoted}"


def wait_searchable(tenant: str, expected: int, timeout: float = 15.0) -> None:
    """Asks read Milvus with Bounded consistency; fresh vectors are visible within seconds."""
    from activities.store import registry
    from activities.store.vectors import get_store

    s = get_settings()
    index = registry.active_index(registry.get_engine(s.database_endpoint()))
    store = get_store(s.milvus_endpoint(), s.milvus_token.get_secret_value())
    deadline = time.monotonic() + timeout
    while index and store.count(index.collection, tenant, strong=False) < expected:
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)


async def _ingest(corpus: str, console: Console):  # type: ignore[no-untyped-def]
    from activities.store.objects import normalize_uri
    from settings import get_settings
    from starters.ingest import follow, print_summary, register_local_roots, start_ingest
    from workers.temporal_client import connect

    client = await connect()
    register_local_roots(get_settings().state_dir, DEMO_TENANT, [normalize_uri(corpus)])
    handle = await start_ingest(client, DEMO_TENANT, [corpus], tags={"source": "demo"})
    console.print(f"  workflow {handle.id}")
    result = await follow(handle, console)
    print_summary(result, console)
    return result


def _start_web() -> str:
    """`mmrag serve` in the background, and its link with a new writer key of the demo tenant
    (in the fragment, which the browser never sends; the page keeps it in the tab)."""
    from activities.store.registry import get_engine
    from starters.web.keys import create_key
    from starters.web.service import start_background_server

    settings = get_settings()
    engine = get_engine(settings.database_endpoint())
    _, key = create_key(engine, DEMO_TENANT, "writer", "make demo")
    try:
        url = start_background_server(
            settings.state_dir, TINY_MODEL_ENV, settings.web_host, settings.web_port
        )
    except RuntimeError as e:
        return f"not started: {e} (set MMRAG_WEB_PORT to a free port)"
    return f"{url}/#key={key}"
