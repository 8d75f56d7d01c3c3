"""A deterministic synthetic image-caption corpus: coloured shapes on pale backgrounds.

Why: the demo, the tests and the tiny CLIP fixture need images whose captions are *true*
without a network, a dataset download or a pretrained model. A coloured shape is the
smallest picture a text query can describe unambiguously ("a red circle"), so retrieval
quality on it can be measured exactly. Everything is drawn from one seeded
``random.Random``, so the same seed gives byte-identical files on every machine.

Run as a script to write a corpus: ``python -m starters.synthetic_corpus DIR --per-class 5``.
"""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, ImageDraw

# Base RGB per colour name; each image jitters it slightly so no two pixels sets are equal.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 170, 40),
    "blue": (35, 70, 225),
    "yellow": (240, 215, 25),
    "purple": (140, 45, 185),
    "orange": (245, 135, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# (colour, shape) pairs in a fixed order: the class index used by training and tests.
CLASSES: list[tuple[str, str]] = [(c, s) for c in COLOURS for s in SHAPES]

FORMATS: dict[str, str] = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}

_SUPERSAMPLE = 4  # draw large then downsample: smooth edges like a real photo's


def caption_for(colour: str, shape: str) -> str:
    """The one true caption of a class; queries and the fixture model both use this form."""
    if colour not in COLOURS or shape not in SHAPES:
        raise ValueError(
            f"unknown class ({colour!r}, {shape!r}); colours: {sorted(COLOURS)}, "
            f"shapes: {list(SHAPES)}"
        )
    return f"a {colour} {shape} on a white background"


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    r, g, b = (min(255, max(0, v + rng.randint(-amount, amount))) for v in rgb)
    return (r, g, b)


def render(colour: str, shape: str, rng: random.Random, size: int = 64) -> Image.Image:
    """Draw one RGB ``size`` x ``size`` image of the class.

    Position, size, a small rotation of the triangle, the exact shade and a near-white
    background are drawn from ``rng`` so that a model must learn colour and shape, not
    memorise pixels. The shape always lies wholly inside the frame (so centre-cropping
    preprocessors cannot cut it off) and covers enough pixels to be recognisable at 64 px.
    """
    if colour not in COLOURS or shape not in SHAPES:
        raise ValueError(
            f"unknown class ({colour!r}, {shape!r}); colours: {sorted(COLOURS)}, "
            f"shapes: {list(SHAPES)}"
        )
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    big = size * _SUPERSAMPLE
    background = _jitter((246, 246, 246), rng, 9)
    fill = _jitter(COLOURS[colour], rng, 18)
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)

    extent = rng.uniform(0.35, 0.65) * big  # bounding-box side of the shape
    margin = 0.08 * big  # room for the triangle's tilt
    x0 = rng.uniform(margin, big - margin - extent)
    y0 = rng.uniform(margin, big - margin - extent)
    box = (x0, y0, x0 + extent, y0 + extent)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:  # triangle: an isosceles triangle, apex up, tilted a little
        cx, cy = x0 + extent / 2, y0 + extent / 2
        points = [(cx, y0), (x0 + extent, y0 + extent), (x0, y0 + extent)]
        tilt = rng.uniform(-0.25, 0.25)  # radians
        cos_t, sin_t = math.cos(tilt), math.sin(tilt)
        rotated = [
            (cx + (px - cx) * cos_t - (py - cy) * sin_t, cy + (px - cx) * sin_t + (py - cy) * cos_t)
            for px, py in points
        ]
        draw.polygon(rotated, fill=fill)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def iter_samples(
    per_class: int, seed: int, size: int = 64
) -> Iterator[tuple[str, str, Image.Image]]:
    """Yield ``(colour, shape, image)`` for ``per_class`` images of every class, in order.

    One ``random.Random(seed)`` feeds every image in a fixed order, so a seed names a corpus:
    training and held-out evaluation differ only by seed.
    """
    rng = random.Random(seed)
    for _ in range(per_class):
        for colour, shape in CLASSES:
            yield colour, shape, render(colour, shape, rng, size)


def write_corpus(
    directory: Path, per_class: int, seed: int, size: int = 64, fmt: str = "png"
) -> list[tuple[Path, str]]:
    """Write ``per_class`` images of each class to ``directory`` and return (path, caption).

    Files are named ``<colour>-<shape>-<NNN>.<fmt>`` so a file's class can be read from its
    name alone (tests check retrieval results by file name).
    """
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise ValueError(f"unsupported image format {fmt!r}; use one of {sorted(FORMATS)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    counters: dict[tuple[str, str], int] = {}
    written: list[tuple[Path, str]] = []
    for colour, shape, image in iter_samples(per_class, seed, size):
        number = counters.get((colour, shape), 0)
        counters[(colour, shape)] = number + 1
        path = directory / f"{colour}-{shape}-{number:03d}.{fmt}"
        image.save(path, format=FORMATS[fmt])
        written.append((path, caption_for(colour, shape)))
    written.sort(key=lambda item: item[0].name)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--per-class", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--format", default="png", choices=sorted(FORMATS))
    args = parser.parse_args(argv)
    pairs = write_corpus(args.directory, args.per_class, args.seed, args.size, args.format)
    print(f"wrote {len(pairs)} images to {args.directory}")


if __name__ == "__main__":
    main()
