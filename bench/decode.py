"""Image decode + preprocess throughput by thread count, and with processes instead.

The encode worker decodes and preprocesses images on a thread pool (``MMRAG_DECODE_THREADS``)
while the model runs. On a GPU host that pool, not the model, bounds ingest
(bench/encode_gpu.py). This measures how it scales: the same JPEGs through the encode
activity's own steps (``decode_image`` with its draft-mode shrink, then
``ClipEncoder.preprocess``) on 1 thread (the baseline), N threads, and N processes. Threads
that scale far worse than processes mean the GIL is held somewhere in those steps.

Usage::

    .venv/bin/python bench/decode.py [--images 1024] [--threads 1,2,4,8,14] [--model ViT-B-32]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from activities.clip.encoder import ClipEncoder  # noqa: E402
from activities.media.images import decode_image  # noqa: E402
from bench.encode_gpu import LIMITS, MAX_BYTES, MAX_PIXELS, synthetic_jpegs  # noqa: E402

_encoder: ClipEncoder | None = None


def _init(model: str) -> None:
    global _encoder
    torch.set_num_threads(1)
    _encoder = ClipEncoder.load(model, device="cpu")


def prepare(raw: bytes) -> int:
    assert _encoder is not None
    image = decode_image(raw, MAX_BYTES, MAX_PIXELS, "", LIMITS.render_max_side)
    return int(_encoder.preprocess(image).numel())


def rate(pool: Executor, jpegs: list[bytes]) -> float:
    list(pool.map(prepare, jpegs[: max(8, len(jpegs) // 8)]))  # warm up every worker
    started = time.perf_counter()
    list(pool.map(prepare, jpegs, chunksize=8 if isinstance(pool, ProcessPoolExecutor) else 1))
    return round(len(jpegs) / (time.perf_counter() - started), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--threads", default=f"1,2,{os.cpu_count() or 1}")
    parser.add_argument("--model", default="ViT-B-32")
    args = parser.parse_args()
    counts = sorted({int(n) for n in args.threads.split(",")} | {1})
    jpegs = synthetic_jpegs(args.images)
    _init(args.model)
    figures: dict[str, object] = {"images": len(jpegs), "cpus": os.cpu_count()}
    threads, processes = {}, {}
    for n in counts:
        with ThreadPoolExecutor(max_workers=n) as pool:
            threads[str(n)] = rate(pool, jpegs)
        print(f"{n:>3} threads  : {threads[str(n)]:>8} img/s", flush=True)
    for n in counts[1:]:
        with ProcessPoolExecutor(max_workers=n, initializer=_init, initargs=(args.model,)) as pool:
            processes[str(n)] = rate(pool, jpegs)
        print(f"{n:>3} processes: {processes[str(n)]:>8} img/s", flush=True)
    top = str(counts[-1])
    figures.update(threads=threads, processes=processes)
    if len(counts) > 1:
        figures["ratio_threads"] = round(threads[top] / threads["1"], 2)
        figures["ratio_processes"] = round(processes[top] / threads["1"], 2)
        print(
            f"ratio to 1 thread at {top}: threads {figures['ratio_threads']}x, "
            f"processes {figures['ratio_processes']}x"
        )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
