"""A big ingest continues as new (every PAGES_PER_RUN pages) and its progress, the figure
``mmrag ingest --wait`` shows, carries across the runs: it never goes back and ends at the
number of objects, on the first ingest and on an unchanged re-run. bench/big_ingest.py runs
the same checks at 100,000 objects; here one object per page makes 24 objects two runs."""

from __future__ import annotations

import asyncio
from pathlib import Path

from temporalio.client import Client

from bench.big_ingest import Progress, poll_progress, runs_of, write_objects
from starters.ingest import start_ingest
from tests.conftest import Workers
from workflows.contracts import IngestResult
from workflows.ingest import PAGES_PER_RUN

OBJECTS = PAGES_PER_RUN + 4  # one object per page: PAGES_PER_RUN pages, then a second run


async def watched_ingest(
    client: Client, tenant: str, corpus: Path
) -> tuple[IngestResult, Progress, int, dict[str, int]]:
    """Run the ingest to its end while polling ``progress``; its result, what the query said
    along the way, how many runs it took, and what the query says once it has finished."""
    handle = await start_ingest(client, tenant, [str(corpus)], page_size=1, batch_size=4)
    progress, done = Progress(), asyncio.Event()
    poller = asyncio.create_task(poll_progress(client, handle.id, progress, done))
    result = await asyncio.wait_for(handle.result(), timeout=300)
    done.set()
    await poller
    runs = await runs_of(client, handle.id, handle.result_run_id or "")
    final = await client.get_workflow_handle(handle.id).query("progress")
    return result, progress, len(runs), final


async def test_progress_carries_across_continue_as_new(
    worker: Workers, client: Client, tenant: str, tmp_path: Path
) -> None:
    corpus = tmp_path / "corpus"
    write_objects(corpus, 0, OBJECTS)

    result, progress, runs, final = await watched_ingest(client, tenant, corpus)
    assert (result.seen, result.ingested, result.failed) == (OBJECTS, OBJECTS, 0)
    assert runs == 2  # it continued as new after PAGES_PER_RUN pages
    assert progress.seen and progress.monotone, progress.seen
    assert final["seen"] == OBJECTS  # the last run reports every object, not its own share

    # Nothing changed: every object unchanged, again across two runs, progress the same way.
    again, progress, runs, final = await watched_ingest(client, tenant, corpus)
    assert (again.seen, again.unchanged, again.ingested) == (OBJECTS, OBJECTS, 0)
    assert runs == 2
    assert progress.seen and progress.monotone, progress.seen
    assert final["seen"] == OBJECTS
