"""Callers cannot make the workers do unbounded work, nor change what a tag or a filter
means: load knobs are clamped on the worker side (MMRAG_MAX_* settings), tags and filters
the index cannot hold or run exactly are refused at once, with one line saying what to fix.

Each hole is first reproduced as it was (the attack), then shown closed.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.converter import PayloadConverter
from temporalio.exceptions import ApplicationError

from activities.runtime.bounds import bounded
from activities.store import registry
from activities.store.vectors import VectorStoreError, compile_filters, tag_value
from settings import Settings, get_settings
from starters.ask import ask
from starters.ingest import start_ingest
from starters.lifecycle import start_watch
from starters.synthetic_corpus import write_corpus
from tests.conftest import Workers
from tests.helpers import engine, registry_rows, store, wait_searchable
from tests.llm_server import LlmTestServer
from workflows.activities.ingest import ScanPageInput
from workflows.activities.limits import Knobs
from workflows.contracts import (
    ASK_WORKFLOW,
    TASK_QUEUE,
    AskFilters,
    AskInput,
    AskResult,
    IngestResult,
    WatchPrefixInput,
)
from workflows.limits import MAX_TAGS, filters_problem, tags_problem

ABSURD = 10**9
MANY_TAGS = {f"k{i:02d}": "v" for i in range(MAX_TAGS + 1)}


# -- pure checks -------------------------------------------------------------------------------
def test_tag_keys_with_equals_collided_and_are_refused() -> None:
    # The attack: two different tag sets were stored as the same string ...
    assert tag_value("a=b", "c") == tag_value("a", "b=c") == "a=b=c"
    # ... so a key containing '=' is refused; '=' in a value stays unambiguous.
    assert "'='" in tags_problem({"a=b": "c"})
    assert tags_problem({"a": "b=c"}) == ""
    assert "at most 64" in tags_problem(MANY_TAGS)
    assert "bytes" in tags_problem({"k": "x" * 300})


@pytest.mark.parametrize(
    ("filters", "named"),
    [
        (AskFilters(created_after=2**70), "created_after"),
        (AskFilters(created_before=-1), "created_before"),
        (AskFilters(tags={"a=b": "c"}), "'='"),
        (AskFilters(tags=MANY_TAGS), "at most 64"),
        (AskFilters(media_types=[""]), "media_types"),
        (AskFilters(asset_ids=["a"] * 1001), "asset_ids"),
    ],
)
def test_malformed_filters_are_named(filters: AskFilters, named: str) -> None:
    assert named in filters_problem(filters)
    with pytest.raises(ValueError, match=named):
        compile_filters(**asdict(filters))


def test_knobs_are_clamped_to_the_settings() -> None:
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    high = bounded(Knobs(ABSURD, ABSURD, ABSURD, ABSURD, 1), s)
    assert high == Knobs(
        s.max_page_size,
        s.max_batch_size,
        s.max_concurrent_batches,
        s.max_heartbeat_timeout_s,
        s.min_watch_interval_s,
    )
    low = bounded(Knobs(-5, -5, -5, -5, -5), s)
    assert low == Knobs(256, s.batch_size, 1, 30, 0)  # defaults; a non-positive interval: once


# -- against the real stack ------------------------------------------------------------------
def _failure(info: pytest.ExceptionInfo[WorkflowFailureError]) -> ApplicationError:
    cause = info.value.cause
    while not isinstance(cause, ApplicationError) and cause is not None:
        cause = cause.cause
    assert isinstance(cause, ApplicationError), info.value
    return cause


async def _events(handle: WorkflowHandle[object, object]) -> list[HistoryEvent]:
    return (await handle.fetch_history()).events


async def _refused_ask(
    client: Client, inp: AskInput
) -> tuple[ApplicationError, list[HistoryEvent]]:
    """Run an Ask that must fail; its root error and its history."""
    handle = await client.start_workflow(
        ASK_WORKFLOW,
        inp,
        id=f"ask/{inp.tenant}/{uuid.uuid4().hex}",
        task_queue=TASK_QUEUE,
        result_type=AskResult,
    )
    with pytest.raises(WorkflowFailureError) as info:
        await asyncio.wait_for(handle.result(), timeout=120)
    return _failure(info), await _events(handle)


def _started_any_work(events: list[HistoryEvent]) -> bool:
    kinds = {
        EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED,
        EventType.EVENT_TYPE_MARKER_RECORDED,  # local activities
        EventType.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED,
    }
    return any(e.event_type in kinds for e in events)


async def _ingest(
    client: Client, tenant: str, corpus: Path, tags: dict[str, str], **options: int
) -> IngestResult:
    handle = await start_ingest(client, tenant, [str(corpus)], tags=tags, **options)  # type: ignore[arg-type]
    return await asyncio.wait_for(handle.result(), timeout=120)


async def test_tag_key_with_equals_is_refused_on_ingest_and_in_filters(
    worker: Workers, client: Client, tenant: str, tmp_path: Path
) -> None:
    write_corpus(tmp_path / "c", per_class=1, seed=21)
    # The attack: assets tagged {"a": "b=c"} were found by the filter {"a=b": "c"}.
    done = await _ingest(client, tenant, tmp_path / "c", {"a": "b=c"})
    assert done.ingested == 18
    wait_searchable(tenant, 18)
    index = registry.active_index(engine())
    assert index is not None
    vector = [0.0] * (index.dim - 1) + [1.0]
    old_expression = 'array_contains(tags, "a=b=c")'  # what {"a=b": "c"} compiled to
    assert store().search(index.collection, vector, tenant, 5, old_expression)
    error, events = await _refused_ask(
        client, AskInput(tenant, text="a circle", filters=AskFilters(tags={"a=b": "c"}))
    )
    assert (error.type, error.non_retryable) == ("BadQuery", True)
    assert "'a=b'" in error.message and "'='" in error.message
    assert not _started_any_work(events)
    # The honest filter still finds them.
    found = await ask(
        client,
        AskInput(tenant, text="a circle", generate=False, filters=AskFilters(tags={"a": "b=c"})),
    )
    assert found.sources

    other = f"{tenant}-eq"
    with pytest.raises(WorkflowFailureError) as info:
        await _ingest(client, other, tmp_path / "c", {"a=b": "c"})
    error = _failure(info)
    assert (error.type, error.non_retryable) == ("BadInput", True)
    assert "rename the key" in error.message
    assert registry_rows(other) == []


async def test_more_than_64_tags_are_refused_not_dropped(
    worker: Workers, client: Client, tenant: str, tmp_path: Path
) -> None:
    write_corpus(tmp_path / "c", per_class=1, seed=22)
    with pytest.raises(WorkflowFailureError) as info:
        await _ingest(client, tenant, tmp_path / "c", MANY_TAGS)
    error = _failure(info)
    assert (error.type, error.non_retryable) == ("BadInput", True)
    assert f"{MAX_TAGS + 1} tags given, at most {MAX_TAGS}" in error.message
    assert registry_rows(tenant) == []  # nothing half-ingested with 64 of its 65 tags

    error, _ = await _refused_ask(
        client, AskInput(tenant, text="a circle", filters=AskFilters(tags=MANY_TAGS))
    )
    assert (error.type, error.non_retryable) == ("BadQuery", True)
    assert "at most 64" in error.message


async def test_malformed_filter_fails_at_once_as_bad_query(
    worker: Workers, client: Client, tenant: str, tmp_path: Path
) -> None:
    write_corpus(tmp_path / "c", per_class=1, seed=23)
    await _ingest(client, tenant, tmp_path / "c", {})
    wait_searchable(tenant, 18)
    # The attack: an out-of-range time compiled into an expression Milvus rejects, and the
    # retrieve activity retried that rejection for 90 s before the Ask failed.
    index = registry.active_index(engine())
    assert index is not None
    vector = [0.0] * (index.dim - 1) + [1.0]
    assert store().search(index.collection, vector, tenant, 5, "created_at >= 0")  # control
    with pytest.raises(VectorStoreError, match="cannot parse expression"):
        store().search(index.collection, vector, tenant, 5, f"created_at >= {2**70}")
    # Now: refused before any activity, non-retryable, naming the field.
    error, events = await _refused_ask(
        client, AskInput(tenant, text="a circle", filters=AskFilters(created_after=2**70))
    )
    assert (error.type, error.non_retryable) == ("BadQuery", True)
    assert "filters.created_after" in error.message
    assert not _started_any_work(events)
    attempts = [e for e in events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED]
    assert attempts == []  # failed the run on its first task, no task retries either


async def test_absurd_ingest_knobs_are_bounded(
    worker: Workers, client: Client, tenant: str, tmp_path: Path
) -> None:
    """Page size, batch size, concurrency and heartbeat far past any sane value: the ingest
    does the same work, in pages and batches the worker allows."""
    write_corpus(tmp_path / "c", per_class=1, seed=24)
    handle = await start_ingest(
        client,
        tenant,
        [str(tmp_path / "c")],
        page_size=ABSURD,
        batch_size=ABSURD,
        max_concurrent_batches=ABSURD,
        encode_heartbeat_timeout_s=ABSURD,
    )
    result = await asyncio.wait_for(handle.result(), timeout=120)
    assert (result.ingested, result.failed) == (18, 0)
    s = get_settings()
    events = await _events(handle)
    converter = client.data_converter.payload_converter
    scans, encodes = [], []
    for e in events:
        if e.event_type != EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            continue
        attrs = e.activity_task_scheduled_event_attributes
        if attrs.activity_type.name == "scan_page":
            scans.append(converter.from_payloads(attrs.input.payloads, [ScanPageInput])[0])
        elif attrs.activity_type.name == "encode_batch":
            encodes.append(attrs.heartbeat_timeout.ToTimedelta())
    assert scans and all(scan.page_size == s.max_page_size for scan in scans)
    assert encodes and all(h == timedelta(seconds=s.max_heartbeat_timeout_s) for h in encodes)
    knobs = _bound_knobs(events, converter)
    assert (knobs.batch_size, knobs.max_concurrent_batches) == (
        s.max_batch_size,
        s.max_concurrent_batches,
    )


def _bound_knobs(events: list[HistoryEvent], converter: PayloadConverter) -> Knobs:
    """The result of the run's ``bound_knobs`` local activity, from its marker."""
    for e in events:
        marker = e.marker_recorded_event_attributes
        if e.event_type != EventType.EVENT_TYPE_MARKER_RECORDED or "result" not in marker.details:
            continue
        if b"bound_knobs" in marker.details["data"].SerializeToString():
            return converter.from_payloads(marker.details["result"].payloads, [Knobs])[0]  # type: ignore[no-any-return]
    raise AssertionError("no bound_knobs marker in the history")


async def test_negative_batch_size_no_longer_skips_every_object(
    worker: Workers, client: Client, tenant: str, tmp_path: Path
) -> None:
    """The attack: a negative batch_size made ``range`` empty, so the ingest 'completed'
    having encoded nothing. Now it is clamped to at least 1."""
    write_corpus(tmp_path / "c", per_class=1, seed=25)
    result = await _ingest(client, tenant, tmp_path / "c", {}, batch_size=-5)
    assert (result.seen, result.ingested) == (18, 18)


async def test_absurd_answer_size_is_bounded(
    worker: Workers, client: Client, llm: LlmTestServer, tenant: str, tmp_path: Path
) -> None:
    write_corpus(tmp_path / "c", per_class=1, seed=26)
    await _ingest(client, tenant, tmp_path / "c", {})
    wait_searchable(tenant, 18)
    llm.set_mode("ok")
    marker = f"bounded-{uuid.uuid4().hex[:8]}"
    result = await ask(
        client,
        AskInput(tenant, text=f"a red circle {marker}", top_k=ABSURD, max_answer_tokens=ABSURD),
    )
    assert 0 < len(result.sources) <= get_settings().max_top_k
    sent = [b for b in llm.answer_requests if marker in str(b)]
    assert sent, "the Ask reached the LLM"
    asked = sent[-1].get("max_tokens", sent[-1].get("max_completion_tokens"))
    assert asked == get_settings().max_answer_tokens


async def test_watch_interval_has_a_floor(
    worker: Workers, client: Client, tenant: str, tmp_path: Path
) -> None:
    """interval_s=1 would list the prefix every second for ever; the worker's minimum holds."""
    write_corpus(tmp_path / "w", per_class=1, seed=27)
    handle = await start_watch(
        client, WatchPrefixInput(tenant, (tmp_path / "w").as_uri(), interval_s=1)
    )
    try:
        deadline = asyncio.get_running_loop().time() + 120
        timers: list[timedelta] = []
        while not timers:
            assert asyncio.get_running_loop().time() < deadline, "the first pass never ended"
            await asyncio.sleep(1)
            timers = [
                e.timer_started_event_attributes.start_to_fire_timeout.ToTimedelta()
                for e in await _events(handle)
                if e.event_type == EventType.EVENT_TYPE_TIMER_STARTED
            ]
        assert timers == [timedelta(seconds=get_settings().min_watch_interval_s)]
    finally:
        await handle.terminate("test over")
