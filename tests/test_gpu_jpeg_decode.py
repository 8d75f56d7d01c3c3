"""GPU JPEG decoding (activities/media/jpeg_gpu.py): what a GPU encode worker relies on.

The decoder is torchvision's batched ``decode_jpeg``; on a CUDA worker it runs nvJPEG, here
the same function with device "cpu" (libjpeg), which exercises every step the worker runs
except the device itself: the header walk that decides what the GPU may decode, the batched
call and its per-file isolation, orientation, the shrink, the encoder's tensor
preprocessing, and the fallback to the decoder sandbox for everything else. The vectors must
be the sandbox path's: an index built with GPU decoding answers like one built without.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from activities.clip.encoder import (
    TINY_CHECKPOINT_PATH,
    TINY_MODEL_NAME,
    ClipEncoder,
    tiny_encoder,
)
from activities.media.formats import JPEG, BadMediaError, MediaLimits
from activities.media.jpeg_gpu import GpuJpegDecoder, decoder_for, plain_jpeg_header
from activities.media.ocr import text_likely
from activities.media.sandbox import SandboxPool
from settings import Settings
from tests.fixtures.hostile.make_corpus import jpeg_bomb
from tests.helpers import png_bytes
from tests.test_sandbox import many_scan_jpeg

LIMITS = MediaLimits.from_settings(Settings())
NO_OCR = dataclasses.replace(LIMITS, ocr_enabled=False)
TIME_LIMIT_S = 20.0


@pytest.fixture(scope="module")
def sandboxes() -> Iterator[SandboxPool]:
    """The worker's decoder children: the path every image took before, and takes still
    when the GPU path hands it back."""
    pool = SandboxPool.from_settings(Settings())
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def encoder() -> ClipEncoder:
    return tiny_encoder()


def photo(width: int, height: int, seed: int = 7, exif: Image.Exif | None = None, **save) -> bytes:  # type: ignore[no-untyped-def]
    """A photo-like JPEG (smooth colour fields; noise would not look like a photo)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 255, size=(6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=88, exif=exif.tobytes() if exif else b"", **save)
    return buf.getvalue()


def rotated(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return photo(800, 600, seed=orientation, exif=exif)


def grey_photo() -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(photo(640, 480, seed=3))).convert("L").save(buf, "JPEG")
    return buf.getvalue()


def cmyk_photo() -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(photo(320, 240, seed=4))).convert("CMYK").save(buf, "JPEG")
    return buf.getvalue()


def corrupt_scan(data: bytes) -> bytes:
    """A JPEG whose headers are intact and whose first scan names a component the frame
    does not have: only a decoder finds out."""
    out = bytearray(data)
    sos = out.index(b"\xff\xda")
    out[sos + 5] = 9
    return bytes(out)


def slide() -> bytes:
    """A JPEG that shows text: with OCR on, it must reach the sandbox, which reads it."""
    image = Image.new("RGB", (640, 400), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=20)
    for row in range(8):
        draw.text((20, 20 + 28 * row), "Quarterly revenue grew 12%", fill=0, font=font)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=92)
    return buf.getvalue()


def vector(encoder: ClipEncoder, pixels: torch.Tensor) -> np.ndarray:
    return encoder.encode_images([pixels])[0]


@pytest.mark.parametrize(
    "data",
    [
        photo(640, 480),
        photo(1280, 720, seed=8),
        photo(2000, 1500, seed=9),  # shrunk to MMRAG_RENDER_MAX_SIDE before the encoder
        photo(300, 200, seed=10),
        photo(1024, 768, seed=11, progressive=True),
        grey_photo(),
        *(rotated(o) for o in (3, 6, 8)),  # phones write 6 and 8
    ],
    ids=["640", "1280x720", "2000", "300", "progressive", "grey", "exif3", "exif6", "exif8"],
)
def test_a_gpu_decoded_jpeg_gets_the_vector_the_sandbox_path_gives(
    data: bytes, encoder: ClipEncoder, sandboxes: SandboxPool
) -> None:
    sandboxed = sandboxes.decode_image(data, JPEG, NO_OCR, TIME_LIMIT_S)
    expected = vector(encoder, encoder.preprocess(sandboxed))

    decoded = GpuJpegDecoder("cpu").load(data, NO_OCR)
    assert decoded is not None, "a plain JPEG within the limits is decoded by the GPU path"
    assert tuple(decoded.shape[1:]) == (sandboxed.height, sandboxed.width)  # upright, fitted
    pixels = encoder.preprocess_tensor(decoded)
    assert pixels is not None and pixels.dtype == torch.uint8
    assert float((vector(encoder, pixels) * expected).sum()) > 0.999


def test_one_corrupt_jpeg_in_a_batch_falls_back_alone(sandboxes: SandboxPool) -> None:
    good, other = photo(320, 240, seed=1), photo(320, 240, seed=2)
    bad = corrupt_scan(good)
    assert plain_jpeg_header(bad, LIMITS.max_object_bytes, LIMITS.max_image_pixels)

    decoder = GpuJpegDecoder("cpu")
    results = decoder.decode_many([good, bad, other])
    assert [r is not None for r in results] == [True, False, True]
    assert decoder.load(bad, NO_OCR) is None  # the worker then asks the sandbox, which says why
    with pytest.raises(BadMediaError, match="corrupt or truncated image"):
        sandboxes.decode_image(bad, JPEG, NO_OCR, TIME_LIMIT_S)


def test_a_truncated_jpeg_never_reaches_the_gpu_decoder(sandboxes: SandboxPool) -> None:
    data = photo(640, 480)
    truncated = data[: len(data) // 2]
    assert plain_jpeg_header(truncated, LIMITS.max_object_bytes, LIMITS.max_image_pixels) is None
    assert GpuJpegDecoder("cpu").load(truncated, NO_OCR) is None
    with pytest.raises(BadMediaError, match="corrupt or truncated image"):
        sandboxes.decode_image(truncated, JPEG, NO_OCR, TIME_LIMIT_S)


def test_a_jpeg_bomb_is_refused_from_its_header_not_decoded(sandboxes: SandboxPool) -> None:
    bomb = jpeg_bomb()  # 700 bytes declaring 65500 x 65500 pixels
    assert plain_jpeg_header(bomb, LIMITS.max_object_bytes, LIMITS.max_image_pixels) is None
    assert GpuJpegDecoder("cpu").load(bomb, NO_OCR) is None
    with pytest.raises(BadMediaError, match="MMRAG_MAX_IMAGE_PIXELS"):
        sandboxes.decode_image(bomb, JPEG, NO_OCR, TIME_LIMIT_S)


def test_a_scan_bomb_stays_in_the_sandbox_where_its_time_limit_holds() -> None:
    """1,500 repeated scans decoded for 27 s in-process; the GPU path has no time limit."""
    bomb = many_scan_jpeg(side=256, scans=200)
    assert plain_jpeg_header(bomb, LIMITS.max_object_bytes, LIMITS.max_image_pixels) is None
    assert GpuJpegDecoder("cpu").load(bomb, NO_OCR) is None


def test_jpegs_the_gpu_decoder_does_not_take_go_to_the_sandbox() -> None:
    cmyk = cmyk_photo()
    assert plain_jpeg_header(cmyk, LIMITS.max_object_bytes, LIMITS.max_image_pixels) is None
    png = io.BytesIO()
    Image.new("RGB", (32, 32)).save(png, "PNG")
    assert plain_jpeg_header(png.getvalue(), LIMITS.max_object_bytes, 10**9) is None
    big = photo(640, 480)
    assert plain_jpeg_header(big, len(big) - 1, LIMITS.max_image_pixels) is None  # bytes limit


def test_with_ocr_on_a_jpeg_that_shows_text_is_read_in_the_sandbox(
    sandboxes: SandboxPool,
) -> None:
    # The sandbox's own check (on the picture it would hand the encoder) sees text in it.
    assert text_likely(sandboxes.decode_image(slide(), JPEG, NO_OCR, TIME_LIMIT_S))
    decoder = GpuJpegDecoder("cpu")
    assert decoder.load(slide(), NO_OCR) is not None
    assert decoder.load(slide(), LIMITS) is None  # the sandbox decodes it and runs OCR
    assert decoder.load(photo(640, 480), LIMITS) is not None  # no text: stays on the GPU


def test_the_setting_turns_gpu_decoding_on_only_with_a_cuda_encoder() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert decoder_for("auto", cpu) is None
    assert decoder_for("off", cuda) is None
    auto = decoder_for("auto", cuda)  # built lazily: no CUDA call until the first decode
    assert auto is not None and auto.device == cuda
    with pytest.raises(ValueError, match="MMRAG_GPU_JPEG_DECODE=on needs the encoder on a CUDA"):
        decoder_for("on", cpu)
    with pytest.raises(ValueError, match="gpu_jpeg_decode"):
        Settings(gpu_jpeg_decode="sometimes")  # type: ignore[arg-type]


def test_many_threads_share_batched_decodes() -> None:
    from concurrent.futures import ThreadPoolExecutor

    decoder = GpuJpegDecoder("cpu", max_batch=8)
    datas = [photo(320, 240, seed=i) for i in range(24)] + [corrupt_scan(photo(320, 240))]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda d: decoder.load(d, NO_OCR), datas))
    assert all(r is not None and r.shape == (3, 240, 320) for r in results[:-1])
    assert results[-1] is None


def test_the_encode_worker_takes_gpu_decoded_jpegs_and_fails_bad_ones_with_the_usual_reasons(
    tmp_path: Path, encoder: ClipEncoder
) -> None:
    """The encode activity's image phase with the decoder on the CPU device (a CUDA worker
    builds it from MMRAG_GPU_JPEG_DECODE): plain JPEGs come back as the encoder's tensors,
    everything else goes through the sandbox: a PNG is decoded there, a corrupt JPEG and a
    JPEG bomb fail alone with the reasons they always had."""
    from activities.encode_batch import BatchEncodeActivities
    from activities.store.objects import LocalStore
    from activities.store.roots import TenantRoots, canonical_root
    from workflows.contracts import asset_id_for

    files = {
        "photo.jpg": photo(1280, 720),
        "corrupt.jpg": corrupt_scan(photo(320, 240)),
        "bomb.jpg": jpeg_bomb(),
        "shape.png": png_bytes(),
    }
    roots = TenantRoots("t", (canonical_root(str(tmp_path)),))
    refs = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        ref = LocalStore(roots).stat((tmp_path / name).as_uri())
        ref.asset_id = asset_id_for("t", ref.uri)
        ref.media_type = "image/png" if name.endswith(".png") else JPEG
        refs.append(ref)
    settings = Settings(
        clip_model=TINY_MODEL_NAME,
        clip_pretrained="",
        clip_checkpoint=str(TINY_CHECKPOINT_PATH),
        device="cpu",
        state_dir=tmp_path / "state",
    )
    batch = BatchEncodeActivities(settings)
    assert batch.gpu_jpegs is None  # auto on a CPU encoder: every image takes the sandbox
    decoded_here: list[bool] = []

    class Counting(GpuJpegDecoder):
        def load(self, data: bytes, limits: MediaLimits) -> torch.Tensor | None:
            image = super().load(data, limits)
            decoded_here.append(image is not None)
            return image

    batch.gpu_jpegs = Counting("cpu")

    def beat() -> None:
        pass

    try:
        failures: dict[str, Any] = {}
        got, pixels = next(batch._decoded_micro_batches(refs, 8, failures, [encoder], roots, beat))
        sandboxed = batch.sandboxes.decode_image(files["photo.jpg"], JPEG, NO_OCR, TIME_LIMIT_S)
    finally:
        batch.close()
    # The three JPEGs were offered to the GPU decoder; it decoded the photo only.
    assert sorted(decoded_here) == [False, False, True]
    names = [ref.uri.rsplit("/", 1)[1] for ref in got]
    assert names == ["photo.jpg", "shape.png"]
    (gpu_pixels, chunk), _ = pixels
    assert gpu_pixels[0].dtype == torch.uint8 and chunk.locator == "image" and chunk.image is None
    expected = vector(encoder, encoder.preprocess(sandboxed))
    assert float((vector(encoder, gpu_pixels[0]) * expected).sum()) > 0.999
    reasons = {ref.uri.rsplit("/", 1)[1]: failures[ref.asset_id].reason for ref in refs[1:3]}
    assert "corrupt or truncated image" in reasons["corrupt.jpg"]
    assert "MMRAG_MAX_IMAGE_PIXELS" in reasons["bomb.jpg"]
