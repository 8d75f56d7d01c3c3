"""What each worker role runs: its task queue, workflows and activities.

Kept apart from ``workers/run.py`` (how a worker is built and stopped) so adding a
workflow or an activity touches one list here.

Milvus access per role (``MILVUS_ACCESS``, derived from the ``milvus`` flag of each
activity's home in ``workflows/activities/``) is what ``workers/milvus_rbac.py`` grants: each
role's activities connect with ``Settings.for_milvus_role(role)``, i.e. the role's own token
(``MMRAG_MILVUS_TOKEN_CPU`` / ``_ENCODE``) when set, else ``MMRAG_MILVUS_TOKEN``. Change an
activity's Milvus calls and this table, the RBAC roles and tests/test_milvus_rbac.py change
with it.

Postgres access per role is its own login (``workers/db_logins.py``): each role's
activities connect with ``Settings.for_database_role(role)``, the cpu role as
``mmrag_ingest`` (MMRAG_DATABASE_URL_CPU), the query role as ``mmrag_query``
(MMRAG_DATABASE_URL_QUERY); encode and generate have no database. No role ever connects as
the owner (MMRAG_DATABASE_URL), which only runs migrations.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from settings import WORKER_ROLES, Settings
from workflows.activities import (
    MILVUS_LEVELS,
    MILVUS_MANAGE,
    MILVUS_NONE,
    MILVUS_READ,
    MILVUS_WRITE,
    home_of,
    implementations,
)
from workflows.activities import ask as ask_stubs
from workflows.activities import captions as caption_stubs
from workflows.activities import ingest as ingest_stubs
from workflows.activities import lifecycle as lifecycle_stubs
from workflows.activities import limits as limits_stubs
from workflows.contracts import (
    ENCODE_TASK_QUEUE,
    GENERATE_TASK_QUEUE,
    QUERY_TASK_QUEUE,
    TASK_QUEUE,
)

log = logging.getLogger("mmrag.worker")


@dataclass
class RoleContent:
    task_queue: str
    workflows: Sequence[type] = field(default_factory=list)
    activities: Sequence[Callable[..., Any]] = field(default_factory=list)
    max_concurrent_activities: int = 8


@dataclass(frozen=True)
class MilvusAccess:
    """Which Milvus user a worker role runs as, and why it needs that user's privileges."""

    user: str  # a user of workers/milvus_rbac.py USERS; "" for no Milvus access
    why: str


# What each role runs: the activities' stubs (workflows/activities/), whose homes carry the
# flags read here and in workers/run.py. The role builders below supply the implementations;
# build_workers checks that they implement exactly these.
ROLE_ACTIVITIES: dict[str, tuple[Callable[..., Any], ...]] = {
    # One task queue runs ingest, re-index and forget next to Ask's retrieve and finalise.
    "cpu": (
        ingest_stubs.resolve_index,
        ingest_stubs.create_first_index,
        ingest_stubs.scan_page,
        ingest_stubs.record_outcomes,
        ingest_stubs.retag_assets,  # tags changed on an unchanged object (issue 18)
        ask_stubs.retrieve,
        ask_stubs.retrieve_and_answer,
        ask_stubs.finalize_answer,
        lifecycle_stubs.begin_reindex,
        lifecycle_stubs.reindex_page,
        lifecycle_stubs.reconcile_index,
        lifecycle_stubs.swap_index,
        lifecycle_stubs.finish_reindex,
        lifecycle_stubs.forget_page,
        limits_stubs.bound_knobs,  # local: the workflows' load knobs, clamped to MMRAG_MAX_*
        caption_stubs.plan_captions,  # local: which pictures need a caption; the cache
        caption_stubs.store_captions,  # local
    ),
    "encode": (
        ingest_stubs.describe_encoder,
        lifecycle_stubs.describe_model,
        ingest_stubs.encode_batch,
        ask_stubs.encode_query,
    ),
    "generate": (ask_stubs.generate, caption_stubs.caption_media),
    # Ask on the query queue: encode + search in one local activity, then finalise.
    "query": (ask_stubs.encode_and_retrieve, ask_stubs.finalize_answer),
}
assert tuple(ROLE_ACTIVITIES) == WORKER_ROLES, "settings.WORKER_ROLES names every role"

# The Milvus user whose privileges cover each level an activity declares (milvus_rbac.py:
# mmrag_query < mmrag_encode < mmrag_ingest).
MILVUS_USERS = {
    MILVUS_NONE: "",
    MILVUS_READ: "mmrag_query",
    MILVUS_WRITE: "mmrag_encode",
    MILVUS_MANAGE: "mmrag_ingest",
}


def milvus_access(role: str) -> MilvusAccess:
    """The least Milvus user that covers every activity of ``role``, and which activities
    need what (from their homes' ``milvus`` flags)."""
    homes = [home_of(a) for a in ROLE_ACTIVITIES[role]]
    level = max((h.milvus for h in homes), key=MILVUS_LEVELS.index)
    needs = [f"{h.name} ({h.milvus})" for h in homes if h.milvus != MILVUS_NONE]
    return MilvusAccess(MILVUS_USERS[level], ", ".join(needs) or "no Milvus access")


MILVUS_ACCESS: dict[str, MilvusAccess] = {role: milvus_access(role) for role in ROLE_ACTIVITIES}


def bind(role: str, *objects: object) -> list[Callable[..., Any]]:
    """The methods of ``objects`` that implement ``role``'s activities (ROLE_ACTIVITIES), in
    that order. A stub none of them implements is a wiring error, found at worker start."""
    found: dict[str, Callable[..., Any]] = {}
    for obj in objects:
        found.update(implementations(obj))
    names = [home_of(stub).name for stub in ROLE_ACTIVITIES[role]]
    missing = [n for n in names if n not in found]
    if missing:
        raise RuntimeError(f"the {role} role has no implementation of {', '.join(missing)}")
    return [found[n] for n in names]


def cpu_role(settings: Settings) -> RoleContent:
    settings = settings.for_milvus_role("cpu").for_database_role("cpu")
    from activities.ask import AskActivities
    from activities.captions import CaptionStoreActivities
    from activities.ingest import IngestActivities
    from activities.lifecycle import LifecycleActivities
    from activities.limits import LimitActivities
    from workflows.ask import Ask
    from workflows.forget import Forget
    from workflows.ingest import IngestAsset, IngestBatch
    from workflows.reindex import Reindex
    from workflows.watch import WatchPrefix

    ingest = IngestActivities(settings)
    ask = AskActivities(settings)
    lifecycle = LifecycleActivities(settings)
    limits = LimitActivities(settings)
    captions = CaptionStoreActivities(settings)
    return RoleContent(
        TASK_QUEUE,
        workflows=[IngestBatch, IngestAsset, Ask, Reindex, Forget, WatchPrefix],
        activities=bind("cpu", ingest, ask, lifecycle, limits, captions),
        max_concurrent_activities=settings.max_concurrent_activities,
    )


def encode_role(settings: Settings) -> RoleContent:
    settings = settings.for_milvus_role("encode").for_database_role("encode")
    from activities.clip.models import WarmModels
    from activities.encode_batch import BatchEncodeActivities
    from activities.encode_query import QueryEncodeActivities

    models = WarmModels(settings)  # one set of models and one model lock for both
    batch = BatchEncodeActivities(settings, models)
    query = QueryEncodeActivities(settings, models, batch.sandboxes)
    info = batch.describe_encoder()  # warm: load the model before taking any task
    log.info(
        "encoder ready: %s/%s dim=%d on %s", info.model, info.pretrained, info.dim, info.device
    )
    return RoleContent(
        ENCODE_TASK_QUEUE,
        activities=bind("encode", batch, query),
        max_concurrent_activities=settings.max_concurrent_encode_activities,
    )


def generate_role(settings: Settings) -> RoleContent:
    from activities.captions import CaptionActivities
    from activities.generate import GenerateActivities

    settings = settings.for_database_role("generate")  # no database
    generate = GenerateActivities(settings=settings)
    llm = generate.config.model if generate.generator else "none (extractive answers)"
    log.info("LLM: %s", llm)
    captions = CaptionActivities(settings, generate.config)  # decoder children on first use
    if settings.caption_model:
        log.info("captions: %s", settings.caption_model)
    return RoleContent(
        GENERATE_TASK_QUEUE,
        activities=bind("generate", generate, captions),
        max_concurrent_activities=settings.max_concurrent_activities,
    )


def query_role(settings: Settings) -> RoleContent:
    """``Ask`` on ``mmrag-query`` with everything but generation in this process: the CLIP
    model warm here (on a GPU pod, or a CPU pod with a small model), so the query is encoded
    by a local activity instead of a hop to the encode queue; searches and audit rows as the
    read-only query users (``mmrag_query`` in Milvus and Postgres, each its own login).
    Ingest and re-index never queue behind queries here."""
    settings = settings.for_milvus_role("query").for_database_role("query")
    from activities.ask import AskActivities
    from activities.encode_query import QueryEncodeActivities
    from activities.query import QueryActivities
    from workflows.ask import Ask

    # The model and a decoder child for query images: no decode threads or batch pools.
    encode = QueryEncodeActivities(settings)
    model = encode.models.configured  # warm: load the model before taking any task
    log.info("query encoder ready: %s/%s on %s", model.model_name, model.pretrained, model.device)
    ask = AskActivities(settings)
    query = QueryActivities(encode, ask)
    return RoleContent(
        QUERY_TASK_QUEUE,
        workflows=[Ask],
        activities=bind("query", query, ask),
        max_concurrent_activities=settings.max_concurrent_activities,
    )


ROLE_BUILDERS: dict[str, Callable[[Settings], RoleContent]] = {
    "cpu": cpu_role,
    "encode": encode_role,
    "generate": generate_role,
    "query": query_role,
}
