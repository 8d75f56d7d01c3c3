"""Start ingest workflows from Python, and follow them with a progress bar.

The bar tells only what it knows: objects are listed page by page while earlier pages
encode, so the total is unknown until the last source is listed, and the bar says so
rather than showing a total that grows; it ends on the result's own counts.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import TypedDict, Unpack

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from temporalio.client import Client, WorkflowHandle

from activities.store.objects import normalize_uri
from activities.store.roots import register_local_root
from starters.display import print_failures
from starters.runs import derived_id, start_once
from starters.waiting import Notices
from workflows.contracts import (
    INGEST_BATCH_WORKFLOW,
    IngestBatchInput,
    IngestProgress,
    IngestResult,
)


def register_local_roots(state_dir: Path, tenant: str, sources: list[str]) -> list[str]:
    """Make the local folders (or files) among ``sources`` storage roots of ``tenant`` on
    the embedded stack whose state lives in ``state_dir``; returns the roots added.

    Only for the person at the stack's machine: the roots file lives in the stack's state
    directory, which no Temporal client can write. Against a remote cluster nothing is
    registered, and its workers' MMRAG_STORAGE_ROOTS decide."""
    if not (state_dir / "endpoints.json").exists():
        return []  # no embedded stack here
    added = []
    for uri in sources:
        if uri.startswith("file://") and register_local_root(state_dir, tenant, uri):
            added.append(uri)
    return added


def batch_workflow_id(inp: IngestBatchInput) -> str:
    """Same sources, tenant, tags and force flag: the same id, so a second start attaches."""
    key = json.dumps([inp.sources, inp.tags, inp.force], sort_keys=True)
    return derived_id("ingest-batch", inp.tenant, key)


class IngestOptions(TypedDict, total=False):
    """The tuning knobs of ``IngestBatchInput`` a starter may set."""

    batch_size: int
    page_size: int
    max_concurrent_batches: int
    encode_heartbeat_timeout_s: int


async def start_ingest(
    client: Client,
    tenant: str,
    paths_or_uris: list[str],
    tags: dict[str, str] | None = None,
    force: bool = False,
    allow_forgotten: bool = False,
    **options: Unpack[IngestOptions],
) -> WorkflowHandle[object, IngestResult]:
    sources = [normalize_uri(p) for p in paths_or_uris]
    inp = IngestBatchInput(
        tenant=tenant,
        sources=sources,
        tags=tags or {},
        force=force,
        allow_forgotten=allow_forgotten,
        **options,
    )
    return await start_once(
        client,
        INGEST_BATCH_WORKFLOW,
        inp,
        batch_workflow_id(inp),
        IngestResult,
        f"ingest {len(sources)} source(s) for tenant {tenant}",
    )


def progress_count(p: IngestProgress) -> str:
    """How far an ingest is, without inventing a total: it is known only once every
    source is listed, and then the run is about to return."""
    source = f"listing source {min(p.sources_done + 1, p.sources_total)}/{p.sources_total}"
    return f"{p.seen} done, {p.in_flight} encoding; total unknown ({source})"


async def follow(
    handle: WorkflowHandle[object, IngestResult],
    console: Console,
    client: Client | None = None,
) -> IngestResult:
    """Show progress from the workflow's ``progress`` query until it returns; with
    ``client``, also say what the run waits for (no worker on a queue, a step retrying)."""
    result_task = asyncio.ensure_future(handle.result())
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[count]}"),
        TimeElapsedColumn(),
    )
    # Not on a pipe or a log file: a transient bar there leaves only a blank line.
    with Progress(
        *columns, console=console, transient=True, disable=not console.is_terminal
    ) as bar:
        task = bar.add_task("starting", total=None, count="no report yet")

        def say(text: str) -> None:
            bar.console.print(f"[yellow]{escape(text)}[/yellow]", highlight=False, soft_wrap=True)

        notices = Notices(client, say) if client is not None else None
        try:
            while not result_task.done():
                try:
                    p = await handle.query(
                        "progress", result_type=IngestProgress, rpc_timeout=timedelta(seconds=3)
                    )
                    bar.update(
                        task,
                        completed=p.seen,
                        description=summary_counts(p.ingested, p.unchanged, p.failed),
                        count=progress_count(p),
                    )
                except Exception:  # no worker yet, or between continue-as-new runs
                    pass
                if notices is not None:
                    await notices.check(handle)
                await asyncio.wait([result_task], timeout=0.5)
        finally:
            if not result_task.done():
                result_task.cancel()
        result = result_task.result()
        bar.update(
            task,
            total=result.seen,
            completed=result.seen,
            description=summary_counts(result.ingested, result.unchanged, result.failed),
            count=f"{result.seen}/{result.seen} objects",
        )
    return result


def summary_counts(ingested: int, unchanged: int, failed: int) -> str:
    return f"ingested {ingested} unchanged {unchanged} failed {failed}"


def print_summary(result: IngestResult, console: Console) -> None:
    console.print(
        f"[bold]tenant {result.tenant}[/bold] index v{result.index_version}: "
        f"[green]{result.ingested} ingested[/green], {result.unchanged} unchanged, "
        f"[red]{result.failed} failed[/red] ({result.vectors} vectors written)"
        + (
            f", {result.retagged} retagged (unchanged, given the new tags without encoding)"
            if result.retagged
            else ""
        )
        + (
            f", {result.skipped} skipped (forgotten; `mmrag ingest --allow-forgotten` "
            "re-ingests them)"
            if result.skipped
            else ""
        )
    )
    print_failures(result.failures, result.failed, console, "see the audit log")


def result_json(result: IngestResult) -> str:
    return json.dumps(asdict(result), indent=2)
