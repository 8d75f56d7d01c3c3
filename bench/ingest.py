"""Images/second through the durable pipeline against a bare in-process loop, same run.

Both sides use the same encoder, decode path, Milvus store and Postgres registry; the
bare loop calls the encode activity's code directly with no Temporal in between, so the
ratio is what durability costs. Starts its own embedded stack on free ports and stops it.

    .venv/bin/python bench/ingest.py [--images 256] [--model ViT-B-32] [--tiny] [--rounds 2]

The last line of output is one line of JSON with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from activities.clip import TINY_MODEL_DIR  # noqa: E402
from bench.harness import stack_env  # noqa: E402
from settings import get_settings
from stack.services import Stack, StackPorts  # noqa: E402
from starters.background import WorkerProcess  # noqa: E402
from starters.synthetic_corpus import write_corpus  # noqa: E402

MODELS = {
    "ViT-B-32": {
        "MMRAG_CLIP_MODEL": "ViT-B-32",
        "MMRAG_CLIP_PRETRAINED": "",
        "MMRAG_CLIP_CHECKPOINT": "",
    },
    "mmrag-tiny": {
        "MMRAG_CLIP_MODEL": "mmrag-tiny",
        "MMRAG_CLIP_PRETRAINED": "",
        "MMRAG_CLIP_CHECKPOINT": str(TINY_MODEL_DIR / "mmrag-tiny.pt"),
    },
}


def bare_loop(tenant: str, corpus: Path, batch_size: int) -> float:
    """The same steps, in process: list, check, decode+encode+store, then the record step
    (lexical index, registry, audit) through the activity's own code."""
    from activities.encode_batch import BatchEncodeActivities
    from activities.ingest import IngestActivities
    from activities.store import registry
    from workflows.activities.ingest import EncodeBatchInput, RecordOutcomesInput, ScanPageInput

    settings = get_settings()
    encode = BatchEncodeActivities(settings)
    ingest = IngestActivities(settings)
    index = registry.active_index(ingest.engine)
    assert index is not None
    start = time.perf_counter()
    token = ""
    n = 0
    while True:
        page = ingest.scan_page(
            ScanPageInput(tenant, corpus.as_uri(), token, 256, index.version, True)
        )
        for i in range(0, len(page.to_encode), batch_size):
            objects = page.to_encode[i : i + batch_size]
            outcomes = encode.encode_batch(EncodeBatchInput(tenant, index, objects))
            ingest.record_batch(
                RecordOutcomesInput(tenant, index.version, objects, outcomes, {}),
                workflow_id="bench",
                run_id=tenant,
            )
            n += len(objects)
        token = page.next_token
        if not token:
            break
    return n / (time.perf_counter() - start)


async def durable(tenant: str, corpus: Path, batch_size: int, expected: int) -> float:
    from starters.ingest import start_ingest
    from workers.temporal_client import connect

    client = await connect()
    start = time.perf_counter()
    handle = await start_ingest(client, tenant, [str(corpus)], force=True, batch_size=batch_size)
    result = await handle.result()
    elapsed = time.perf_counter() - start
    assert result.ingested == expected, result
    return expected / elapsed


def alternate(
    state: Path, corpus: Path, batch_size: int, n: int, rounds: int, label: str
) -> tuple[float, float]:
    """Median images/s of the bare loop and of the durable pipeline (a worker process with
    every role, on the stack of ``state``) over ``corpus``'s ``n`` objects, in alternating
    rounds after one warm-up of each (it creates the index version and warms the models)."""
    worker = WorkerProcess.start(state, "all", dict(os.environ))
    try:
        asyncio.run(durable("warmup", corpus, batch_size, n))
        bare_loop("warmup-bare", corpus, batch_size)
        bare_runs, durable_runs = [], []
        for r in range(rounds):
            bare_runs.append(bare_loop(f"bare-{r}", corpus, batch_size))
            durable_runs.append(asyncio.run(durable(f"durable-{r}", corpus, batch_size, n)))
            print(
                f"{label} round {r}: bare {bare_runs[-1]:.1f} img/s, "
                f"durable {durable_runs[-1]:.1f} img/s",
                flush=True,
            )
    finally:
        worker.stop()
    return statistics.median(bare_runs), statistics.median(durable_runs)


def measure(
    model: str, images: int, batch_size: int, rounds: int, image_size: int
) -> dict[str, float]:
    os.environ.update(MODELS[model])
    get_settings.cache_clear()
    with tempfile.TemporaryDirectory(prefix="mmrag-bench-") as tmp:
        state = Path(tmp) / "state"
        stack = Stack(state, StackPorts.free())
        try:
            endpoints = stack.up()
            os.environ.update({**stack_env(state, endpoints), "MMRAG_BATCH_SIZE": str(batch_size)})
            get_settings.cache_clear()
            per_class = max(1, images // 18)
            corpus = Path(tmp) / "corpus"
            write_corpus(corpus, per_class=per_class, seed=1, size=image_size)
            n = per_class * 18
            bare_ips, durable_ips = alternate(state, corpus, batch_size, n, rounds, model)
        finally:
            stack.down()
    return {
        "images": n,
        "bare_ips": round(bare_ips, 2),
        "durable_ips": round(durable_ips, 2),
        "ratio": round(durable_ips / bare_ips, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=144)
    parser.add_argument("--tiny-images", type=int, default=1440)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--skip-vit", action="store_true")
    args = parser.parse_args()
    figures: dict[str, object] = {"batch_size": args.batch_size, "image_px": args.image_size}
    if not args.skip_vit:
        figures["ViT-B-32"] = measure(
            "ViT-B-32", args.images, args.batch_size, args.rounds, args.image_size
        )
    figures["mmrag-tiny"] = measure(
        "mmrag-tiny", args.tiny_images, args.batch_size, args.rounds, args.image_size
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
