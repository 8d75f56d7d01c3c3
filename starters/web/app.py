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
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI

from settings import Settings, get_settings
from starters.web.errors import install_error_handlers
from starters.web.limits import BodyLimits, DeadlineH11Protocol
from starters.web.page import mount_page
from starters.web.routes import router
from starters.web.state import WebState
from workflows.contracts import CONTRACT_VERSION

log = logging.getLogger("mmrag.web")


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
