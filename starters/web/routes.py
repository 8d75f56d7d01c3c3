"""The HTTP API, version 1: every ask, ingest and forget is a workflow started with the
key's own credential (starters/web/credentials.py), so the workers audit and check it.

Bodies are the public contract (workflows/contracts.py) as JSON, less ``tenant``: the key
decides the tenant. A body that names another tenant is refused (403) and audited; an
asset, preview or ingest of another tenant is not found (404, the same answer as for an id
that exists nowhere) and audited.

One module of ~520 lines: the endpoints of one API version, which share the key, role and
tenant checks (``api_key``, ``role``, ``contract_input``) that must read the same everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import time
import typing
from datetime import timedelta
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, File, Form, Header, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, create_model
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError
from temporalio.service import RPCError, RPCStatusCode

from activities.media.formats import SUPPORTED_TYPES, BadMediaError
from activities.media.preview import MAX_SIDE, MIN_SIDE, BadLocatorError
from activities.store.objects import ObjectMissingError, UnsupportedUriError, worker_uri
from activities.store.orm import Asset
from activities.store.roots import OutsideRootsError
from starters.ask import start_ask
from starters.display import display_uri
from starters.ingest import start_ingest
from starters.lifecycle import start_forget
from starters.web import audit, uploads
from starters.web.credentials import acting_as
from starters.web.errors import (
    KEY_UNCHECKED,
    ApiError,
    database_down,
    run_failure,
    temporal_answers,
)
from starters.web.keys import ApiKey
from starters.web.previews import PreviewNotFound
from starters.web.state import WebState, web_state
from workers.auth import READER, ROLES, WRITER
from workflows.contracts import (
    MAX_INLINE_IMAGE_BYTES,
    AskInput,
    AskResult,
    ForgetInput,
    IngestProgress,
    IngestResult,
)

router = APIRouter(prefix="/v1")
_INGEST_ID = re.compile(r"^[0-9a-f]{16}$")
_ASSET_ID = re.compile(r"^[0-9a-f]{1,64}$")
MAX_SOURCES = 100
MAX_PAGE = 100


# -- request bodies: the contract's dataclasses, less the tenant ------------------------------
def request_model(contract: type, name: str, doc: str) -> type[BaseModel]:
    """A pydantic model of ``contract``'s fields (``tenant`` optional: the key's), refusing
    unknown fields, so the API follows the contract as fields are added to it."""
    hints = typing.get_type_hints(contract)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(contract):
        if f.name == "tenant":
            fields[f.name] = (str, Field("", description="optional: must be the key's tenant"))
        elif f.default is not dataclasses.MISSING:
            fields[f.name] = (hints[f.name], f.default)
        elif f.default_factory is not dataclasses.MISSING:
            fields[f.name] = (hints[f.name], Field(default_factory=f.default_factory))
        else:
            fields[f.name] = (hints[f.name], ...)
    model: type[BaseModel] = create_model(  # type: ignore[call-overload]
        name, __config__=ConfigDict(extra="forbid"), __doc__=doc, **fields
    )
    return model


AskRequest = request_model(AskInput, "AskRequest", "The Ask contract (docs/contract.md).")
ForgetRequest = request_model(ForgetInput, "ForgetRequest", "The Forget contract.")


class IngestRequest(BaseModel):
    """Folders, prefixes or objects to ingest, inside the tenant's storage roots."""

    model_config = ConfigDict(extra="forbid")
    sources: list[str] = Field(min_length=1, max_length=MAX_SOURCES)
    tags: dict[str, str] = Field(default_factory=dict)
    force: bool = False
    allow_forgotten: bool = False


def plain(value: Any) -> Any:
    """A contract dataclass as JSON-ready dicts and lists. ``dataclasses.asdict`` deep-copies
    every leaf (``copy.deepcopy`` per string and number): a third of an Ask's own time in
    the server; the leaves here are immutable, so they are shared instead."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


# -- who is asking ----------------------------------------------------------------------------
async def api_key(
    request: Request,
    authorization: Annotated[str, Header(description="Bearer <API key>")] = "",
    x_api_key: Annotated[str, Header(description="or the key alone")] = "",
) -> ApiKey:
    scheme, _, token = authorization.partition(" ")
    presented = token.strip() if scheme.lower() == "bearer" else x_api_key.strip()
    if not presented:
        raise ApiError(
            401,
            "an API key is required: send 'Authorization: Bearer <key>' (`mmrag apikey create`)",
        )
    keys = web_state(request).keys
    known, key = keys.remembered(presented)
    if not known:
        try:
            key = await asyncio.to_thread(keys.verify, presented)
        except DBAPIError as e:
            if not database_down(e):
                raise
            # Never accepted unchecked: only keys verified within MMRAG_WEB_KEY_CACHE_S
            # (remembered above) are served while Postgres is away.
            raise ApiError(503, KEY_UNCHECKED) from None
    if key is None:
        raise ApiError(
            401, "the API key is unknown or revoked: create one with `mmrag apikey create`"
        )
    return key


def role(needed: str) -> Any:
    async def check(key: Annotated[ApiKey, Depends(api_key)]) -> ApiKey:
        if ROLES.index(key.role) < ROLES.index(needed):
            raise ApiError(
                403, f"this needs a {needed} key; this key is a {key.role} key of {key.tenant!r}"
            )
        return key

    return Depends(check)


Reader = Annotated[ApiKey, role(READER)]
Writer = Annotated[ApiKey, role(WRITER)]


async def current_state(request: Request) -> WebState:
    """The server's state as a dependency. Async on purpose: FastAPI runs a plain ``def``
    dependency in its thread pool, a thread hop on every request (bench/http.py)."""
    return web_state(request)


State = Annotated[WebState, Depends(current_state)]


async def contract_input(state: WebState, key: ApiKey, body: BaseModel, contract: type) -> Any:
    """The workflow input for ``key``'s tenant; a body naming another tenant is refused."""
    claimed = getattr(body, "tenant", "")
    if claimed and claimed != key.tenant:
        await asyncio.to_thread(
            audit.refused, state.engine, key, contract.__name__, "another tenant", tenant=claimed
        )
        raise ApiError(403, f"this key is for tenant {key.tenant!r}, not {claimed!r}")
    # The model has checked every field (nested dataclasses come out as instances).
    values = {f.name: getattr(body, f.name) for f in dataclasses.fields(contract)}
    return contract(**{**values, "tenant": key.tenant})


# -- ask --------------------------------------------------------------------------------------
@router.post("/ask", summary="Ask: retrieve sources and (optionally) a cited answer")
async def ask(body: AskRequest, key: Reader, state: State, request: Request) -> JSONResponse:  # type: ignore[valid-type]
    """Runs the ``Ask`` workflow and returns its result. ``generate: false`` returns the
    sources (and an extractive answer) without the LLM: the page shows those first."""
    inp: AskInput = await contract_input(state, key, body, AskInput)
    if inp.image_base64 and len(inp.image_base64) > MAX_INLINE_IMAGE_BYTES * 4 // 3 + 4:
        raise ApiError(
            413,
            f"image_base64 is over {MAX_INLINE_IMAGE_BYTES} bytes: send a smaller image (the "
            "encoder sees 224 px) or an image_uri inside the tenant's storage roots",
        )
    if not (inp.text.strip() or inp.image_base64 or inp.image_uri):
        raise ApiError(400, "ask something: give text, image_base64 or image_uri")
    started = time.perf_counter()
    async with temporal_answers(state.settings.web_temporal_timeout_s, "ask"):
        queue = await state.ask_queue()
        with acting_as(key):
            handle = await start_ask(state.client, inp, queue)
    request.state.temporal_start_ms = (time.perf_counter() - started) * 1000
    try:
        # asyncio.timeout, not wait_for: no second task (and loop turn) per Ask.
        async with asyncio.timeout(state.settings.web_ask_timeout_s):
            result: AskResult = await handle.result()
        request.state.temporal_ms = (time.perf_counter() - started) * 1000
    except TimeoutError:
        with contextlib.suppress(RPCError):
            await handle.terminate(reason="the HTTP caller's deadline passed")
        raise ApiError(
            504,
            f"no answer within {state.settings.web_ask_timeout_s:g} s (MMRAG_WEB_ASK_TIMEOUT_S); "
            "are the workers running?",
        ) from None
    out = plain(result)
    for source in out["sources"]:
        source["display"] = display_uri(source["uri"])
        locator = quote(source["chunk"], safe=":")
        source["preview"] = f"/v1/assets/{source['asset_id']}/preview?locator={locator}"
    out["workflow_id"] = handle.id
    out["run_id"] = handle.result_run_id or ""
    out["web_ui"] = state.run_link(handle.id, out["run_id"])
    return JSONResponse(out)  # already plain JSON: no second encoding pass (bench/http.py)


# -- ingest -----------------------------------------------------------------------------------
def _ingest_id(workflow_id: str) -> str:
    return workflow_id.rsplit("/", 1)[-1]


def _started(state: WebState, handle: Any) -> dict[str, Any]:
    return {
        "id": _ingest_id(handle.id),
        "workflow_id": handle.id,
        "web_ui": state.run_link(handle.id),
        "status_url": f"/v1/ingest/{_ingest_id(handle.id)}",
    }


@router.post("/ingest", status_code=202, summary="Ingest folders, prefixes or objects")
async def ingest(body: IngestRequest, key: Writer, state: State) -> dict[str, Any]:
    """Starts ``IngestBatch`` (the same sources, tags and flags attach to the running one).
    Sources are ``file://`` / ``gs://`` URIs or absolute paths inside the tenant's storage
    roots; the workers refuse anything else."""
    try:
        sources = [worker_uri(s) for s in body.sources]
    except UnsupportedUriError as e:
        raise ApiError(400, str(e)) from None
    async with temporal_answers(state.settings.web_temporal_timeout_s, "ingest"):
        with acting_as(key):
            handle = await start_ingest(
                state.client,
                key.tenant,
                sources,
                tags=body.tags,
                force=body.force,
                allow_forgotten=body.allow_forgotten,
            )
    return _started(state, handle)


@router.post("/ingest/uploads", status_code=202, summary="Upload files and ingest them")
async def ingest_uploads(
    key: Writer,
    state: State,
    files: Annotated[list[UploadFile], File(description="images, PDFs, videos")],
    tags: Annotated[list[str], Form(description="KEY=VALUE, repeatable")] = [],  # noqa: B006
) -> dict[str, Any]:
    """Stores the files in the tenant's upload folder (a storage root of that tenant only)
    and ingests that folder. File names are reduced to a safe form; sizes are limited."""
    settings = state.settings
    if len(files) > settings.web_max_upload_files:
        raise ApiError(
            413,
            f"{len(files)} files: at most {settings.web_max_upload_files} per request "
            "(MMRAG_WEB_MAX_UPLOAD_FILES)",
        )
    parsed = {}
    for tag in tags:
        k, sep, v = tag.partition("=")
        if not sep or not k:
            raise ApiError(400, f"tag {tag[:80]!r}: write tags as KEY=VALUE")
        parsed[k] = v

    def store() -> str:
        uploads.register_upload_root(settings.state_dir, state.upload_base, key.tenant)
        folder = uploads.new_batch(state.upload_base, key.tenant)
        for upload in files:
            uploads.store_file(
                folder, upload.filename or "", upload.file, settings.web_max_file_bytes
            )
        return folder.as_uri()

    try:
        folder = await asyncio.to_thread(store)
    except uploads.UploadTooLarge as e:
        raise ApiError(413, str(e)) from None
    async with temporal_answers(settings.web_temporal_timeout_s, "upload ingest"):
        with acting_as(key):
            handle = await start_ingest(state.client, key.tenant, [folder], tags=parsed)
    return {**_started(state, handle), "files": len(files)}


_STATUS = {
    WorkflowExecutionStatus.RUNNING: "running",
    WorkflowExecutionStatus.COMPLETED: "done",
    WorkflowExecutionStatus.FAILED: "failed",
    WorkflowExecutionStatus.CANCELED: "canceled",
    WorkflowExecutionStatus.TERMINATED: "terminated",
    WorkflowExecutionStatus.TIMED_OUT: "timed_out",
    WorkflowExecutionStatus.CONTINUED_AS_NEW: "running",
}


def _failures(result: IngestResult) -> list[dict[str, str]]:
    return [
        {"uri": f.uri, "display": display_uri(f.uri), "reason": f.reason} for f in result.failures
    ]


@router.get("/ingest/{ingest_id}", summary="An ingest's progress, counts and failures")
async def ingest_status(ingest_id: str, key: Reader, state: State) -> dict[str, Any]:
    """Asks the workflow itself (its ``progress`` query while it runs, its result after),
    so the answer survives a restart of this server."""
    workflow_id = f"ingest-batch/{key.tenant}/{ingest_id}"
    if not _INGEST_ID.match(ingest_id):
        raise ApiError(404, "no ingest with this id for this key's tenant")
    handle = state.client.get_workflow_handle(workflow_id, result_type=IngestResult)
    try:
        async with temporal_answers(state.settings.web_temporal_timeout_s, "ingest status"):
            described = await handle.describe()
    except RPCError as e:
        if e.status != RPCStatusCode.NOT_FOUND:
            raise
        await asyncio.to_thread(
            audit.refused, state.engine, key, "ingest status", "no such ingest in the key's tenant"
        )
        raise ApiError(404, "no ingest with this id for this key's tenant") from None
    status = _STATUS.get(described.status or WorkflowExecutionStatus.RUNNING, "running")
    out: dict[str, Any] = {
        "id": ingest_id,
        "workflow_id": workflow_id,
        "run_id": described.run_id,
        "status": status,
        "progress": None,
        "result": None,
        "failures": [],
        "error": "",
        "web_ui": state.run_link(workflow_id, described.run_id),
    }
    if status == "running":
        with contextlib.suppress(RPCError, asyncio.TimeoutError):
            progress = await handle.query(
                "progress", result_type=IngestProgress, rpc_timeout=timedelta(seconds=3)
            )
            out["progress"] = plain(progress)
    elif status == "done":
        async with temporal_answers(state.settings.web_temporal_timeout_s, "ingest result"):
            result = await handle.result()
        out["result"] = {k: v for k, v in plain(result).items() if k != "failures"}
        out["failures"] = _failures(result)
    else:
        out["error"] = f"the ingest {status.replace('_', ' ')}: see its run in the Web UI"
        if status == "failed":
            try:
                async with temporal_answers(state.settings.web_temporal_timeout_s, "ingest"):
                    await handle.result()
            except WorkflowFailureError as e:
                out["error"] = run_failure(e)[1]
    return out


# -- forget -----------------------------------------------------------------------------------
@router.post("/forget", summary="Forget an asset, a URI prefix or a tag match")
async def forget(body: ForgetRequest, key: Writer, state: State) -> dict[str, Any]:  # type: ignore[valid-type]
    """Runs ``Forget`` and returns its result."""
    inp: ForgetInput = await contract_input(state, key, body, ForgetInput)
    if not (inp.asset_id or inp.uri_prefix or inp.tags):
        raise ApiError(400, "say what to forget: asset_id, uri_prefix or tags")
    async with temporal_answers(state.settings.web_temporal_timeout_s, "forget"):
        with acting_as(key):
            handle = await start_forget(state.client, inp)
    result = await asyncio.wait_for(handle.result(), state.settings.web_ask_timeout_s)
    return {**plain(result), "workflow_id": handle.id, "web_ui": state.run_link(handle.id)}


# -- assets -----------------------------------------------------------------------------------
_STATUSES = ("ingested", "failed", "forgotten", "any")


@router.get("/assets", summary="The tenant's registry, paged and filtered")
async def assets(
    key: Reader,
    state: State,
    media_type: Annotated[list[str], Query()] = [],  # noqa: B006
    tag: Annotated[list[str], Query(description="KEY=VALUE, repeatable")] = [],  # noqa: B006
    status: str = "ingested",
    created_after: int = 0,
    created_before: int = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    cursor: str = "",
) -> dict[str, Any]:
    """Assets ordered by id; ``next_cursor`` fetches the next page ("" on the last)."""
    for mt in media_type:
        if mt not in SUPPORTED_TYPES:
            raise ApiError(
                400,
                f"media_type {mt[:64]!r} is not indexed: use one of "
                + ", ".join(sorted(SUPPORTED_TYPES)),
            )
    if status not in _STATUSES:
        raise ApiError(400, f"status {status[:32]!r}: use one of {', '.join(_STATUSES)}")
    tags = {}
    for t in tag:
        k, sep, v = t.partition("=")
        if not sep or not k:
            raise ApiError(400, f"tag {t[:80]!r}: write tags as KEY=VALUE")
        tags[k] = v
    query = select(Asset).where(Asset.tenant == key.tenant)
    if status != "any":
        query = query.where(Asset.status == status)
    if media_type:
        query = query.where(Asset.media_type.in_(media_type))
    if tags:
        query = query.where(Asset.tags.contains(tags))
    if created_after:
        query = query.where(Asset.object_created_at >= created_after)
    if created_before:
        query = query.where(Asset.object_created_at < created_before)
    if cursor:
        query = query.where(Asset.asset_id > cursor)
    query = query.order_by(Asset.asset_id).limit(limit + 1)

    def read() -> list[Asset]:
        with Session(state.engine) as session:
            return list(session.execute(query).scalars())

    rows = await asyncio.to_thread(read)
    page = rows[:limit]
    return {
        "assets": [
            {
                "asset_id": a.asset_id,
                "uri": a.uri,
                "display": display_uri(a.uri),
                "media_type": a.media_type,
                "status": a.status,
                "reason": a.reason,
                "chunks": a.chunks,
                "tags": a.tags,
                "size_bytes": a.size_bytes,
                "created_at": a.object_created_at,
                "updated_at": a.updated_at.isoformat() if a.updated_at else "",
            }
            for a in page
        ],
        "next_cursor": page[-1].asset_id if len(rows) > limit else "",
    }


@router.get(
    "/assets/{asset_id}/preview",
    summary="A thumbnail of an image, a PDF page or a video frame",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}}},
)
async def preview(
    asset_id: str,
    key: Reader,
    state: State,
    request: Request,
    locator: str = "image",
    size: Annotated[int, Query(ge=MIN_SIDE, le=MAX_SIDE)] = 256,
) -> Response:
    """A JPEG at most ``size`` px on its longer side, rendered in the decoder sandbox."""
    try:
        if not _ASSET_ID.match(asset_id):
            raise PreviewNotFound(asset_id)
        shown = await state.previews.get(key.tenant, asset_id, locator, size)
    except PreviewNotFound:
        await asyncio.to_thread(
            audit.refused,
            state.engine,
            key,
            "preview",
            "no such asset in the key's tenant",
            asset_id=asset_id[:64],
        )
        raise ApiError(404, "no ingested asset with this id for this key's tenant") from None
    except BadLocatorError as e:
        raise ApiError(400, str(e)) from None
    except (ObjectMissingError, OutsideRootsError):
        raise ApiError(
            404, "the asset's object can no longer be read: it moved, or left the storage roots"
        ) from None
    except BadMediaError as e:
        raise ApiError(422, f"no preview: {e}") from None
    headers = {"ETag": shown.etag, "Cache-Control": "private, max-age=3600"}
    if request.headers.get("if-none-match") == shown.etag:
        return Response(status_code=304, headers=headers)
    return Response(shown.jpeg, media_type="image/jpeg", headers=headers)


# -- the key itself ---------------------------------------------------------------------------
@router.get("/me", summary="The key's tenant and role, and the Temporal Web UI")
async def me(key: Reader, state: State) -> dict[str, Any]:
    return {
        "tenant": key.tenant,
        "role": key.role,
        "key_id": key.key_id,
        "web_ui": state.run_link(""),
        "max_upload_bytes": state.settings.web_max_upload_bytes,
        "max_file_bytes": state.settings.web_max_file_bytes,
    }
