"""Encoder throughput on the machine's accelerator: the project's path against the obvious one.

The project's encode path (``activities.clip.encoder.ClipEncoder``: fp16 weights under autocast on
CUDA, one forward pass per batch, pinned host memory, decoding on a thread pool overlapped
with the model) is timed against the loop a first version would write: an fp32 model fed one
image at a time, decoded in the same thread. Same images, same run. What it prints:

- model-only images/second per batch size (preprocessed tensors already in host memory), and
  the fp32 batched figure that separates the fp16 gain from the batching gain;
- decode + preprocess + encode images/second for the baseline and the project's pipeline;
- text-query latency (one query, as ``encode_query`` does it) p50/p99 for fp32 and fp16;
- agreement: the lowest cosine between fp16 and fp32 vectors of the same image;
- the ratio project / baseline;
- JPEG images/second end to end as the encode worker runs them (``jpeg_decode``): decoded in
  the decoder sandbox on CPU threads, against decoded on the encoder's device
  (activities/media/jpeg_gpu.py, MMRAG_GPU_JPEG_DECODE), with the lowest cosine between
  the two paths' vectors (issue 17's goal: >= 3,000 img/s per H200);
- with ``--durable-images N``: the durable ``IngestBatch`` against the bare in-process loop
  on a JPEG corpus, on its own embedded stack (bench/ingest.py's two sides; goal: >= 0.9x);

then one line of JSON with every figure.

Usage (random ViT-B-32 weights are fine for speed)::

    .venv/bin/python bench/encode_gpu.py [--model ViT-B-32] [--images 1024]
        [--batch-sizes 1,8,32,64,128,256] [--decode-threads 8] [--tiny] [--device auto]
        [--gpu-decode-threads 32] [--durable-images 4096]

On a CPU-only machine it runs too (fp32 both sides; the "GPU" decoder then runs libjpeg on
the CPU in this process), which is how it is checked here:
``--device cpu --images 64 --durable-images 144``; the figures that matter come from a CUDA
device.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from activities.clip.encoder import (  # noqa: E402
    TINY_CHECKPOINT_PATH,
    TINY_MODEL_NAME,
    ClipEncoder,
    resolve_device,
)
from activities.media.formats import JPEG, MediaLimits  # noqa: E402
from activities.media.images import decode_image  # noqa: E402
from activities.media.jpeg_gpu import GpuJpegDecoder  # noqa: E402
from activities.media.ocr import ocr_limits  # noqa: E402
from activities.media.sandbox import SandboxPool  # noqa: E402
from settings import Settings  # noqa: E402

LIMITS = MediaLimits.from_settings(Settings())
WORKER_LIMITS = ocr_limits(LIMITS)  # as the encode worker has them (OCR off without tesseract)
IMAGE_TIME_LIMIT_S = Settings().image_decode_time_limit_s
MAX_BYTES, MAX_PIXELS = LIMITS.max_object_bytes, LIMITS.max_image_pixels


def synthetic_jpegs(n: int, seed: int = 7) -> list[bytes]:
    """Photo-sized JPEGs with smooth content (noise would make decoding unrealistically slow)."""
    rng = np.random.default_rng(seed)
    sizes = [(640, 480), (1024, 768), (800, 800), (1280, 720)]
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        coarse = rng.integers(0, 255, size=(6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=88)
        out.append(buf.getvalue())
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    started = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - started


def fp32_copy(encoder: ClipEncoder):  # type: ignore[no-untyped-def]
    """The baseline model: the project's weights (random ones included) cast to fp32."""
    return copy.deepcopy(encoder.model).float().eval().requires_grad_(False)


def baseline_encode_one(model, pixels: torch.Tensor, device: torch.device) -> np.ndarray:  # type: ignore[no-untyped-def]
    with torch.inference_mode():
        features = model.encode_image(pixels.unsqueeze(0).to(device))
    return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()


def batches(items: list[bytes], size: int) -> Iterator[list[bytes]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def project_pipeline(
    encoder: ClipEncoder,
    jpegs: list[bytes],
    batch_size: int,
    pool: ThreadPoolExecutor,
    prepare: Callable[[bytes], torch.Tensor] | None = None,
) -> np.ndarray:
    """Decode on the pool one batch ahead of the model, as the encode activity does;
    ``prepare`` decodes and preprocesses one file (default: in this process, with the
    draft-mode JPEG shrink to ``render_max_side`` while decoding)."""

    def in_process(raw: bytes) -> torch.Tensor:
        image = decode_image(raw, MAX_BYTES, MAX_PIXELS, "", LIMITS.render_max_side)
        return encoder.preprocess(image)

    prepare = prepare or in_process
    pending: list[Future[torch.Tensor]] | None = None
    out = []
    for chunk in batches(jpegs, batch_size):
        submitted = [pool.submit(prepare, raw) for raw in chunk]
        if pending is not None:
            out.append(encoder.encode_images([f.result() for f in pending]))
        pending = submitted
    if pending is not None:
        out.append(encoder.encode_images([f.result() for f in pending]))
    return np.concatenate(out)


Prepare = Callable[[bytes], torch.Tensor]


def jpeg_decode_paths(
    args: argparse.Namespace, encoder: ClipEncoder, jpegs: list[bytes], batch_size: int
) -> dict:
    """The encode worker's JPEG path end to end (decode + preprocess + encode), images/s:
    decoded in the decoder sandbox on ``--decode-threads`` threads, against decoded on the
    encoder's device by the batched GPU decoder on ``--gpu-decode-threads`` threads (a batch
    holds the JPEGs those threads wait on), falling back to the sandbox as the worker does."""
    sandboxes = SandboxPool.from_settings(Settings())
    decoder = GpuJpegDecoder(encoder.device)
    fallbacks = [0]

    def sandboxed(raw: bytes) -> torch.Tensor:
        image = sandboxes.decode_image(raw, JPEG, WORKER_LIMITS, IMAGE_TIME_LIMIT_S)
        return encoder.preprocess(image)

    def on_device(raw: bytes) -> torch.Tensor:
        decoded = decoder.load(raw, WORKER_LIMITS)
        pixels = encoder.preprocess_tensor(decoded) if decoded is not None else None
        if pixels is None:
            fallbacks[0] += 1
            return sandboxed(raw)
        return pixels

    figures: dict = {"ocr_check": WORKER_LIMITS.ocr_enabled}
    try:
        for name, prepare, threads in (
            ("sandbox_cpu_decode", sandboxed, args.decode_threads),
            ("gpu_decode", on_device, args.gpu_decode_threads),
        ):
            with ThreadPoolExecutor(max_workers=threads) as pool:
                project_pipeline(encoder, jpegs[: batch_size * 2], batch_size, pool, prepare)
                fallbacks[0] = 0

                def run(pool: ThreadPoolExecutor = pool, prepare: Prepare = prepare) -> None:
                    project_pipeline(encoder, jpegs, batch_size, pool, prepare)

                t = min(timed(run, encoder.device) for _ in range(args.repeats))
            figures[f"{name}_img_s"] = round(len(jpegs) / t, 1)
            figures[f"{name}_threads"] = threads
        figures["gpu_decode_fallbacks"] = fallbacks[0]
        figures["decoder_device"] = str(decoder.device)
        figures["ratio_gpu_over_cpu_decode"] = round(
            figures["gpu_decode_img_s"] / figures["sandbox_cpu_decode_img_s"], 2
        )
        sample = jpegs[:64]
        with ThreadPoolExecutor(max_workers=8) as pool:
            cpu_side = encoder.encode_images(list(pool.map(sandboxed, sample)))
            gpu_side = encoder.encode_images(list(pool.map(on_device, sample)))
        figures["min_cosine_gpu_vs_sandbox_decode"] = round(
            float((cpu_side * gpu_side).sum(axis=1).min()), 5
        )
        figures["goal_3000_img_s_met"] = (
            figures["gpu_decode_img_s"] >= 3000 if encoder.device.type == "cuda" else None
        )
    finally:
        sandboxes.close()
    return figures


def durable_ratio(args: argparse.Namespace, model_name: str, checkpoint: Path | None) -> dict:
    """bench/ingest.py's two sides on a JPEG corpus of ``--durable-images`` photo-sized
    files, on this device: the durable IngestBatch (a worker process, --role all) against
    the bare in-process loop, median of ``--repeats`` rounds each; both decode as the
    worker's settings say (on the GPU with a CUDA encoder: MMRAG_GPU_JPEG_DECODE=auto)."""
    import tempfile

    from bench.harness import stack_env
    from bench.ingest import alternate
    from settings import get_settings
    from stack.services import Stack, StackPorts

    device = resolve_device(args.device)
    os.environ.update(
        {
            "MMRAG_CLIP_MODEL": model_name,
            "MMRAG_CLIP_PRETRAINED": "",
            "MMRAG_CLIP_CHECKPOINT": str(checkpoint or ""),
            "MMRAG_DEVICE": str(device),
            "MMRAG_GPU_JPEG_DECODE": "auto",
            "MMRAG_BATCH_SIZE": str(args.durable_batch_size),
            "MMRAG_DECODE_THREADS": str(
                args.gpu_decode_threads if device.type == "cuda" else args.decode_threads
            ),
        }
    )
    with tempfile.TemporaryDirectory(prefix="mmrag-encode-gpu-") as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        for i, raw in enumerate(synthetic_jpegs(args.durable_images, seed=11)):
            (corpus / f"photo-{i:06d}.jpg").write_bytes(raw)
        state = Path(tmp) / "state"
        stack = Stack(state, StackPorts.free())
        try:
            os.environ.update(stack_env(state, stack.up()))
            get_settings.cache_clear()
            bare_ips, durable_ips = alternate(
                state, corpus, args.durable_batch_size, args.durable_images, args.repeats, "jpeg"
            )
        finally:
            stack.down()
    return {
        "images": args.durable_images,
        "batch_size": args.durable_batch_size,
        "bare_img_s": round(bare_ips, 1),
        "durable_img_s": round(durable_ips, 1),
        "ratio": round(durable_ips / bare_ips, 3),
        "goal_ratio_0_9_met": durable_ips / bare_ips >= 0.9 if device.type == "cuda" else None,
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(args: argparse.Namespace, model_name: str, checkpoint: Path | None) -> dict:
    device = resolve_device(args.device)
    encoder = ClipEncoder.load(
        model_name, checkpoint=checkpoint, device=args.device, torch_threads=args.torch_threads
    )
    baseline = fp32_copy(encoder)
    jpegs = synthetic_jpegs(args.images)
    images = [decode_image(raw, MAX_BYTES, MAX_PIXELS) for raw in jpegs]
    pixels = [encoder.preprocess(image) for image in images]  # uint8 when the transform allows
    floats = [encoder.transform(image) for image in images]  # the baseline's float32 tensors
    del images
    figures: dict = {"model": model_name, "device": str(device), "dtype": str(encoder.dtype)}

    # Warm-up both models (kernels, cuDNN/cuBLAS handles, allocator).
    for _ in range(3):
        encoder.encode_images(pixels[: max(args.batch_sizes)])
        baseline_encode_one(baseline, floats[0], device)

    # 1. Model only: one image at a time in fp32 (baseline) vs batched fp16 (project).
    n_b1 = min(len(pixels), args.baseline_images)
    t = timed(lambda: [baseline_encode_one(baseline, p, device) for p in floats[:n_b1]], device)
    figures["model_baseline_fp32_b1_img_s"] = round(n_b1 / t, 1)
    per_batch = {}
    for bs in args.batch_sizes:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t = min(
            timed(
                lambda bs=bs: [
                    encoder.encode_images(pixels[i : i + bs]) for i in range(0, len(pixels), bs)
                ],
                device,
            )
            for _ in range(args.repeats)
        )
        entry = {"img_s": round(len(pixels) / t, 1)}
        if device.type == "cuda":
            entry["peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
        per_batch[str(bs)] = entry
    figures["model_project_by_batch"] = per_batch
    best_bs = max(args.batch_sizes, key=lambda bs: per_batch[str(bs)]["img_s"])
    figures["best_batch_size"] = best_bs

    def fp32_batched() -> None:
        with torch.inference_mode():
            for i in range(0, len(pixels), best_bs):
                baseline.encode_image(torch.stack(floats[i : i + best_bs]).to(device)).cpu()

    t = min(timed(fp32_batched, device) for _ in range(args.repeats))
    figures["model_fp32_batched_img_s"] = round(len(pixels) / t, 1)

    # Agreement of the project's vectors with fp32 ones (cosine; both unit norm).
    sample = min(64, len(pixels))
    fast = encoder.encode_images(pixels[:sample])
    slow = np.concatenate([baseline_encode_one(baseline, p, device) for p in floats[:sample]])
    figures["min_cosine_vs_fp32"] = round(float((fast * slow).sum(axis=1).min()), 5)

    # 2. Whole path: decode + preprocess + encode.
    def baseline_pipeline() -> None:
        for raw in jpegs[:n_b1]:
            image = decode_image(raw, MAX_BYTES, MAX_PIXELS)
            baseline_encode_one(baseline, encoder.transform(image), device)

    t = timed(baseline_pipeline, device)
    figures["pipeline_baseline_img_s"] = round(n_b1 / t, 1)
    with ThreadPoolExecutor(max_workers=args.decode_threads) as pool:
        project_pipeline(encoder, jpegs[: best_bs * 2], best_bs, pool)  # warm the pool
        t = min(
            timed(lambda: project_pipeline(encoder, jpegs, best_bs, pool), device)
            for _ in range(args.repeats)
        )
    figures["pipeline_project_img_s"] = round(len(jpegs) / t, 1)
    figures["decode_threads"] = args.decode_threads
    figures["jpeg_decode"] = jpeg_decode_paths(args, encoder, jpegs, best_bs)

    # 3. One text query, as encode_query runs it (no cache).
    queries = [f"a photo of item number {i} on a table" for i in range(args.queries)]

    def latency(fn: Callable[[str], object]) -> list[float]:
        for q in queries[:5]:
            fn(q)
        return [1000 * timed(lambda q=q: fn(q), device) for q in queries]

    tokenizer = open_clip.get_tokenizer(model_name)

    def baseline_text(q: str) -> None:
        with torch.inference_mode():
            baseline.encode_text(tokenizer([q]).to(device)).cpu()

    slow_ms = latency(baseline_text)
    fast_ms = latency(lambda q: encoder.encode_texts([q]))
    figures["text_query_fp32_ms"] = {
        "p50": round(statistics.median(slow_ms), 2),
        "p99": round(percentile(slow_ms, 0.99), 2),
    }
    figures["text_query_project_ms"] = {
        "p50": round(statistics.median(fast_ms), 2),
        "p99": round(percentile(fast_ms, 0.99), 2),
    }
    figures["ratio_model"] = round(
        per_batch[str(best_bs)]["img_s"] / figures["model_baseline_fp32_b1_img_s"], 2
    )
    figures["ratio_pipeline"] = round(
        figures["pipeline_project_img_s"] / figures["pipeline_baseline_img_s"], 2
    )
    return figures


def report(f: dict) -> None:
    print(f"\n== {f['model']} on {f['device']} ({f['dtype']}) ==")
    print(f"model only, baseline fp32 batch 1     : {f['model_baseline_fp32_b1_img_s']:>9} img/s")
    for bs, entry in f["model_project_by_batch"].items():
        mem = f"  peak {entry['peak_mib']} MiB" if "peak_mib" in entry else ""
        print(f"model only, project batch {bs:>4}        : {entry['img_s']:>9} img/s{mem}")
    print(
        f"model only, fp32 batch {f['best_batch_size']:>4} (no fp16)  : "
        f"{f['model_fp32_batched_img_s']:>9} img/s"
    )
    print(f"decode+encode, baseline (1 thread, b1): {f['pipeline_baseline_img_s']:>9} img/s")
    print(
        f"decode+encode, project ({f['decode_threads']} threads, "
        f"b{f['best_batch_size']}): {f['pipeline_project_img_s']:>9} img/s"
    )
    print(
        f"text query p50/p99 fp32 {f['text_query_fp32_ms']['p50']}/"
        f"{f['text_query_fp32_ms']['p99']} ms, project {f['text_query_project_ms']['p50']}/"
        f"{f['text_query_project_ms']['p99']} ms"
    )
    print(f"min cosine fp16 vs fp32: {f['min_cosine_vs_fp32']}")
    print(f"ratio project/baseline: model {f['ratio_model']}x, pipeline {f['ratio_pipeline']}x")
    j = f["jpeg_decode"]
    print(
        f"JPEG end to end: sandbox CPU decode {j['sandbox_cpu_decode_img_s']} img/s "
        f"({j['sandbox_cpu_decode_threads']} threads), decode on {j['decoder_device']} "
        f"{j['gpu_decode_img_s']} img/s ({j['gpu_decode_threads']} threads, "
        f"{j['gpu_decode_fallbacks']} fallbacks), min cosine "
        f"{j['min_cosine_gpu_vs_sandbox_decode']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--baseline-images", type=int, default=256)
    parser.add_argument("--batch-sizes", default="1,8,32,64,128,256")
    parser.add_argument("--decode-threads", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--torch-threads", type=int, default=0, help="0: the encoder's default, as in workers"
    )
    parser.add_argument("--tiny", action="store_true", help="also run the repo's tiny model")
    parser.add_argument(
        "--gpu-decode-threads",
        type=int,
        default=32,
        help="decode threads with GPU decoding (they wait on the batched decode: a batch "
        "holds at most this many JPEGs); MMRAG_DECODE_THREADS of the durable run on CUDA",
    )
    parser.add_argument(
        "--durable-images",
        type=int,
        default=0,
        help="JPEGs of the durable IngestBatch vs bare loop run (its own stack); 0: skip",
    )
    parser.add_argument("--durable-batch-size", type=int, default=128)
    args = parser.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    torch.manual_seed(0)
    results: dict[str, Any] = {"host": platform.node(), "torch": torch.__version__}
    if torch.cuda.is_available():
        results["gpu"] = torch.cuda.get_device_name(0)
    runs: list[tuple[str, Path | None]] = [(args.model, None)]
    if args.tiny:
        runs.append((TINY_MODEL_NAME, TINY_CHECKPOINT_PATH))
    for name, checkpoint in runs:
        figures = measure(args, name, checkpoint)
        report(figures)
        results[name] = figures
    if args.durable_images:
        results["durable_vs_bare"] = durable_ratio(args, args.model, None)
        print(f"durable IngestBatch / bare loop: {results['durable_vs_bare']}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
