"""OCR: what it reads and what it costs ingest, OCR off against OCR on in the same run.

A generated corpus like the one in issue 15: scanned pages (image-only PDFs), slides and
screenshots, signs in photos, photos without text, PDF pages with a text layer, a video
whose frames carry a subtitle. Every item's words are known, so word recall is measured.

Ingest cost is measured through the product code an encode worker runs for each file:
the decoder sandbox (``DecoderSandbox.stream`` / ``decode_image_chunk``, OCR included) and
the CLIP forward pass over the chunks it yields (the shipped tiny model, or ``--model``),
with ``MMRAG_OCR_ENABLED`` off and on, alternating per round. The Milvus and Postgres
writes are left out: they do not depend on OCR beyond a page's passage count.

``--engines`` also compares Tesseract (what mmrag runs) with ``rapidocr-onnxruntime``
(when importable: ``pip install rapidocr-onnxruntime==1.4.4``) on the same pictures.

    .venv/bin/python bench/ocr.py [--per-kind 4] [--rounds 2] [--engines]

The last line of output is one line of JSON with the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter, ImageFont  # noqa: E402

from activities.media.formats import MP4, PDF, PNG, MediaLimits  # noqa: E402
from activities.media.ocr import recognise  # noqa: E402
from activities.media.sandbox import DecoderSandbox  # noqa: E402
from starters.synthetic_corpus import PdfPage, pdf_bytes  # noqa: E402

_WORD_LIST = (
    "invoice shipment valve turbine pressure warranty customer battery module sensor "
    "calibration firmware quarterly revenue forecast harbour bridge station platform exit "
    "north south museum gallery opening hours closed monday friday delivery account balance "
    "transfer meeting agenda review budget approval project milestone deadline contract "
    "supplier quality safety helmet required entrance parking"
)
WORDS = _WORD_LIST.split()


def font(size: int, bold: bool = False) -> Any:
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    try:
        return ImageFont.truetype(f"/usr/share/fonts/truetype/dejavu/{name}", size)
    except OSError:
        return ImageFont.load_default(size=size)


def part(rng: random.Random) -> str:
    letters = "ABCDEFGHKMNPRSTXZ"
    return f"{rng.choice(letters)}{rng.choice(letters)}-{rng.randint(1000, 9999)}"


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def scanned_page(rng: random.Random) -> tuple[Image.Image, str]:
    img = Image.new("L", (1240, 1754), 245)
    draw = ImageDraw.Draw(img)
    lines = []
    for i in range(18):
        line = sentence(rng, 6) + " " + part(rng)
        draw.text((110, 120 + 44 * i), line, fill=rng.randint(10, 60), font=font(26))
        lines.append(line)
    img = img.rotate(rng.uniform(-1.2, 1.2), fillcolor=245, resample=Image.Resampling.BICUBIC)
    img = Image.blend(img, Image.effect_noise(img.size, 18), 0.12)
    return img.filter(ImageFilter.GaussianBlur(0.6)).convert("RGB"), " ".join(lines)


def slide(rng: random.Random) -> tuple[Image.Image, str]:
    img = Image.new("RGB", (1280, 720), (rng.randint(20, 60), rng.randint(40, 90), 120))
    draw = ImageDraw.Draw(img)
    title = sentence(rng, 3).title()
    draw.text((80, 60), title, fill="white", font=font(60, True))
    lines = [title]
    for i in range(5):
        line = sentence(rng, 4) + " " + part(rng)
        draw.text((110, 200 + 80 * i), "- " + line, fill=(230, 230, 230), font=font(34))
        lines.append(line)
    return img, " ".join(lines)


def screenshot(rng: random.Random) -> tuple[Image.Image, str]:
    img = Image.new("RGB", (1280, 800), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, 1280, 40), fill=(60, 60, 70))
    draw.rectangle((0, 40, 220, 800), fill=(235, 235, 240))
    lines = []
    for i in range(8):
        word = rng.choice(WORDS).title()
        draw.text((20, 60 + 40 * i), word, fill=(40, 40, 40), font=font(16))
        lines.append(word)
    for i in range(14):
        line = sentence(rng, 7) + " " + part(rng)
        draw.text((250, 70 + 30 * i), line, fill=(20, 20, 20), font=font(16))
        lines.append(line)
    return img, " ".join(lines)


def sign_photo(rng: random.Random) -> tuple[Image.Image, str]:
    w, h = 1600, 1200
    base = Image.effect_noise((w // 8, h // 8), 60).resize((w, h), Image.Resampling.BICUBIC)
    img = Image.merge(
        "RGB", [base.point(lambda v, k=k: min(255, int(v * k))) for k in (0.8, 1.0, 0.7)]
    )
    colour = rng.choice([(10, 90, 40), (20, 50, 140), (200, 200, 30)])
    sign = Image.new("RGB", (720, 300), colour)
    ink = "black" if colour[0] > 150 else "white"
    first, second = sentence(rng, 2).upper(), part(rng)
    draw = ImageDraw.Draw(sign)
    draw.text((40, 40), first, fill=ink, font=font(72, True))
    draw.text((40, 170), second, fill=ink, font=font(72, True))
    sign = sign.rotate(rng.uniform(-8, 8), expand=True, fillcolor=(90, 90, 90))
    img.paste(sign, (rng.randint(50, w - sign.width - 50), rng.randint(50, h - sign.height - 50)))
    return img.filter(ImageFilter.GaussianBlur(0.8)), first + " " + second


def photo_without_text(rng: random.Random) -> tuple[Image.Image, str]:
    w, h = 1024, 768
    base = Image.effect_noise((w // 16, h // 16), 70).resize((w, h), Image.Resampling.BICUBIC)
    tint = [base.point(lambda v, k=k: min(255, int(v * k))) for k in (1.0, 0.8, 0.6)]
    img = Image.merge("RGB", tint)
    ImageDraw.Draw(img).ellipse((300, 200, 700, 600), fill=(rng.randint(100, 255), 40, 40))
    return img, ""


def video_frame(rng: random.Random) -> tuple[Image.Image, str]:
    img = Image.new("RGB", (640, 360))
    draw = ImageDraw.Draw(img)
    for y in range(0, 280, 12):
        draw.rectangle((0, y, 640, y + 12), fill=(rng.randint(0, 255), rng.randint(0, 180), 90))
    draw.rectangle((0, 280, 640, 340), fill=(0, 0, 0))
    text = sentence(rng, 4) + " " + part(rng)
    draw.text((20, 292), text, fill="white", font=font(26))
    return img, text


PICTURES = {
    "scanned page": scanned_page,
    "slide": slide,
    "screenshot": screenshot,
    "sign in photo": sign_photo,
    "photo without text": photo_without_text,
    "video frame": video_frame,
}


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:-[0-9]+)?", text.lower())


def recall(truth: str, got: str) -> float | None:
    expected = words(truth)
    found = set(words(got))
    return sum(w in found for w in expected) / len(expected) if expected else None


@dataclasses.dataclass
class Item:
    kind: str
    data: bytes
    mime: str
    truth: str
    pages: int = 1
    path: str = ""


def corpus(per_kind: int, seed: int, folder: Path) -> list[Item]:
    """The files an ingest would see, each with its words."""
    rng = random.Random(seed)
    items = []
    for kind, make in PICTURES.items():
        for i in range(per_kind):
            image, truth = make(rng)
            buf = io.BytesIO()
            if kind == "scanned page":  # a scanner's output: an image-only PDF
                image.save(buf, "PDF", resolution=150.0)
                items.append(Item(kind, buf.getvalue(), PDF, truth))
            elif kind == "video frame":  # a 2-second video showing the frame
                path = folder / f"frame-{i}.mp4"
                write_still_video(path, image)
                items.append(Item(kind, b"", MP4, truth, path=str(path)))
            else:
                image.save(buf, "PNG")
                items.append(Item(kind, buf.getvalue(), PNG, truth))
    pages = [PdfPage([sentence(rng, 10) + " " + part(rng) for _ in range(30)], font_size=11)]
    for _ in range(per_kind):
        truth = " ".join(pages[0].lines)
        items.append(Item("PDF page with text layer", pdf_bytes(pages), PDF, truth))
    return items


def write_still_video(path: Path, frame: Image.Image) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=5)
        stream.width, stream.height, stream.pix_fmt = frame.width, frame.height, "yuv420p"
        for _ in range(10):
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def ingest_one(box: DecoderSandbox, encoder: Any, item: Item, limits: MediaLimits) -> str:
    """What an encode worker does with one file: decode (and OCR) in the sandbox, then CLIP
    over its chunks. Returns the words the chunks carry."""
    if item.mime == PNG:
        chunk = box.decode_image_chunk(item.data, PNG, limits, 20)
        chunks = [chunk]
    else:
        source = item.data or item.path
        chunks = [c for s in box.stream(source, item.mime, limits, None, 120) for c in s.chunks]
    images = [encoder.preprocess(c.image) for c in chunks if c.image is not None]
    texts = [c.text for c in chunks if c.image is None and c.text]
    if images:
        encoder.encode_images(images)
    if texts:
        encoder.encode_texts(texts)
    return " ".join(c.snippet for c in chunks)


def measure(items: list[Item], rounds: int, model: str) -> dict[str, Any]:
    from activities.clip.encoder import get_encoder, tiny_encoder

    encoder = tiny_encoder(torch_threads=1) if model == "mmrag-tiny" else get_encoder(model)
    box = DecoderSandbox(memory_mb=2048, time_limit_s=120)
    on = MediaLimits()
    off = dataclasses.replace(on, ocr_enabled=False)
    seconds: dict[str, dict[str, list[float]]] = {}
    recalls: dict[str, list[float]] = {}
    runs = []
    try:
        ingest_one(box, encoder, items[0], off)  # warm the child and the model
        for r in range(rounds):
            totals = {"off": 0.0, "on": 0.0}
            for mode, limits in (
                (("off", off), ("on", on)) if r % 2 == 0 else (("on", on), ("off", off))
            ):
                for item in items:
                    started = time.perf_counter()
                    text = ingest_one(box, encoder, item, limits)
                    took = time.perf_counter() - started
                    totals[mode] += took
                    seconds.setdefault(item.kind, {"off": [], "on": []})[mode].append(took)
                    got = recall(item.truth, text) if mode == "on" else None
                    if got is not None:
                        recalls.setdefault(item.kind, []).append(got)
            runs.append({k: round(v, 2) for k, v in totals.items()})
            print(f"round {r + 1}: OCR off {totals['off']:.1f} s, on {totals['on']:.1f} s")
    finally:
        box.kill()
    kinds = {
        kind: {
            "s_per_file_ocr_off": round(statistics.median(v["off"]), 3),
            "s_per_file_ocr_on": round(statistics.median(v["on"]), 3),
            "word_recall_ocr_on": round(statistics.mean(recalls[kind]), 3)
            if recalls.get(kind)
            else None,
        }
        for kind, v in seconds.items()
    }
    return {"model": model, "files": len(items), "rounds": runs, "kinds": kinds}


def engines(items: list[Item]) -> dict[str, Any]:
    """Tesseract (as mmrag runs it) against RapidOCR on the same rendered pictures."""
    pictures = []
    rng = random.Random(7)
    for kind, make in PICTURES.items():
        for _ in range(max(1, len([i for i in items if i.kind == kind]))):
            pictures.append((kind, *make(rng)))
    readers: dict[str, Any] = {"tesseract": lambda img: recognise(img, "eng", 60)}
    try:
        from rapidocr_onnxruntime import RapidOCR  # type: ignore[import-not-found]

        rapid = RapidOCR()
        readers["rapidocr"] = lambda img: " ".join(r[1] for r in (rapid(np.asarray(img))[0] or []))
    except ImportError:
        print("rapidocr-onnxruntime not installed: comparing Tesseract alone")
    out: dict[str, Any] = {}
    for name, read in readers.items():
        per: dict[str, dict[str, list[float]]] = {}
        for kind, image, truth in pictures:
            started = time.perf_counter()
            text = read(image)
            took = time.perf_counter() - started
            got = recall(truth, text)
            entry = per.setdefault(kind, {"recall": [], "s": []})
            entry["s"].append(took)
            if got is not None:
                entry["recall"].append(got)
        out[name] = {
            kind: {
                "word_recall": round(statistics.mean(v["recall"]), 3) if v["recall"] else None,
                "s_per_image": round(statistics.mean(v["s"]), 2),
            }
            for kind, v in per.items()
        }
        print(name, json.dumps(out[name]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-kind", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="mmrag-tiny")
    parser.add_argument("--engines", action="store_true")
    parser.add_argument("--seed", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mmrag-bench-ocr-") as tmp:
        items = corpus(args.per_kind, args.seed, Path(tmp))
        figures = measure(items, args.rounds, args.model)
        if args.engines:
            figures["engines"] = engines(items)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
