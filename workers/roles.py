"""What each worker role runs: its task queue, workflows and activities.

Kept apart from ``workers/run.py`` (how a worker is built and stopped) so adding a
workflow or an activity touches one list here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from workers.settings import Settings
from workflows.contracts import ENCODE_TASK_QUEUE, GENERATE_TASK_QUEUE, TASK_QUEUE

log = logging.getLogger("mmrag.worker")


@dataclass
class RoleContent:
    task_queue: str
    workflows: Sequence[type] = field(default_factory=list)
    activities: Sequence[Callable[..., Any]] = field(default_factory=list)
    max_concurrent_activities: int = 8


def cpu_role(settings: Settings) -> RoleContent:
    from activities.ask import AskActivities
    from activities.ingest import IngestActivities
    from activities.lifecycle import LifecycleActivities
    from workflows.ask import Ask
    from workflows.forget import Forget
    from workflows.ingest import IngestAsset, IngestBatch
    from workflows.reindex import Reindex
    from workflows.watch import WatchPrefix

    ingest = IngestActivities(settings)
    ask = AskActivities(settings)
    lifecycle = LifecycleActivities(settings)
    return RoleContent(
        TASK_QUEUE,
        workflows=[IngestBatch, IngestAsset, Ask, Reindex, Forget, WatchPrefix],
        activities=[
            ingest.resolve_index,
            ingest.create_first_index,
            ingest.scan_page,
            ingest.record_outcomes,
            ask.retrieve,
            ask.finalize_answer,
            lifecycle.begin_reindex,
            lifecycle.reindex_page,
            lifecycle.reconcile_index,
            lifecycle.swap_index,
            lifecycle.finish_reindex,
            lifecycle.forget_page,
        ],
        max_concurrent_activities=settings.max_concurrent_activities,
    )


def encode_role(settings: Settings) -> RoleContent:
    from activities.encode import EncodeActivities

    encode = EncodeActivities(settings)
    info = encode.describe_encoder()  # warm: load the model before taking any task
    log.info(
        "encoder ready: %s/%s dim=%d on %s", info.model, info.pretrained, info.dim, info.device
    )
    return RoleContent(
        ENCODE_TASK_QUEUE,
        activities=[
            encode.describe_encoder,
            encode.describe_model,
            encode.encode_batch,
            encode.encode_query,
        ],
        max_concurrent_activities=settings.max_concurrent_encode_activities,
    )


def generate_role(settings: Settings) -> RoleContent:
    from activities.generate import GenerateActivities

    generate = GenerateActivities(settings=settings)
    llm = generate.config.model if generate.generator else "none (extractive answers)"
    log.info("LLM: %s", llm)
    return RoleContent(
        GENERATE_TASK_QUEUE,
        activities=[generate.generate],
        max_concurrent_activities=settings.max_concurrent_activities,
    )


ROLE_BUILDERS: dict[str, Callable[[Settings], RoleContent]] = {
    "cpu": cpu_role,
    "encode": encode_role,
    "generate": generate_role,
}
