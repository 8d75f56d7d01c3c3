"""mmrag's own Prometheus series, next to the Temporal SDK's on the worker's /metrics port.

Why on the SDK's meter (``Runtime.metric_meter``) rather than a separate Prometheus client:
one port per worker process, one scrape config, and the worker role arrives as a global
label. The worker sets the meter once at start (:func:`configure`); until then, and in
every process that does not export metrics (the CLI, tests, benchmarks calling activities
directly), each call here is a cheap no-op. A metric call never raises into an activity.

Series (counters end in ``_total``; durations are seconds)::

    mmrag_images_encoded_total            images turned into vectors
    mmrag_assets_total{status}            asset outcomes: ingested | unchanged | failed | skipped
    mmrag_assets_failed_total{reason}     failed assets by reason category (FAILURE_CATEGORIES)
    mmrag_encode_batch_size               objects per encode activity (histogram)
    mmrag_encode_seconds                  wall time of one encode batch: fetch, decode, CLIP,
                                          vector write (histogram)
    mmrag_clip_seconds                    one CLIP forward pass (histogram; recorded by the
                                          encode activity where it calls the model)
    mmrag_retrieval_seconds               Milvus search + re-rank + prompt fusion (histogram)
    mmrag_llm_seconds                     one LLM call that answered (histogram)
    mmrag_llm_breaker_state               0 closed, 1 half-open, 2 open (gauge)
    mmrag_answers_total{kind}             Ask answers by answer_kind
    mmrag_degraded_answers_total          Ask answers degraded because the LLM was unavailable
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from temporalio.common import (
    MetricCounter,
    MetricGauge,
    MetricHistogram,
    MetricHistogramFloat,
    MetricMeter,
)

log = logging.getLogger("mmrag.metrics")

# Failure reasons are free text written for people ("corrupt or truncated image: ...
# file:///x.png"); a label must be a small fixed set, and never a URI. First match wins.
FAILURE_CATEGORIES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("empty", re.compile(r"\bempty (?:file|pdf)\b|\bhas no pages\b", re.I)),
    ("bomb", re.compile(r"decompression bomb|page-bomb|bomb guard", re.I)),
    ("too_large", re.compile(r"too large|exceeds the \d+-byte|too long", re.I)),
    (
        "resource_limit",
        re.compile(
            r"needs more (?:than \d+ MB|memory)|took longer than|decoder process died", re.I
        ),
    ),
    ("unrecognised", re.compile(r"unrecogni[sz]ed content|not an image|not a video type", re.I)),
    ("unsupported_type", re.compile(r"unsupported media type|no video stream", re.I)),
    (
        "corrupt",
        re.compile(r"corrupt|truncated|malformed|broken video|protocol error|cannot decode", re.I),
    ),
    ("missing", re.compile(r"no such (?:file|object)|not found|missing", re.I)),
    ("unsupported_uri", re.compile(r"unsupported uri", re.I)),
    ("forgotten", re.compile(r"forgotten", re.I)),
)
OTHER = "other"
ASSET_STATUSES = ("ingested", "unchanged", "failed", "skipped")
ANSWER_KINDS = ("generated", "extractive", "refused", "degraded", "none")
BREAKER_STATES = {"closed": 0, "half-open": 1, "half_open": 1, "open": 2}


@dataclass(frozen=True)
class Histogram:
    name: str
    description: str
    unit: str
    buckets: Sequence[float]
    integer: bool = False


# The names ``observe`` accepts; their buckets go to PrometheusConfig (workers/telemetry.py).
HISTOGRAMS: Mapping[str, Histogram] = {
    "encode_seconds": Histogram(
        "mmrag_encode_seconds",
        "Wall time of one encode batch (fetch, decode, CLIP forward passes, vector write)",
        "s",
        (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
    ),
    "clip_seconds": Histogram(
        "mmrag_clip_seconds",
        "One CLIP forward pass over a micro-batch of images (model time only)",
        "s",
        (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    ),
    "retrieval_seconds": Histogram(
        "mmrag_retrieval_seconds",
        "Milvus search, re-rank and prompt fusion of one Ask",
        "s",
        (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
    ),
    "llm_seconds": Histogram(
        "mmrag_llm_seconds",
        "One LLM generation call that returned an answer",
        "s",
        (0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60),
    ),
    "encode_batch_size": Histogram(
        "mmrag_encode_batch_size",
        "Objects per encode activity",
        "1",
        (1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
        integer=True,
    ),
}


def histogram_buckets() -> dict[str, Sequence[float]]:
    """Bucket boundaries per exported histogram name, for ``PrometheusConfig``."""
    return {h.name: h.buckets for h in HISTOGRAMS.values()}


class _Instruments:
    def __init__(self, meter: MetricMeter) -> None:
        self.images = meter.create_counter(
            "mmrag_images_encoded_total", "Images turned into vectors"
        )
        self.assets = meter.create_counter("mmrag_assets_total", "Asset outcomes by status")
        self.failed = meter.create_counter(
            "mmrag_assets_failed_total", "Failed assets by reason category"
        )
        self.answers = meter.create_counter("mmrag_answers_total", "Ask answers by answer_kind")
        self.degraded = meter.create_counter(
            "mmrag_degraded_answers_total", "Ask answers degraded because the LLM was unavailable"
        )
        self.breaker: MetricGauge = meter.create_gauge(
            "mmrag_llm_breaker_state", "LLM circuit breaker: 0 closed, 1 half-open, 2 open"
        )
        self.histograms: dict[str, MetricHistogram | MetricHistogramFloat] = {}
        for key, h in HISTOGRAMS.items():
            self.histograms[key] = (
                meter.create_histogram(h.name, h.description, h.unit)
                if h.integer
                else meter.create_histogram_float(h.name, h.description, h.unit)
            )
        # Series exist from the start at zero, so rate() and absent() alerts work before
        # the first event.
        zero: list[tuple[MetricCounter, dict[str, str]]] = [(self.images, {}), (self.degraded, {})]
        zero += [(self.assets, {"status": s}) for s in ASSET_STATUSES]
        zero += [(self.failed, {"reason": c}) for c, _ in FAILURE_CATEGORIES] + [
            (self.failed, {"reason": OTHER})
        ]
        zero += [(self.answers, {"kind": k}) for k in ANSWER_KINDS]
        for counter, labels in zero:
            counter.add(0, labels)


_instruments: _Instruments | None = None
_lock = threading.Lock()
_warned: set[str] = set()


def configure(meter: MetricMeter | None) -> None:
    """Export through ``meter`` (a worker's Runtime meter); None turns metrics off."""
    global _instruments
    with _lock:
        _instruments = _Instruments(meter) if meter is not None else None


def enabled() -> bool:
    return _instruments is not None


def _safely(what: str, fn: Callable[[_Instruments], object]) -> None:
    """Run one recording; a metrics bug is logged once, never raised into an activity."""
    if _instruments is None:
        return
    try:
        fn(_instruments)
    except Exception as e:  # pragma: no cover - defensive
        if what not in _warned:
            _warned.add(what)
            log.warning("metric %s not recorded: %s", what, e)


def failure_category(reason: str) -> str:
    """A fixed label for a free-text failure reason (never the reason itself)."""
    for category, pattern in FAILURE_CATEGORIES:
        if pattern.search(reason):
            return category
    return OTHER


def images_encoded(n: int) -> None:
    if n > 0:
        _safely("images_encoded", lambda m: m.images.add(n))


def asset_outcome(status: str, reason: str = "") -> None:
    """One asset's outcome; failures are also counted by reason category."""
    label = status if status in ASSET_STATUSES else OTHER
    _safely("asset_outcome", lambda m: m.assets.add(1, {"status": label}))
    if status == "failed":
        category = failure_category(reason)
        _safely("asset_failed", lambda m: m.failed.add(1, {"reason": category}))


def observe(name: str, value: float) -> None:
    """Record into one of HISTOGRAMS by short name, e.g. ``observe("llm_seconds", 0.8)``."""
    if name not in HISTOGRAMS:
        if name not in _warned:
            _warned.add(name)
            log.warning("unknown histogram %r: known are %s", name, ", ".join(HISTOGRAMS))
        return
    spec = HISTOGRAMS[name]
    recorded: int | float = max(0, round(value)) if spec.integer else max(0.0, float(value))
    _safely(name, lambda m: m.histograms[name].record(recorded))  # type: ignore[arg-type]


def encode_batch(size: int, seconds: float) -> None:
    observe("encode_batch_size", size)
    observe("encode_seconds", seconds)


def breaker_state(state: str) -> None:
    """pybreaker's state name ("closed", "half-open", "open") as 0 / 1 / 2."""
    value = BREAKER_STATES.get(state.lower())
    if value is not None:
        _safely("breaker_state", lambda m: m.breaker.set(value))


def answer(kind: str, degraded: bool = False) -> None:
    label = kind if kind in ANSWER_KINDS else OTHER
    _safely("answer", lambda m: m.answers.add(1, {"kind": label}))
    if degraded:
        _safely("degraded", lambda m: m.degraded.add(1))


def ms_since(started: float) -> float:
    """Milliseconds since ``started`` (a ``time.perf_counter()``), as the payloads report them."""
    return round((time.perf_counter() - started) * 1000, 2)
