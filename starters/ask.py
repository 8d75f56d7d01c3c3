"""Execute ``Ask`` from Python and render its answer for a terminal."""

from __future__ import annotations

import base64
import io
import json
import time
import uuid
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import TypedDict

from rich.console import Console
from temporalio.client import Client

from activities.store.objects import normalize_uri
from workflows.contracts import (
    ASK_WORKFLOW,
    MAX_INLINE_IMAGE_BYTES,
    QUERY_TASK_QUEUE,
    TASK_QUEUE,
    AskFilters,
    AskInput,
    AskResult,
)

FILTER_KEYS = (
    "media_type=, created_after=, created_before= (ISO date or epoch), tag.KEY=, asset_id="
)


def parse_filters(values: list[str]) -> AskFilters:
    """``--filter`` values -> structured filters; a typo is a user error, not a query."""
    filters = AskFilters()
    for value in values:
        key, sep, val = value.partition("=")
        if not sep:
            raise ValueError(f"--filter {value!r}: write KEY=VALUE with KEY one of {FILTER_KEYS}")
        if key == "media_type":
            filters.media_types.append(val)
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
    passed on as it is and must lie in the tenant's roots."""
    if not image:
        return {}
    path = Path(image).expanduser()
    if "://" in image or not path.exists():
        return {"image_uri": normalize_uri(image)}
    data = path.read_bytes()
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
    """Whether a query worker (``mmrag worker --role query``) polls ``queue`` now.

    Temporal lists a poller for a few minutes after its last poll; one seen within the long
    poll's minute counts. An Ask started on a queue nobody polls would wait, not fail."""
    from temporalio.api.enums.v1 import TaskQueueType
    from temporalio.api.taskqueue.v1 import TaskQueue
    from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest

    response = await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace=client.namespace,
            task_queue=TaskQueue(name=queue),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
        )
    )
    now = time.time()
    return any(now - p.last_access_time.ToSeconds() < 70 for p in response.pollers)


async def ask_task_queue(client: Client, queue: str = "auto") -> str:
    """The queue to start an Ask on: ``auto`` takes the query queue when a query worker
    polls it (one cross-queue hop fewer), else the main queue every deployment serves."""
    if queue != "auto":
        return queue
    return QUERY_TASK_QUEUE if await query_worker_polling(client) else TASK_QUEUE


async def ask(client: Client, inp: AskInput, task_queue: str = TASK_QUEUE) -> AskResult:
    return await client.execute_workflow(
        ASK_WORKFLOW,
        inp,
        id=f"ask/{inp.tenant}/{uuid.uuid4().hex}",
        task_queue=task_queue,
        result_type=AskResult,
        static_summary=f"ask for tenant {inp.tenant}",
    )


def print_answer(result: AskResult, console: Console) -> None:
    console.print(result.answer, highlight=False, markup=False)
    if result.degraded:
        console.print(f"[yellow]degraded:[/yellow] {result.degraded_reason}")
    for s in result.sources:
        where = "" if s.chunk == "image" else f" ({s.chunk})"
        console.print(f"  [{s.id}] {s.score:.3f}  {s.uri}{where}", highlight=False, markup=False)
    stages = ", ".join(f"{k} {v:.0f} ms" for k, v in result.stage_ms.items())
    console.print(
        f"[dim]{result.answer_kind} answer in {result.latency_ms:.0f} ms ({stages}); "
        f"index v{result.index_version}, encoder {result.encoder_model}"
        f"{', LLM ' + result.llm_model if result.llm_model else ''}[/dim]"
    )


def result_json(result: AskResult) -> str:
    return json.dumps(asdict(result), indent=2)
