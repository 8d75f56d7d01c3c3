"""Execute ``Ask`` from Python and render its answer for a terminal.

What a person types is checked here, before any workflow starts, so a typo is one line
that says what to write instead (``--top-k 0``, ``media_type=image/jpg``, an empty
``--image`` file), never an Ask that quietly asks something else.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import uuid
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypedDict

from rich.console import Console
from temporalio.client import Client, WorkflowHandle
from temporalio.service import RPCError

from activities.media.formats import (
    AVI,
    JPEG,
    MATROSKA,
    PDF,
    QUICKTIME,
    SUPPORTED_TYPES,
    TIFF,
)
from activities.store.objects import normalize_uri
from settings import Settings
from starters.display import display_uri, printable
from starters.waiting import Notices, Unserved, live_pollers, result_with_notices
from workflows.contracts import (
    ASK_WORKFLOW,
    INGESTED,
    MAX_INLINE_IMAGE_BYTES,
    QUERY_TASK_QUEUE,
    TASK_QUEUE,
    AskFilters,
    AskInput,
    AskResult,
)
from workflows.priorities import start_priority

FILTER_KEYS = (
    "media_type=, created_after=, created_before= (ISO date or epoch), tag.KEY=, asset_id="
)
#: Media type spellings people write for the ones the index stores (what a file's bytes
#: are sniffed as, so ``image/jpg`` would match nothing).
MEDIA_TYPE_ALIASES = {
    "image/jpg": JPEG,
    "image/pjpeg": JPEG,
    "image/tif": TIFF,
    "video/mov": QUICKTIME,
    "video/avi": AVI,
    "video/mkv": MATROSKA,
    "application/x-pdf": PDF,
}
#: ``--queue auto``: an Ask the query queue has not taken within this long is asked on the
#: main queue, even while a query worker is listed (it may be busy, or gone on another host
#: and still listed for up to ``POLLER_FRESH_S``).
REROUTE_AFTER_S = 5.0
#: An Ask still running after this long says what runs (Asks answer in well under a second
#: when warm; the first after a start loads the model and opens the index).
SAY_RUNNING_AFTER_S = 5.0
#: An Ask the CLI starts ends within this long whatever happens (no worker ever comes, an
#: LLM hangs): nobody is left waiting for its answer by then.
ASK_RUN_TIMEOUT = timedelta(minutes=10)


def check_top_k(top_k: int) -> int:
    if top_k < 1:
        raise ValueError(
            f"--top-k {top_k}: give the number of sources to return, 1 or more (default 5; "
            "the workers cap it at their MMRAG_MAX_TOP_K)"
        )
    return top_k


def check_media_type(value: str) -> str:
    """``value`` when the index can hold it, else a ``ValueError`` naming the right one."""
    if value in SUPPORTED_TYPES:
        return value
    alias = MEDIA_TYPE_ALIASES.get(value.strip().lower())
    if alias:
        raise ValueError(f"--filter media_type={value}: write media_type={alias}")
    raise ValueError(
        f"--filter media_type={value} is not a type mmrag indexes: use one of "
        + ", ".join(sorted(SUPPORTED_TYPES))
    )


def parse_filters(values: list[str]) -> AskFilters:
    """``--filter`` values -> structured filters; a typo is a user error, not a query."""
    filters = AskFilters()
    for value in values:
        key, sep, val = value.partition("=")
        if not sep:
            raise ValueError(f"--filter {value!r}: write KEY=VALUE with KEY one of {FILTER_KEYS}")
        if key == "media_type":
            filters.media_types.append(check_media_type(val))
        elif key in ("created_after", "created_before"):
            setattr(filters, key, _epoch(val))
        elif key.startswith("tag.") and len(key) > 4:
            filters.tags[key[4:]] = val
        elif key == "asset_id":
            filters.asset_ids.append(val)
        else:
            raise ValueError(f"--filter {key!r} is not a filter: use {FILTER_KEYS}")
    return filters


def _epoch(value: str) -> int:
    if value.isdigit():
        return int(value)
    try:
        return int(datetime.fromisoformat(value).timestamp())
    except ValueError as e:
        raise ValueError(f"{value!r} is neither an ISO date (2026-01-31) nor epoch seconds") from e


class ImageFields(TypedDict, total=False):
    image_uri: str
    image_base64: str


def image_fields(image: str) -> ImageFields:
    """A local image goes inline, downscaled when it is large (the encoder sees 224 px; a
    worker reads only inside its storage roots, and a query image needs no root); a URI is
    passed on as it is and must lie in the tenant's roots. A local file that is missing,
    unreadable or empty is refused here: it would reach the workflow as no image at all."""
    if not image:
        return {}
    if "://" in image:
        return {"image_uri": normalize_uri(image)}
    path = Path(image).expanduser()
    shown = printable(str(path))
    if not path.exists():
        raise ValueError(
            f"--image {shown}: no such file; give a local image file or a file:// or gs:// URI"
        )
    if not path.is_file():
        raise ValueError(f"--image {shown} is not a file; give an image file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"--image {shown} cannot be read ({e.strerror or e})") from e
    if not data:
        raise ValueError(f"--image {shown} is empty (0 bytes); give an image file")
    if len(data) > MAX_INLINE_IMAGE_BYTES:
        data = _downscaled_jpeg(data)
    return {"image_base64": base64.b64encode(data).decode()}


def _downscaled_jpeg(data: bytes, side: int = 768) -> bytes:
    """The image at most ``side`` px on its longer side, as a JPEG under the inline limit.
    Bytes that are not an image go as they are: the worker says what is wrong with them."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as opened:
            image = ImageOps.exif_transpose(opened).convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        return data
    image.thumbnail((side, side))
    for quality in (90, 80, 65, 50):
        out = io.BytesIO()
        image.save(out, "JPEG", quality=quality)
        if out.tell() <= MAX_INLINE_IMAGE_BYTES:
            return out.getvalue()
    image.thumbnail((side // 2, side // 2))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=50)
    return out.getvalue()


async def query_worker_polling(client: Client, queue: str = QUERY_TASK_QUEUE) -> bool:
    """Whether a query worker (``mmrag worker --role query``) polls ``queue`` now: a live
    poller by :func:`starters.waiting.live_pollers`' rules (recent, and not a dead pid of
    this host). An Ask started on a queue nobody polls would wait, not fail."""
    return bool(await live_pollers(client, queue))


async def ask_task_queue(client: Client, queue: str = "auto") -> str:
    """The queue to start an Ask on: ``auto`` takes the query queue when a query worker
    polls it (one cross-queue hop fewer), else the main queue every deployment serves."""
    if queue != "auto":
        return queue
    return QUERY_TASK_QUEUE if await query_worker_polling(client) else TASK_QUEUE


async def start_ask(
    client: Client, inp: AskInput, task_queue: str = TASK_QUEUE
) -> WorkflowHandle[Any, AskResult]:
    return await client.start_workflow(
        ASK_WORKFLOW,
        inp,
        id=f"ask/{inp.tenant}/{uuid.uuid4().hex}",
        task_queue=task_queue,
        result_type=AskResult,
        static_summary=f"ask for tenant {inp.tenant}",
        execution_timeout=ASK_RUN_TIMEOUT,
        priority=start_priority(ASK_WORKFLOW),
    )


async def _terminate(handle: WorkflowHandle[Any, Any], reason: str) -> None:
    with contextlib.suppress(RPCError):  # already closed: nothing to stop
        await handle.terminate(reason=reason)


async def ask(
    client: Client,
    inp: AskInput,
    task_queue: str = TASK_QUEUE,
    *,
    say: Callable[[str], None] | None = None,
    fallback_queue: str = "",
) -> AskResult:
    """Run an Ask and return its result.

    With ``say``, what the Ask waits for is said meanwhile (no worker on its queue, a step
    retrying). With ``fallback_queue``, an Ask whose first task no worker takes on
    ``task_queue`` (none live, or none within ``REROUTE_AFTER_S``) is terminated and asked
    again there (``--queue auto``: from the query queue to the main queue). If the caller stops
    waiting (Ctrl+C), the Ask is terminated: nobody is left to read its answer."""
    handle = await start_ask(client, inp, task_queue)
    if say is None and not fallback_queue:
        return await handle.result()
    current = handle

    async def reroute(
        unserved_run: WorkflowHandle[Any, Any], unserved: Unserved
    ) -> WorkflowHandle[Any, Any] | None:
        nonlocal current
        if not fallback_queue or unserved.queue == fallback_queue:
            return None
        if unserved.pollers and unserved.waited_s < REROUTE_AFTER_S:
            return None  # a live query worker may take it in a moment
        await _terminate(
            unserved_run, f"no worker took it on {unserved.queue}; asked on {fallback_queue}"
        )
        if say is not None:
            say(f"no worker took the Ask on {unserved.queue}; asking on {fallback_queue}")
        current = await start_ask(client, inp, fallback_queue)
        return current

    notices = Notices(client, say or (lambda _text: None), running_after_s=SAY_RUNNING_AFTER_S)
    try:
        result: AskResult = await result_with_notices(handle, notices, reroute)
        return result
    except asyncio.CancelledError:
        await asyncio.shield(_terminate(current, "the caller stopped waiting (Ctrl+C)"))
        raise


def print_answer(result: AskResult, console: Console) -> None:
    console.print(result.answer, highlight=False, markup=False)
    if result.degraded:
        console.print(f"[yellow]degraded:[/yellow] {result.degraded_reason}")
    for s in result.sources:
        where = "" if s.chunk == "image" else f" ({s.chunk})"
        console.print(
            f"  [{s.id}] {s.score:.3f}  {display_uri(s.uri)}{where}",
            highlight=False,
            markup=False,
        )
    stages = ", ".join(f"{k} {v:.0f} ms" for k, v in result.stage_ms.items())
    console.print(
        f"[dim]{result.answer_kind} answer in {result.latency_ms:.0f} ms ({stages}); "
        f"index v{result.index_version}, encoder {result.encoder_model}"
        f"{', LLM ' + result.llm_model if result.llm_model else ''}[/dim]"
    )


def tenants_with_content(settings: Settings, limit: int = 10) -> dict[str, int]:
    """Tenant -> indexed assets, largest first, from the registry (the database owner's
    URL: an operator's view across tenants). Raises when the database cannot be reached."""
    from sqlalchemy import func, select
    from sqlalchemy.orm import Session

    from activities.store import registry
    from activities.store.orm import Asset

    engine = registry.get_engine(settings.database_endpoint())
    try:
        with Session(engine) as session:
            count = func.count().label("n")
            rows = session.execute(
                select(Asset.tenant, count)
                .where(Asset.status == INGESTED)
                .group_by(Asset.tenant)
                .order_by(count.desc(), Asset.tenant)
                .limit(limit)
            ).all()
    finally:
        engine.dispose()
    return {str(tenant): int(n) for tenant, n in rows}


def result_json(result: AskResult) -> str:
    return json.dumps(asdict(result), indent=2)
