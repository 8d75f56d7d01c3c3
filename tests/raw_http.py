"""Raw HTTP over a socket, for the requests urllib will not send: bad lengths, slow clients.

The codec server and the events endpoint tests use these to play the attacker against the
real servers on loopback ports.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes


def raw_request(
    address: tuple[str, int], head: str, body: bytes = b"", timeout: float = 10
) -> RawResponse:
    """Send ``head`` (request line and headers, ``\\n`` separated, no blank line) and
    ``body``, leave the connection open, and read one response.

    Fails the test when none comes within ``timeout`` seconds: the server is then still
    waiting for the body (the attack this reproduces).
    """
    request = head.strip().replace("\n", "\r\n").encode() + b"\r\n\r\n" + body
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            data += _recv(sock, timeout)
        raw_head, _, rest = data.partition(b"\r\n\r\n")
        lines = raw_head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            rest += _recv(sock, timeout)
        return RawResponse(int(lines[0].split()[1]), headers, rest[:length])


def _recv(sock: socket.socket, timeout: float) -> bytes:
    try:
        chunk = sock.recv(65536)
    except TimeoutError:
        raise AssertionError(
            f"no response within {timeout:.0f} s: the server is still reading"
        ) from None
    if not chunk:
        raise AssertionError("the server closed the connection without a response")
    return chunk


def cut_off_slow_client(address: tuple[str, int], head: str, give_up_after: float = 60) -> bool:
    """A slowloris: send ``head`` one byte every 0.2 s, then header lines for ever, never
    finishing the request.

    True when the server answered or closed the connection; False when it was still
    waiting after ``give_up_after`` seconds.
    """
    pending = head.strip().replace("\n", "\r\n").encode() + b"\r\n"
    give_up = time.monotonic() + give_up_after
    with socket.create_connection(address, timeout=10) as sock:
        sock.settimeout(0.2)
        while time.monotonic() < give_up:
            if not pending:
                pending = b"X-Slow: y\r\n"
            try:
                sock.sendall(pending[:1])
                pending = pending[1:]
                sock.recv(65536)  # data (an error response) or b"" (closed): cut off
                return True
            except TimeoutError:
                continue  # still waiting for us: send the next byte
            except OSError:  # reset or shut down
                return True
    return False
