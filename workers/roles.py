"""What each worker role runs: its task queue, workflows and activities.

Kept apart from ``workers/run.py`` (how a worker is built and stopped) so adding a
workflow or an activity touches one list here.

Milvus access per role (``MILVUS_ACCESS``) is what ``workers/milvus_rbac.py`` grants: each
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

from settings import Settings
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


MILVUS_ACCESS: dict[str, MilvusAccess] = {
    # One task queue runs ingest, re-index and forget (create collections, swap the alias,
    # delete vectors) next to Ask's retrieve (search): the writer's user. Ask's own calls
    # (search; the alias's description) need only mmrag_query's privileges.
    "cpu": MilvusAccess(
        "mmrag_ingest",
        "ingest/re-index/forget create collections, point the alias and delete vectors; "
        "Ask's retrieve searches",
    ),
    # encode_batch writes vectors into existing collections; encode_query reads the alias's
    # model from the collection description. No collection or alias management.
    "encode": MilvusAccess(
        "mmrag_encode", "encode_batch inserts/deletes vectors; encode_query reads the alias"
    ),
    "generate": MilvusAccess("", "no Milvus access"),
    # Ask on the query queue: encode_query reads the alias's model, retrieve searches.
    "query": MilvusAccess("mmrag_query", "Ask's encode_query reads the alias; retrieve searches"),
}


def cpu_role(settings: Settings) -> RoleContent:
    settings = settings.for_milvus_role("cpu").for_database_role("cpu")
    from activities.ask import AskActivities
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
    return RoleContent(
        TASK_QUEUE,
        workflows=[IngestBatch, IngestAsset, Ask, Reindex, Forget, WatchPrefix],
        activities=[
            ingest.resolve_index,
            ingest.create_first_index,
            ingest.scan_page,
            ingest.record_outcomes,
            ask.retrieve,
            ask.retrieve_and_answer,
            ask.finalize_answer,
            lifecycle.begin_reindex,
            lifecycle.reindex_page,
            lifecycle.reconcile_index,
            lifecycle.swap_index,
            lifecycle.finish_reindex,
            lifecycle.forget_page,
            limits.bound_knobs,  # local: the workflows' load knobs, clamped to MMRAG_MAX_*
        ],
        max_concurrent_activities=settings.max_concurrent_activities,
    )


def encode_role(settings: Settings) -> RoleContent:
    settings = settings.for_milvus_role("encode").for_database_role("encode")
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

    settings = settings.for_database_role("generate")  # no database
    generate = GenerateActivities(settings=settings)
    llm = generate.config.model if generate.generator else "none (extractive answers)"
    log.info("LLM: %s", llm)
    return RoleContent(
        GENERATE_TASK_QUEUE,
        activities=[generate.generate],
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
    from activities.encode import EncodeActivities
    from activities.query import QueryActivities
    from workflows.ask import Ask

    encode = EncodeActivities(settings)
    info = encode.describe_encoder()  # warm: load the model before taking any task
    log.info("query encoder ready: %s/%s on %s", info.model, info.pretrained, info.device)
    ask = AskActivities(settings)
    query = QueryActivities(encode, ask)
    return RoleContent(
        QUERY_TASK_QUEUE,
        workflows=[Ask],
        activities=[query.encode_and_retrieve, ask.finalize_answer],
        max_concurrent_activities=settings.max_concurrent_activities,
    )


ROLE_BUILDERS: dict[str, Callable[[Settings], RoleContent]] = {
    "cpu": cpu_role,
    "encode": encode_role,
    "generate": generate_role,
    "query": query_role,
}
