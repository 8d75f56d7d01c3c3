"""Priority and fairness keys reach the server: Asks before ingests before re-indexes, and
encode work queued by tenant (workflows/priorities.py).

What a user relies on is that a backfill of one tenant does not hold back another tenant's
ingest or Ask on the shared encode queue; the server orders tasks by what the history
records, so these tests read the recorded priority of the runs and of their encode tasks.
(bench/fairness.py measures what the keys do to waiting times; docs/scaling.md.)
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client

from starters.ask import start_ask
from starters.ingest import start_ingest
from starters.synthetic_corpus import write_corpus
from tests.conftest import Workers
from workflows.contracts import TASK_QUEUE, AskInput
from workflows.priorities import (
    ASK_PRIORITY,
    INGEST_PRIORITY,
    MAX_FAIRNESS_KEY_BYTES,
    fairness_key,
)


def started_priority(events: list[HistoryEvent]) -> int:
    return events[0].workflow_execution_started_event_attributes.priority.priority_key


def scheduled_fairness_keys(events: list[HistoryEvent], activity: str) -> list[str]:
    return [
        e.activity_task_scheduled_event_attributes.priority.fairness_key
        for e in events
        if e.HasField("activity_task_scheduled_event_attributes")
        and e.activity_task_scheduled_event_attributes.activity_type.name == activity
    ]


async def test_ingest_and_ask_carry_their_priority_and_the_tenant_as_fairness_key(
    worker: Workers, client: Client, tenant: str, tmp_path: Path
) -> None:
    write_corpus(tmp_path / "corpus", per_class=1, seed=17)
    handle = await start_ingest(client, tenant, [str(tmp_path / "corpus")], batch_size=8)
    result = await asyncio.wait_for(handle.result(), timeout=180)
    assert result.ingested == 18
    events = list((await handle.fetch_history()).events)
    assert started_priority(events) == INGEST_PRIORITY
    keys = scheduled_fairness_keys(events, "encode_batch")
    assert keys == [tenant] * 3  # 18 images in batches of 8: every encode task queues by tenant

    # An Ask on the main queue hops to the encode queue for its query: first in line, and
    # in its tenant's turn there.
    ask = await start_ask(client, AskInput(tenant=tenant, text="a red circle"), TASK_QUEUE)
    answer = await asyncio.wait_for(ask.result(), timeout=90)
    assert answer.sources
    events = list((await ask.fetch_history()).events)
    assert started_priority(events) == ASK_PRIORITY
    assert scheduled_fairness_keys(events, "encode_query") == [tenant]


def test_a_long_tenant_name_gets_a_distinct_key_within_temporals_limit() -> None:
    """Tenant names may be 128 characters; Temporal's fairness keys 64 bytes."""
    long_a, long_b = "a" * 100, "a" * 99 + "b"
    assert fairness_key("tenant-1") == "tenant-1"
    assert len(fairness_key(long_a).encode()) <= MAX_FAIRNESS_KEY_BYTES
    assert fairness_key(long_a) != fairness_key(long_b)
