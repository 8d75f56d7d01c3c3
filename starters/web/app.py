"""``mmrag serve``: the app factory and the server.

:func:`create_app` builds the ASGI app (FastAPI): the ``/v1`` API (starters/web/routes.py),
OpenAPI at ``/docs`` (``/v1/openapi.json``), JSON errors (starters/web/errors.py), body
limits (starters/web/limits.py) and the page (starters/web/page.py). What it holds while
it runs (the Temporal client, the database engine, the preview sandbox) is opened at
start-up and closed at shutdown (starters/web/state.py). :func:`serve` runs it on uvicorn
with the slow-client deadlines and the connection cap.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from settings import Settings, get_settings
from starters.web.errors import install_error_handlers
from starters.web.limits import BodyLimits, DeadlineH11Protocol
from starters.web.page import mount_page
from starters.web.routes import router
from starters.web.state import WebState
from workflows.contracts import CONTRACT_VERSION

log = logging.getLogger("mmrag.web")


class ServerTiming:
    """ASGI middleware: ``Server-Timing: app;dur=MS, temporal;dur=MS`` on each response:
    the server's own time, and the part a handler spent waiting on Temporal (it adds
    ``temporal_ms`` to the request state), of which ``start`` was the start call.
    bench/http.py reads it to split the HTTP cost."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state = scope.setdefault("state", {})

        async def timed(message: Message) -> None:
            if message["type"] == "http.response.start":
                total = (time.perf_counter() - started) * 1000
                temporal = float(state.get("temporal_ms", 0.0))
                start = float(state.get("temporal_start_ms", 0.0))
                value = (
                    f"app;dur={total - temporal:.2f}, temporal;dur={temporal:.2f}, "
                    f"start;dur={start:.2f}"
                )
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"server-timing", value.encode())],
                }
            await send(message)

        await self.app(scope, receive, timed)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = await WebState.open(settings)
        app.state.web = state
        try:
            yield
        finally:
            await state.close()

    app = FastAPI(
        title="mmrag",
        summary="Durable multimodal RAG: ask, ingest, forget, browse and preview, per tenant",
        version=f"1 (contract {CONTRACT_VERSION})",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/v1/openapi.json",
    )
    install_error_handlers(app)
    app.include_router(router)
    mount_page(app)
    app.add_middleware(ServerTiming)
    app.add_middleware(
        BodyLimits,
        json_bytes=settings.web_max_body_bytes,
        upload_bytes=settings.web_max_upload_bytes,
        timeout_s=settings.web_request_timeout_s,
    )
    return app


def server(settings: Settings, host: str, port: int) -> uvicorn.Server:
    """The uvicorn server for the app (call ``.run()``; tests and the bench serve it too)."""
    DeadlineH11Protocol.header_timeout_s = settings.web_request_timeout_s
    config = uvicorn.Config(
        create_app(settings),
        host=host,
        port=port,
        http=DeadlineH11Protocol,
        limit_concurrency=settings.web_max_connections,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=10,
        log_level="info",
        server_header=False,
    )
    return uvicorn.Server(config)
