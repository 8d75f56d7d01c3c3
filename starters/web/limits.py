"""Request limits: body sizes, and deadlines for slow clients.

uvicorn reads headers for as long as a client trickles them (each byte re-arms nothing, and
its keep-alive timer is cancelled by any byte), and lets an app read a body for ever. So:

- :class:`DeadlineH11Protocol` closes a connection whose request line and headers have not
  all arrived ``MMRAG_WEB_REQUEST_TIMEOUT_S`` after it opened or after its last response;
- :class:`BodyLimits` (ASGI middleware) refuses a declared ``Content-Length`` over the
  path's limit before reading a byte (413), counts what a chunked body really sends
  (413 once over), and gives the whole body the same deadline (408);
- uvicorn's ``limit_concurrency`` (``MMRAG_WEB_MAX_CONNECTIONS``) answers 503 beyond it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

#: Paths whose body is a multipart upload (the upload limit), all others are JSON.
UPLOAD_PATHS = ("/v1/ingest/uploads",)


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's line and headers."""

    header_timeout_s: float = 30.0  # set by the app factory from the settings

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._seen_cycle: object = None
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.header_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        deadline = self._deadline
        if deadline is not None:
            deadline.cancel()
        self._deadline = None

    def _too_slow(self) -> None:
        waiting = self.cycle is None or self.cycle is self._seen_cycle
        if (waiting or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and self.cycle is not self._seen_cycle:
            self._seen_cycle = self.cycle  # a new request's headers are in
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


class BodyLimits:
    """ASGI middleware: body size per path and one deadline for the whole body."""

    def __init__(
        self, app: ASGIApp, *, json_bytes: int, upload_bytes: int, timeout_s: float
    ) -> None:
        self.app = app
        self.json_bytes = json_bytes
        self.upload_bytes = upload_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = scope["path"] in UPLOAD_PATHS
        limit = self.upload_bytes if upload else self.json_bytes
        setting = "MMRAG_WEB_MAX_UPLOAD_BYTES" if upload else "MMRAG_WEB_MAX_BODY_BYTES"
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            await _refuse(send, 413, f"the request body is over the {limit}-byte limit ({setting})")
            return
        received = 0
        done = False
        deadline = time.monotonic() + self.timeout_s

        async def guarded() -> Message:
            nonlocal received, done
            if done:
                return await receive()  # body read: waiting for a disconnect has no deadline
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
            except TimeoutError:
                raise HTTPException(
                    408,
                    f"the request body did not arrive within {self.timeout_s:g} s "
                    "(MMRAG_WEB_REQUEST_TIMEOUT_S)",
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(
                        413, f"the request body is over the {limit}-byte limit ({setting})"
                    )
                done = not message.get("more_body", False)
            return message

        await self.app(scope, guarded, send)


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # h11 refuses a malformed length before the app sees it
    return None


async def _refuse(send: Send, status: int, message: str) -> None:
    import json

    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
