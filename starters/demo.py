"""``mmrag demo``: the whole product on this machine in one command.

Starts the embedded stack, a background worker with the tiny CLIP model shipped under
tests/fixtures, generates a small synthetic corpus, ingests it through the durable
workflows, asks sample questions and prints where to watch the runs in the Web UI.
The stack and the worker keep running so the Web UI can be explored; ``mmrag stack
down`` stops everything.
"""

from __future__ import annotations

import asyncio
import os

from rich.console import Console

from workers.settings import TINY_MODEL_DIR, get_settings

DEMO_TENANT = "demo"
DEMO_QUESTIONS = [
    "a red circle on a white background",
    "a blue triangle",
    "a yellow square",
    "a green circle",
]
TINY_MODEL_ENV = {
    "MMRAG_CLIP_MODEL": "mmrag-tiny",
    "MMRAG_CLIP_PRETRAINED": "",
    "MMRAG_CLIP_CHECKPOINT": str(TINY_MODEL_DIR / "mmrag-tiny.pt"),
    "MMRAG_DEVICE": "cpu",
}


def run_demo(console: Console) -> int:
    from stack.services import Stack
    from starters.background import start_background_worker
    from starters.synthetic_corpus import write_corpus

    os.environ.update(TINY_MODEL_ENV)
    get_settings.cache_clear()
    settings = get_settings()

    console.rule("1. embedded stack (Temporal dev server, Milvus, Postgres)")
    endpoints = Stack(settings.state_dir).up()
    for key, value in endpoints.items():
        console.print(f"  {key:18} {value}")

    console.rule("2. workers (cpu + encode, tiny CLIP model)")
    pid = start_background_worker(settings.state_dir, TINY_MODEL_ENV)
    console.print(f"  worker pid {pid}, log {settings.state_dir / 'logs' / 'worker.log'}")

    console.rule("3. demo corpus")
    corpus = settings.state_dir / "demo-corpus"
    if not corpus.exists():
        write_corpus(corpus, per_class=3, seed=2026)
    (corpus / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    console.print(
        f"  {sum(1 for _ in corpus.iterdir())} files in {corpus} (one deliberately corrupt)"
    )

    console.rule("4. durable ingest (IngestBatch workflow)")
    result = asyncio.run(_ingest(str(corpus), console))

    console.rule("5. questions (nearest neighbours through the index alias)")
    from starters.search import nearest

    for question in DEMO_QUESTIONS:
        console.print(f"[bold]Q:[/bold] {question}")
        for hit in nearest(question, DEMO_TENANT, top_k=3):
            name = str(hit["uri"]).rsplit("/", 1)[-1]
            console.print(f"    {float(hit['score']):.3f}  {name}")  # type: ignore[arg-type]

    console.rule("6. watch it")
    ui = endpoints.get("temporal_ui_url", "http://127.0.0.1:8233")
    console.print(f"  Temporal Web UI: {ui}/namespaces/default/workflows")
    console.print("  stop everything with: .venv/bin/mmrag stack down")
    return 0 if result.ingested else 1


async def _ingest(corpus: str, console: Console):  # type: ignore[no-untyped-def]
    from starters.ingest import follow, print_summary, start_ingest
    from workers.temporal_client import connect

    client = await connect()
    handle = await start_ingest(client, DEMO_TENANT, [corpus], tags={"source": "demo"})
    console.print(f"  workflow {handle.id}")
    result = await follow(handle, console)
    print_summary(result, console)
    return result
