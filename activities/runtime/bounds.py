"""Worker-side bounds on a caller's load knobs (workflows/limits.py): each knob clamped to
this deployment's ``MMRAG_MAX_*`` settings, a non-positive one replaced by its default.
Used by the ``bound_knobs`` activity (activities/limits.py) and by the activities that
take a knob directly (retrieve's top_k, generate's answer tokens)."""

from __future__ import annotations

from settings import Settings
from workflows.activities.limits import Knobs

DEFAULT_PAGE_SIZE = 256  # IngestBatchInput.page_size's default
DEFAULT_HEARTBEAT_S = 30  # IngestBatchInput.encode_heartbeat_timeout_s's default


def clamp(value: int, default: int, high: int, low: int = 1) -> int:
    """``value`` within [low, high]; ``default`` (also bounded) when it is 0 or negative."""
    chosen = value if value > 0 else default
    return max(low, min(chosen, max(low, high)))


def bounded(knobs: Knobs, settings: Settings) -> Knobs:
    """``knobs`` clamped to this deployment's ``MMRAG_MAX_*`` settings."""
    interval = knobs.interval_s
    return Knobs(
        page_size=clamp(knobs.page_size, DEFAULT_PAGE_SIZE, settings.max_page_size),
        batch_size=clamp(knobs.batch_size, settings.batch_size, settings.max_batch_size),
        max_concurrent_batches=clamp(
            knobs.max_concurrent_batches, 1, settings.max_concurrent_batches
        ),
        heartbeat_timeout_s=clamp(
            knobs.heartbeat_timeout_s, DEFAULT_HEARTBEAT_S, settings.max_heartbeat_timeout_s
        ),
        # 0: one pass (a Temporal Schedule runs it); else at least the minimum interval.
        interval_s=0 if interval <= 0 else max(interval, settings.min_watch_interval_s),
    )


def clamp_top_k(top_k: int, settings: Settings) -> int:
    return clamp(top_k, 5, settings.max_top_k)


def clamp_answer_tokens(max_tokens: int, settings: Settings) -> int:
    return clamp(max_tokens, 300, settings.max_answer_tokens)
