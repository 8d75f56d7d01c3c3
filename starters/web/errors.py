"""Errors as JSON with one clear message: ``{"error": "..."}`` and the HTTP status.

A malformed body gets one line naming the first field that is wrong and what it must be
(FastAPI's default is a list of pydantic records); a run that failed for the caller's
reason (a bad filter, a refused credential) gets that reason; anything else is a bug,
logged with its traceback and answered with a line that says where to look, never the
exception's text (which can hold a URI or a connection string).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError, FailureError
from temporalio.service import RPCError, RPCStatusCode

from workers.auth import UNAUTHORIZED

log = logging.getLogger("mmrag.web")


#: Seconds a 503 asks the caller to wait (``Retry-After``): a restarting server is back in a
#: few seconds; a caller that retries sooner only adds load.
RETRY_AFTER_S = 5
TEMPORAL_DOWN = (
    "Temporal did not answer: its server is down or unreachable from mmrag serve; retry in a "
    "few seconds (Retry-After), and if it lasts, the operator should check Temporal "
    "(`mmrag stack status`, TEMPORAL_ADDRESS)"
)
_POSTGRES = (
    "the database (Postgres) did not answer; retry in a few seconds (Retry-After), and if it "
    "lasts, the operator should check Postgres (`mmrag stack status`)"
)
DATABASE_DOWN = _POSTGRES[0].upper() + _POSTGRES[1:]
KEY_UNCHECKED = "the API key cannot be checked now: " + _POSTGRES
#: Temporal's answers that refuse the call itself (a bug or a misconfiguration, not an
#: outage): 502; every other RPC failure (unavailable, deadline, ...) is an outage: 503.
_REFUSED = {
    RPCStatusCode.INVALID_ARGUMENT,
    RPCStatusCode.NOT_FOUND,
    RPCStatusCode.ALREADY_EXISTS,
    RPCStatusCode.PERMISSION_DENIED,
    RPCStatusCode.UNAUTHENTICATED,
    RPCStatusCode.FAILED_PRECONDITION,
    RPCStatusCode.UNIMPLEMENTED,
}


class ApiError(Exception):
    """Answered as ``status`` with ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Any:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def unavailable(message: str) -> Any:
    return error_response(503, message, {"Retry-After": str(RETRY_AFTER_S)})


def database_down(exc: BaseException) -> bool:
    """Whether a database error means Postgres did not answer (refused, reset, timed out),
    not that a statement was wrong."""
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


@asynccontextmanager
async def temporal_answers(timeout_s: float, what: str) -> AsyncIterator[None]:
    """Temporal calls in this block answer within ``timeout_s``
    (``MMRAG_WEB_TEMPORAL_TIMEOUT_S``) or the request is a 503. The SDK retries an
    unreachable server for a while by itself; this bounds the wait, so a request never
    outlives its caller's timeout and the server's slots are not held by an outage."""
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except TimeoutError:
        log.warning("%s: Temporal did not answer within %g s", what, timeout_s)
        raise ApiError(503, TEMPORAL_DOWN) from None


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
        if exc.status == 503:
            return unavailable(exc.message)
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
        if exc.status in _REFUSED:
            refused = f"Temporal refused the call ({exc.status.name})"
            return error_response(502, f"{refused}: the server log has the details")
        return unavailable(TEMPORAL_DOWN)

    @app.exception_handler(DBAPIError)
    async def database_error(request: Request, exc: DBAPIError) -> Any:
        if not database_down(exc):
            return await bug(request, exc)
        # The driver's text can name the host and login: never in the answer, once in the log.
        log.warning("%s %s: the database did not answer", request.method, request.url.path)
        return unavailable(DATABASE_DOWN)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> Any:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal error: the server log has the details")
