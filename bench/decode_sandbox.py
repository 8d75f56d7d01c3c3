"""What decoding images in the sandbox costs, against decoding them in the worker, same run.

Before, the encode worker decoded images in its own process (``media.decode_image`` on its
decode threads), with no time limit. Now each decode thread sends the bytes to a decoder
child (``SandboxPool.decode_image``) that decodes under ``MMRAG_IMAGE_DECODE_TIME_LIMIT_S``
and sends back RGB pixels already shrunk to ``MMRAG_RENDER_MAX_SIDE``. This measures, with
the same images on the same threads, interleaved rounds:

- ingest throughput (img/s) on ``--threads`` decode threads (default: MMRAG_DECODE_THREADS),
  in micro-batches of 32 as the encode activity decodes them: decoding alone, for the 256 px
  PNGs bench/ingest.py ingests and for photo-sized JPEGs (bench/encode_gpu.py's); and the
  activity's whole image phase minus storage (decode, preprocess, the tiny CLIP model's
  forward pass per batch), where a slower decode would show most;
- one query image decoded on its own (what Ask's encode step adds), p50 in ms;
- what starting a decoder child costs (its first decode).

Images/s moves with whatever else runs on the machine; the CPU milliseconds per image (this
process and its decoder children) hardly do, so both are reported.

    .venv/bin/python bench/decode_sandbox.py [--images 576] [--threads 4] [--rounds 3]

The last line of output is one line of JSON with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from activities.clip.encoder import TINY_CHECKPOINT_PATH, TINY_MODEL_NAME, ClipEncoder  # noqa: E402
from activities.media.formats import MediaLimits  # noqa: E402
from activities.media.images import decode_image
from activities.media.sandbox import DecoderSandbox, SandboxPool  # noqa: E402
from bench.encode_gpu import synthetic_jpegs  # noqa: E402
from settings import Settings  # noqa: E402
from starters.synthetic_corpus import write_corpus  # noqa: E402

SETTINGS = Settings()
LIMITS = MediaLimits.from_settings(SETTINGS)
TIME_LIMIT_S = SETTINGS.image_decode_time_limit_s
BATCH = 32  # images per micro-batch (MMRAG_BATCH_SIZE's default)


def corpus_pngs(n: int) -> list[bytes]:
    """The images bench/ingest.py ingests: 256 px synthetic PNGs."""
    with tempfile.TemporaryDirectory(prefix="mmrag-bench-") as tmp:
        files = write_corpus(Path(tmp), per_class=max(1, n // 18), seed=1, size=256)
        return [path.read_bytes() for path, _ in files]


def in_process(data: bytes) -> Image.Image:
    """The old path: decode in the worker's own thread."""
    return decode_image(
        data, LIMITS.max_object_bytes, LIMITS.max_image_pixels, "", LIMITS.render_max_side
    )


def cpu_seconds(pids: list[int]) -> float:
    """CPU time of this process (every thread) and of the given decoder children."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    total = usage.ru_utime + usage.ru_stime
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def rate(
    pool: ThreadPoolExecutor,
    decode: Callable[[bytes], Image.Image],
    items: list[bytes],
    encoder: ClipEncoder | None = None,
    children: list[int] | None = None,
) -> tuple[float, float]:
    """(images/s, CPU ms per image) through ``decode`` on the pool, a micro-batch at a time;
    with ``encoder``, each image is also preprocessed on the pool and each batch encoded.
    CPU counts this process and ``children``: unlike images/s, it hardly moves when other
    work shares the machine."""

    def prepare(data: bytes) -> object:
        image = decode(data)
        assert max(image.size) <= LIMITS.render_max_side
        return image if encoder is None else encoder.preprocess(image)

    cpu = cpu_seconds(children or [])
    started = time.perf_counter()
    for start in range(0, len(items), BATCH):
        prepared = list(pool.map(prepare, items[start : start + BATCH]))
        if encoder is not None:
            encoder.encode_images(prepared)
    elapsed = time.perf_counter() - started
    return len(items) / elapsed, (cpu_seconds(children or []) - cpu) * 1000 / len(items)


def throughput(
    name: str,
    items: list[bytes],
    args: argparse.Namespace,
    sandboxes: SandboxPool,
    encoder: ClipEncoder | None = None,
) -> dict[str, float]:
    def sandboxed(data: bytes) -> Image.Image:
        return sandboxes.decode_image(data, "", LIMITS, TIME_LIMIT_S)

    with ThreadPoolExecutor(max_workers=args.threads) as pool:
        rate(pool, in_process, items[:BATCH], encoder)  # warm up (one child per thread)
        rate(pool, sandboxed, items[:BATCH], encoder)
        children = sandboxes.pids()
        base, new = [], []
        for r in range(args.rounds):
            base.append(rate(pool, in_process, items, encoder))
            new.append(rate(pool, sandboxed, items, encoder, children))
            print(
                f"{name} round {r}: in-process {base[-1][0]:.1f} img/s {base[-1][1]:.2f} ms "
                f"CPU/img, sandbox {new[-1][0]:.1f} img/s {new[-1][1]:.2f} ms CPU/img",
                flush=True,
            )
    b, n = (statistics.median(r[0] for r in base), statistics.median(r[0] for r in new))
    b_cpu, n_cpu = (statistics.median(r[1] for r in base), statistics.median(r[1] for r in new))
    return {
        "images": len(items),
        "in_process_ips": round(b, 1),
        "sandbox_ips": round(n, 1),
        "ratio": round(n / b, 3),
        "in_process_cpu_ms": round(b_cpu, 3),
        "sandbox_cpu_ms": round(n_cpu, 3),
        "cpu_ratio": round(n_cpu / b_cpu, 3),
    }


def query_latency(items: list[bytes], repeats: int) -> dict[str, float]:
    """One image at a time, as Ask's encode step decodes a query image (a warm child)."""
    box = DecoderSandbox(SETTINGS.decode_memory_mb, time_limit_s=TIME_LIMIT_S)
    try:
        box.decode_image(items[0], "", LIMITS, TIME_LIMIT_S)
        base, new = [], []
        for i in range(repeats):
            data = items[i % len(items)]
            started = time.perf_counter()
            in_process(data)
            base.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            box.decode_image(data, "", LIMITS, TIME_LIMIT_S)
            new.append((time.perf_counter() - started) * 1000)
    finally:
        box.kill()
    b, n = statistics.median(base), statistics.median(new)
    return {
        "in_process_p50_ms": round(b, 2),
        "sandbox_p50_ms": round(n, 2),
        "added_ms": round(n - b, 2),
    }


def child_start(data: bytes, repeats: int) -> float:
    """Seconds from nothing to a fresh child's first decoded image (median)."""
    times = []
    for _ in range(repeats):
        box = DecoderSandbox(SETTINGS.decode_memory_mb, time_limit_s=TIME_LIMIT_S)
        started = time.perf_counter()
        box.decode_image(data, "", LIMITS, TIME_LIMIT_S)
        times.append(time.perf_counter() - started)
        box.kill()
    return round(statistics.median(times), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=576)
    parser.add_argument("--threads", type=int, default=SETTINGS.decode_threads)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--queries", type=int, default=100)
    args = parser.parse_args()
    pngs, jpegs = corpus_pngs(args.images), synthetic_jpegs(args.images // 2)
    tiny = ClipEncoder.load(TINY_MODEL_NAME, checkpoint=TINY_CHECKPOINT_PATH, device="cpu")
    sandboxes = SandboxPool.from_settings(SETTINGS)
    figures: dict[str, object] = {"threads": args.threads, "rounds": args.rounds}
    try:
        figures["decode_png_256px"] = throughput("decode png 256px", pngs, args, sandboxes)
        figures["decode_jpeg_photo"] = throughput("decode jpeg photo", jpegs, args, sandboxes)
        figures["image_phase_tiny_png_256px"] = throughput(
            "decode+preprocess+tiny CLIP, png 256px", pngs, args, sandboxes, tiny
        )
    finally:
        sandboxes.close()
    figures["query_jpeg_photo"] = query_latency(jpegs[:8], args.queries)
    figures["query_png_256px"] = query_latency(pngs[:8], args.queries)
    figures["child_start_s"] = child_start(jpegs[0], 5)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
