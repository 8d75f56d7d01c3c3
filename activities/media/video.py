"""Video keyframes as chunks (PyAV): at an interval and on scene changes, capped per video.

Why not every frame: neighbouring frames carry almost the same picture, and the encoder is
the expensive part. A frame is kept when

- it is the first frame, or ``video_frame_interval_s`` has passed since the last kept one
  (the interval is stretched to ``duration / video_max_frames`` so that the cap covers the
  whole video instead of its first minutes), or
- the picture changed: the joint colour histogram of a 32x32 thumbnail, probed every
  ``PROBE_GAP_S``, moved by at least ``video_scene_threshold`` (0..1: the share of the
  picture whose colour changed) since the previous probe, and at least
  ``MIN_SCENE_GAP_S`` passed since the last kept frame (so flicker cannot flood the index).

Each kept frame becomes chunk ``frame:<seconds, 3 decimals>``, rendered at most
``render_max_side`` pixels on its longer side and padded to a square (CLIP centre-crops).
A kept frame that shows text (``ocr.text_likely``) is read by OCR at up to ``ocr_max_side``
pixels within the video's OCR budget; the words are the chunk's snippet.

Resuming: every step's cursor holds the kept frame's time and the detector's state; given
it, decoding seeks to the keyframe before that time, skips what was already seen and
makes the same decisions as an uninterrupted run.

Bounds, checked before decoding: the demuxer is fixed to the sniffed container family
(no probing into playlists or other formats), frame size (``max_image_pixels``),
declared duration (``video_max_seconds``, also enforced while decoding), and the frame cap.
A corrupt packet fails the video precisely; the time and memory a decode may take are
bounded by the decoder sandbox that runs this module in the worker.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from activities.media.formats import (
    AVI,
    MATROSKA,
    MP4,
    OCR,
    QUICKTIME,
    WEBM,
    BadMediaError,
    MediaChunk,
    MediaInput,
    MediaLimits,
    Step,
    finite_positive,
)
from activities.media.images import fit_within, pad_square
from activities.media.ocr import OcrBudget, budget_for, read_if_text

PROBE_GAP_S = 0.1  # scene-change probes: at most 10 per second of video
MIN_SCENE_GAP_S = 0.5  # a scene change closer than this to the last kept frame is ignored
_HIST_SIDE = 32
_BLACK = (0, 0, 0)

# FFmpeg demuxer per sniffed type: only this demuxer may read the bytes.
_DEMUXERS = {MP4: "mov", QUICKTIME: "mov", WEBM: "matroska", MATROSKA: "matroska", AVI: "avi"}
_REMUX_HINT = "re-encode it (e.g. `ffmpeg -i in -c:v libx264 out.mp4`) and ingest the copy"


@dataclass
class _Detector:
    """The keyframe decision state; its fields are exactly what a cursor stores."""

    last_kept: float | None = None
    last_probe: float | None = None
    hist: list[float] | None = None
    kept: int = 0

    @classmethod
    def from_cursor(cls, cursor: dict[str, Any]) -> _Detector:
        t = cursor.get("t")
        hist = cursor.get("hist")
        return cls(
            last_kept=float(t) if t is not None else None,
            last_probe=float(t) if t is not None else None,
            hist=[float(v) for v in hist] if isinstance(hist, list) else None,
            kept=int(cursor.get("kept", 0)),
        )

    def cursor(self) -> dict[str, Any]:
        return {"t": self.last_kept, "hist": self.hist, "kept": self.kept}


def iter_video(
    source: MediaInput, mime: str, limits: MediaLimits, cursor: dict[str, Any]
) -> Iterator[Step]:
    """One step per kept frame, resuming after ``cursor`` (an earlier step's cursor)."""
    import av

    demuxer = _DEMUXERS.get(mime)
    if demuxer is None:
        raise BadMediaError(f"not a video type: {mime}")
    file: Any = io.BytesIO(source) if isinstance(source, bytes) else str(Path(source))
    try:
        container = av.open(file, format=demuxer, metadata_errors="ignore")
    except av.error.FFmpegError as e:
        raise BadMediaError(
            f"corrupt or truncated video: the {mime} container cannot be opened ({e}); "
            "re-upload it or " + _REMUX_HINT
        ) from e
    budget = budget_for(limits, float(cursor.get("ocr_s") or 0.0))
    try:
        yield from _keyframes(container, mime, limits, _Detector.from_cursor(cursor), budget)
    finally:
        container.close()


def _keyframes(
    container: Any, mime: str, limits: MediaLimits, state: _Detector, budget: OcrBudget
) -> Iterator[Step]:
    import av

    if not container.streams.video:
        raise BadMediaError(
            f"no video stream: this {mime} file holds only audio or data; audio is not indexed"
        )
    stream = container.streams.video[0]
    width, height = stream.codec_context.width or 0, stream.codec_context.height or 0
    _check_size(width, height, limits)
    duration = _duration(container, stream)
    if duration and duration > limits.video_max_seconds:
        raise BadMediaError(
            f"video too long: it lasts {duration:.0f} s, the limit is "
            f"{limits.video_max_seconds:.0f} s (MMRAG_VIDEO_MAX_SECONDS); split it or raise "
            "the limit"
        )
    interval = max(limits.video_frame_interval_s, 1e-3)
    if duration:
        interval = max(interval, duration / max(1, limits.video_max_frames))
    stream.thread_type = "AUTO"
    resume_after = state.last_kept
    if resume_after is not None:
        try:
            container.seek(
                max(0, int(resume_after / stream.time_base)), stream=stream, backward=True
            )
        except (av.error.FFmpegError, ValueError, ZeroDivisionError, TypeError):
            container.seek(0)  # not seekable: decode from the start and skip what was seen
    rate = float(stream.average_rate or 0) or 25.0
    decoded = 0
    t = 0.0
    frames = container.decode(stream)
    while True:
        try:
            frame = next(frames)
        except StopIteration:
            break
        except av.error.FFmpegError as e:
            raise BadMediaError(f"broken video stream at {t:.3f} s ({e}); " + _REMUX_HINT) from e
        decoded += 1
        t = frame.time if frame.time is not None else (decoded - 1) / rate
        if not np.isfinite(t):
            raise BadMediaError(f"broken video stream: frame {decoded} has no valid timestamp")
        if resume_after is not None and t <= resume_after + 1e-6:
            continue
        if t > limits.video_max_seconds:
            raise BadMediaError(
                f"video too long: it runs past {limits.video_max_seconds:.0f} s "
                "(MMRAG_VIDEO_MAX_SECONDS) although its header says otherwise; split it or "
                "raise the limit"
            )
        _check_size(frame.width, frame.height, limits)
        keep = state.last_kept is None or t - state.last_kept >= interval - 1e-6
        hist = None
        if (
            not keep
            and limits.video_scene_threshold > 0
            and (state.last_probe is None or t - state.last_probe >= PROBE_GAP_S)
        ):
            hist = _histogram(frame)
            changed = state.hist is not None and _distance(state.hist, hist) >= (
                limits.video_scene_threshold
            )
            state.last_probe, state.hist = t, hist
            keep = changed and t - (state.last_kept or 0.0) >= MIN_SCENE_GAP_S
        if not keep:
            continue
        if state.kept >= limits.video_max_frames:
            yield Step(
                [],
                {**state.cursor(), "ocr_s": round(budget.spent_s, 3)},
                note=(
                    f"capped at {limits.video_max_frames} keyframes (MMRAG_VIDEO_MAX_FRAMES): "
                    f"frames after {state.last_kept or 0.0:.3f} s are not indexed"
                ),
            )
            return
        hist = hist or _histogram(frame)
        tw, th = fit_within(frame.width, frame.height, limits.render_max_side)
        image = pad_square(frame.to_image(width=tw, height=th), _BLACK)
        state.last_kept = state.last_probe = t
        state.hist = hist
        state.kept += 1
        ow, oh = fit_within(frame.width, frame.height, limits.ocr_max_side)
        text = read_if_text(
            image,
            functools.partial(frame.to_image, width=ow, height=oh),
            budget,
            f"the frame at {t:.3f} s",
        )
        chunk = MediaChunk(f"frame:{t:.3f}", image=image, snippet=text, origin=OCR if text else "")
        cursor = {**state.cursor(), "ocr_s": round(budget.spent_s, 3)}
        yield Step([chunk], cursor, note=budget.take_note())
    if state.kept == 0:
        raise BadMediaError(
            "broken video stream: no frame could be decoded; " + _REMUX_HINT
            if decoded == 0
            else "video has no frame to index"
        )


def _check_size(width: int, height: int, limits: MediaLimits) -> None:
    if width * height > limits.max_image_pixels:
        raise BadMediaError(
            f"video frames of {width}x{height} exceed the {limits.max_image_pixels}-pixel limit "
            "(decompression bomb guard, MMRAG_MAX_IMAGE_PIXELS); downscale it or raise the limit"
        )


def _duration(container: Any, stream: Any) -> float:
    """Declared duration in seconds, 0.0 when the file does not say."""
    try:
        if stream.duration and stream.time_base:
            seconds = float(stream.duration * stream.time_base)
        elif container.duration:
            seconds = container.duration / 1_000_000
        else:
            return 0.0
    except (TypeError, ValueError, OverflowError, ZeroDivisionError):
        return 0.0
    return seconds if finite_positive(seconds) else 0.0


def _histogram(frame: Any) -> list[float]:
    """64 numbers summing to 1: a joint RGB histogram (4 levels per channel) of a 32x32
    thumbnail. Joint, not per channel: a blue shape turning green moves pixels between
    colour bins even where one channel's distribution barely changes."""
    pixels = frame.to_ndarray(width=_HIST_SIDE, height=_HIST_SIDE, format="rgb24") // 64
    index = (pixels[..., 0] * 16 + pixels[..., 1] * 4 + pixels[..., 2]).ravel()
    counts = np.bincount(index, minlength=64)[:64]
    return [float(c) / index.size for c in counts]


def _distance(a: list[float], b: list[float]) -> float:
    """Share of the picture whose colour changed: 0 (same colours) .. 1 (none in common)."""
    if len(a) != len(b):
        return 1.0
    return float(np.abs(np.asarray(a) - np.asarray(b)).sum()) / 2.0
