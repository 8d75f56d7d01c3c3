"""Request limits for mmrag's small standard-library HTTP servers (codec server, events).

``http.server`` trusts its client more than an endpoint that faces unauthenticated callers
may: it would read ``Content-Length: -1`` as "read to EOF" (and ``int()`` also takes ``+5``,
`` 5`` and ``5_0``), wait for ever on a client that sends its headers a byte at a time, and
start one thread per connection, however many there are. The codec server and the events
endpoint share these guards:

- :func:`declared_length` accepts only a single, plain decimal ``Content-Length`` up to a
  limit, so a request is refused (400, 411 or 413) before any of its body is read;
- :class:`GuardedHandler` gives every request a deadline for its request line, headers and
  body together, and cuts off a client that misses it (a slowloris), logging the request
  line without its query string (a credential put in a URL must not reach the logs);
- :class:`GuardedServer` caps the number of open connections.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
from email.message import Message
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("mmrag.http")

MAX_CONNECTIONS = 64  # open connections per server; more are closed at once
_DECIMAL = re.compile(r"[0-9]{1,15}")
_QUERY = re.compile(r"\?[^\s\"']*")


class RequestRefused(Exception):
    """A request answered with ``status`` and one line saying what to fix."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def declared_length(headers: Message, limit: int) -> int:
    """The body length a request declares, refused unless it is one plain number <= limit.

    Chunked bodies are refused too: neither the Web UI, the ``temporal`` CLI nor Pub/Sub
    sends one, and ``http.server`` would not decode it.
    """
    if headers.get("Transfer-Encoding") is not None:
        raise RequestRefused(
            HTTPStatus.BAD_REQUEST, "Transfer-Encoding is not accepted: send a Content-Length"
        )
    values = headers.get_all("Content-Length") or []
    if not values:
        raise RequestRefused(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
    if len(values) > 1:
        raise RequestRefused(HTTPStatus.BAD_REQUEST, "more than one Content-Length header")
    if not _DECIMAL.fullmatch(values[0].strip()):
        raise RequestRefused(
            HTTPStatus.BAD_REQUEST, "Content-Length must be a non-negative decimal integer"
        )
    length = int(values[0])
    if length > limit:
        raise RequestRefused(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body is over the {limit}-byte limit"
        )
    return length


def _declares_body(headers: Message) -> bool:
    length = headers.get("Content-Length", "0").strip()
    return headers.get("Transfer-Encoding") is not None or length not in ("", "0")


def without_query(text: str) -> str:
    """``text`` with every URL query string removed (they can carry credentials)."""
    return _QUERY.sub("?<query removed>", text)


class GuardedHandler(BaseHTTPRequestHandler):
    """A request handler with a deadline for receiving each whole request.

    The socket timeout alone does not stop a client that sends one byte just before every
    timeout; a timer does: when ``read_timeout_s`` has passed and the request (line, headers
    and body) is not complete, the connection is shut down. Handlers call
    :meth:`read_body`, which checks the length first and stops the timer once the body is
    in. An idle keep-alive connection is closed by the same deadline.
    """

    protocol_version = "HTTP/1.1"
    read_timeout_s: float = 10.0  # set on the subclass a server builds
    _deadline: threading.Timer | None = None
    _body_read = False

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.read_timeout_s)  # each recv/send; the timer: the total

    def handle(self) -> None:
        with contextlib.suppress(OSError):  # cut off, or reset by the client mid-request
            super().handle()

    def handle_one_request(self) -> None:
        self._deadline = threading.Timer(self.read_timeout_s, self._cut_off)
        self._deadline.daemon = True
        self._deadline.start()
        self._body_read = False
        try:
            super().handle_one_request()
        finally:
            self._deadline.cancel()
            headers = getattr(self, "headers", None)
            if not self._body_read and headers is not None and _declares_body(headers):
                self.close_connection = True  # its unread body must not become a request

    def _cut_off(self) -> None:
        log.warning(
            "%s did not send its request within %.0f s (slow or stalled client): connection closed",
            self.address_string(),
            self.read_timeout_s,
        )
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def read_body(self, limit: int) -> bytes:
        """The request body, after checking its declared length; stops the deadline."""
        length = declared_length(self.headers, limit)
        body = self.rfile.read(length)
        if len(body) < length:
            raise RequestRefused(HTTPStatus.BAD_REQUEST, "the body ended before Content-Length")
        if self._deadline is not None:
            self._deadline.cancel()
        self._body_read = True
        return body

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
        # Request line and status only, never bodies or headers; query strings removed.
        log.info("%s %s", self.address_string(), without_query(format % args))


class GuardedServer(ThreadingHTTPServer):
    """A threading HTTP server that closes connections beyond ``max_connections`` at once."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[GuardedHandler],
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self._slots = threading.BoundedSemaphore(max_connections)
        self.max_connections = max_connections
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.warning(
                "over %d open connections: closed one from %s", self.max_connections, client_address
            )
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()
