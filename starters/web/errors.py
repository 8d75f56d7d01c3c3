"""Errors as JSON with one clear message: ``{"error": "..."}`` and the HTTP status.

A malformed body gets one line naming the first field that is wrong and what it must be
(FastAPI's default is a list of pydantic records); a run that failed for the caller's
reason (a bad filter, a refused credential) gets that reason; anything else is a bug,
logged with its traceback and answered with a line that says where to look, never the
exception's text (which can hold a URI or a connection string).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError, FailureError
from temporalio.service import RPCError

from workers.auth import UNAUTHORIZED

log = logging.getLogger("mmrag.web")


class ApiError(Exception):
    """Answered as ``status`` with ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Any:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def validation_message(exc: RequestValidationError) -> str:
    """The first problem of a request, as one line: where, and what is wrong."""
    errors = exc.errors()
    if not errors:
        return "the request is malformed"
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
    kind = first.get("type", "")
    if kind == "json_invalid":
        return "the body is not valid JSON: send a JSON object (Content-Type: application/json)"
    if kind == "extra_forbidden":
        return f"unknown field {where!r}: see /docs for the fields this endpoint takes"
    if kind == "missing":
        return f"{where or 'the body'} is required: see /docs"
    return f"{where or 'the body'}: {first.get('msg', 'invalid')}"


def run_failure(exc: WorkflowFailureError) -> tuple[int, str]:
    """The status and message of a failed run: the innermost application error's."""
    app: ApplicationError | None = None
    cause: BaseException | None = exc.cause
    while cause is not None:
        if isinstance(cause, ApplicationError):
            app = cause
        cause = cause.cause if isinstance(cause, FailureError) else None
    if app is None:
        return 502, f"the run failed: {exc.cause}"
    message = str(app.message).strip().splitlines()[0] if app.message else "the run failed"
    if app.type == UNAUTHORIZED:
        return 403, message
    return (400 if app.non_retryable else 502), message


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> Any:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(exc.status, exc.message, headers)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> Any:
        message = exc.detail if isinstance(exc.detail, str) else "the request was refused"
        if exc.status_code == 404 and message == "Not Found":
            message = "no such endpoint: see /docs"
        if exc.status_code == 405:
            message = "this endpoint does not take that method: see /docs"
        return error_response(exc.status_code, message, dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> Any:
        return error_response(400, validation_message(exc))

    @app.exception_handler(WorkflowFailureError)
    async def failed_run(_request: Request, exc: WorkflowFailureError) -> Any:
        status, message = run_failure(exc)
        return error_response(status, message)

    @app.exception_handler(RPCError)
    async def temporal_down(request: Request, exc: RPCError) -> Any:
        log.warning("%s %s: Temporal answered %s", request.method, request.url.path, exc.status)
        return error_response(503, "Temporal did not answer: try again shortly")

    @app.exception_handler(OperationalError)
    async def database_down(request: Request, exc: OperationalError) -> Any:
        log.warning("%s %s: the database is unreachable", request.method, request.url.path)
        return error_response(503, "the database did not answer: try again shortly")

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> Any:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal error: the server log has the details")
