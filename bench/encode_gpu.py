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
- the ratio project / baseline, then one line of JSON with every figure.

Usage (random ViT-B-32 weights are fine for speed)::

    .venv/bin/python bench/encode_gpu.py [--model ViT-B-32] [--images 1024]
        [--batch-sizes 1,8,32,64,128,256] [--decode-threads 8] [--tiny] [--device auto]

On a CPU-only machine it runs too (fp32 both sides), which is how it is checked here; the
figures that matter come from a CUDA device.
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
from activities.media.formats import MediaLimits  # noqa: E402
from activities.media.images import decode_image
from settings import Settings  # noqa: E402

LIMITS = MediaLimits.from_settings(Settings())
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
    encoder: ClipEncoder, jpegs: list[bytes], batch_size: int, pool: ThreadPoolExecutor
) -> np.ndarray:
    """Decode on the pool one batch ahead of the model, as the encode activity does
    (including its draft-mode JPEG shrink to ``render_max_side`` while decoding)."""

    def prepare(raw: bytes) -> torch.Tensor:
        image = decode_image(raw, MAX_BYTES, MAX_PIXELS, "", LIMITS.render_max_side)
        return encoder.preprocess(image)

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
    args = parser.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    torch.manual_seed(0)
    results = {"host": platform.node(), "torch": torch.__version__}
    if torch.cuda.is_available():
        results["gpu"] = torch.cuda.get_device_name(0)
    runs = [(args.model, None)]
    if args.tiny:
        runs.append((TINY_MODEL_NAME, TINY_CHECKPOINT_PATH))
    for name, checkpoint in runs:
        figures = measure(args, name, checkpoint)
        report(figures)
        results[name] = figures
    print(json.dumps(results))


if __name__ == "__main__":
    main()
