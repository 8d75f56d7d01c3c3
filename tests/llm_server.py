"""A real HTTP, OpenAI-compatible chat completions server for tests.

Why a server and not a mock: the ``openai`` client's own HTTP stack, timeouts, status
mapping and connection handling are part of what is tested (429s, 5xx, a dropped
connection, a slow answer), and the exact request body the client sends is what must be
free of PII. It runs ``http.server.ThreadingHTTPServer`` in a thread on a free 127.0.0.1
port and implements ``POST /v1/chat/completions`` (non-streaming), answering in the shape
the client parses, with ``usage``.

Behaviour is switched at run time with :meth:`LlmTestServer.set_mode`:

- ``"ok"``: a grounded answer: the first sentence of source ``[S1]``'s text in the user
  message, cited ``[S1]`` (so ``validate_answer`` passes); ``I don't know ...`` when the
  message has no sources;
- ``"slow"``: the same after ``delay`` seconds;
- ``"throttle"``: HTTP 429 with ``Retry-After`` for the next ``count`` requests, then ok;
- ``"fail"``: HTTP 500 on every request;
- ``"down"``: the connection is closed without a response;
- ``"hallucinate"``: a fluent answer citing ``[S9]``, grounded in nothing;
- ``"status"``: HTTP ``status`` (e.g. 400, 404) with an OpenAI-style error body;
- ``"empty"``: HTTP 200 with empty content;
- ``"reply"``: exactly ``text`` (a scripted answer: what a model that obeyed an injected
  instruction would say, say).

Caption requests (:func:`is_caption_request`: activities/captions.py's system prompt and one
``data:image/...`` part) are answered in ``ok`` mode with :func:`caption_answer`, a
description of the picture actually sent (its main colour and how bright it is), so a test
can tell which picture was captioned; they follow the request mode like any other.

Chunk summarisation requests (:func:`is_summary_request`: the generator's summary system
prompt) are answered in ``ok`` mode with :func:`summary_answer` (the passage's own
sentences, last first, within the request's token cap) and follow the same mode, unless
:meth:`LlmTestServer.set_summary_mode` gives them their own (say ``"fail"`` for summaries
while answers still work).

With ``api_key=`` set, requests without ``Authorization: Bearer <api_key>`` get a 401 whose
message echoes the key that was sent (as some providers do, partially masked), so tests can
prove the client side never repeats it.

    with LlmTestServer() as srv:
        srv.base_url            # "http://127.0.0.1:PORT/v1"
        srv.set_mode("throttle", count=3)
        srv.requests            # every request body (parsed JSON), in arrival order
        srv.request_count
        srv.summary_requests    # the summarisation requests among them
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

MODES = ("ok", "slow", "throttle", "fail", "down", "hallucinate", "status", "empty", "reply")
HALLUCINATION = "The Eiffel Tower was painted purple in 1850 by Napoleon's engineers [S9]."
# How activities.llm.client's summary system prompt starts (kept literal: a test server
# that imported the code under test would agree with it by construction).
SUMMARY_PROMPT_START = "You condense one source passage"
# How activities.captions' caption system prompt starts.
CAPTION_PROMPT_START = "You describe one picture"
# Named colours the caption answer picks the nearest of.
_COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 60, 200),
    "yellow": (230, 210, 40),
    "white": (245, 245, 245),
    "black": (10, 10, 10),
    "grey": (128, 128, 128),
}

# Source S1's text: between <source id="S1" ...> and </source> (the prompt's delimiters),
# or after an "[S1] ..." header line (prompts from before the delimiters).
_SOURCE_RE = re.compile(
    r'^<source id="S1"[^>]*>\n(?P<body>.*?)\n</source>'
    r"|^\[S1\][^\n]*\n(?P<old>.*?)(?=\n\n\[S\d+\]|\n\nAnswer |\Z)",
    re.S | re.M,
)


def user_text(body: dict[str, Any]) -> str:
    """The text of the last user message of a chat request (string or content parts)."""
    for msg in reversed(body.get("messages") or []):
        if msg.get("role") != "user":
            continue
        content = msg.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "\n".join(p.get("text", "") for p in content if p.get("type") == "text")
    return ""


def is_summary_request(body: dict[str, Any]) -> bool:
    """Whether a chat request asks to summarise a chunk (rather than answer a question)."""
    for msg in body.get("messages") or []:
        if msg.get("role") == "system" and str(msg.get("content", "")).startswith(
            SUMMARY_PROMPT_START
        ):
            return True
    return False


def image_urls(body: dict[str, Any]) -> list[str]:
    """The ``image_url`` URLs of a chat request's user messages, in order."""
    urls = []
    for msg in body.get("messages") or []:
        content = msg.get("content")
        if msg.get("role") == "user" and isinstance(content, list):
            urls += [
                str((p.get("image_url") or {}).get("url", ""))
                for p in content
                if p.get("type") == "image_url"
            ]
    return urls


def is_caption_request(body: dict[str, Any]) -> bool:
    """Whether a chat request asks for a picture's caption."""
    return any(
        msg.get("role") == "system" and str(msg.get("content", "")).startswith(CAPTION_PROMPT_START)
        for msg in body.get("messages") or []
    )


def caption_answer(body: dict[str, Any]) -> str:
    """The ``ok`` caption: the picture's dominant named colour, read from the pixels sent
    ("A picture mostly red."), or that no picture came."""
    import base64
    import io

    from PIL import Image

    urls = [u for u in image_urls(body) if u.startswith("data:image/")]
    if not urls:
        return "No picture was sent."
    raw = base64.b64decode(urls[0].split(",", 1)[1])
    with Image.open(io.BytesIO(raw)) as image:
        small = image.convert("RGB").resize((16, 16))
    counts: dict[str, int] = {}
    data = small.tobytes()
    for i in range(0, len(data), 3):
        pixel = tuple(data[i : i + 3])
        name = min(_COLOURS, key=lambda n: _distance(pixel, _COLOURS[n]))  # noqa: B023
        counts[name] = counts.get(name, 0) + 1
    colour = max(counts, key=lambda n: counts[n])
    return f"A picture mostly {colour}."


def _distance(a: Any, b: tuple[int, int, int]) -> int:
    return sum((x - y) ** 2 for x, y in zip(a, b, strict=True))


def summary_answer(body: dict[str, Any]) -> str:
    """The ``ok`` summary: the passage's sentences in reverse order (so it differs from any
    extractive summary, which keeps document order), skipping any that would take it past
    a third of the request's token cap in words; every word is the passage's own, so it is
    grounded."""
    passage = user_text(body).split("\nPassage:\n", 1)[-1]
    cap = int(body.get("max_tokens") or body.get("max_completion_tokens") or 64)
    sentences = [s for s in re.split(r"(?<=[.!?])\s+|\n+", passage) if s.strip()]
    out: list[str] = []
    words = 0
    for sentence in reversed(sentences):
        n = len(sentence.split())
        if words + n > cap // 3:
            continue
        out.append(sentence.strip())
        words += n
    return " ".join(out)


def grounded_answer(user: str) -> str:
    """The ``ok`` reply: the first sentence of [S1]'s text, cited."""
    m = _SOURCE_RE.search(user)
    if not m:
        return "I don't know based on the retrieved sources."
    lines = [ln for ln in (m.group("body") or m.group("old")).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    text = re.sub(r"^(?:Caption|Text):\s*", "", text)
    sentence = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0].strip()
    return f"{sentence} [S1]"


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle on, the second waits for the
    # client's delayed ACK (~40 ms per request on Linux). A zero-latency server needs it off.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # keep test output clean

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        if self.path.rstrip("/").endswith("/models"):
            self._json(200, {"object": "list", "data": [{"id": "test-model", "object": "model"}]})
        else:
            self._json(404, _error("not found", "invalid_request_error"))

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            body = {"_raw": raw.decode("utf-8", "replace")}
        owner = self.server.owner
        mode, params = owner._record(body, dict(self.headers))

        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._json(404, _error(f"unknown path {self.path}", "invalid_request_error"))
            return
        if owner.api_key is not None:
            sent = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
            if sent != owner.api_key:
                self._json(401, _error(f"Incorrect API key provided: {sent}.", "invalid_api_key"))
                return
        if mode == "down":
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(2)  # socket.SHUT_RDWR: the client sees a reset
            return
        if mode == "fail":
            self._json(
                500, _error("The server had an error processing your request.", "server_error")
            )
            return
        if mode == "status":
            status = int(params.get("status", 400))
            self._json(status, _error(f"test server status {status}", "invalid_request_error"))
            return
        if mode == "throttle" and owner._take_throttle():
            retry_after = str(params.get("retry_after", 1))
            self._json(
                429,
                _error("Rate limit reached for requests", "rate_limit_exceeded"),
                {"Retry-After": retry_after},
            )
            return
        if mode == "slow" and owner._stop.wait(float(params.get("delay", 1.0))):
            self.close_connection = True  # server stopping: drop the request
            return
        user = user_text(body)
        if mode == "empty":
            text = ""
        elif mode == "hallucinate":
            text = HALLUCINATION
        elif mode == "reply":
            text = str(params.get("text", ""))
        elif is_summary_request(body):
            text = summary_answer(body)
        elif is_caption_request(body):
            text = caption_answer(body)
        else:
            text = grounded_answer(user)
        prompt_tokens = max(1, len(json.dumps(body.get("messages", ""))) // 4)
        completion_tokens = max(1, len(text) // 4)
        self._json(
            200,
            {
                "id": f"chatcmpl-test-{owner.request_count}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model") or "test-model",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                        "logprobs": None,
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            },
        )

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout): nothing to answer


def _error(message: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": code, "param": None, "code": code}}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: LlmTestServer


class LlmTestServer:
    """The test server; a context manager (start on enter, stop on exit)."""

    def __init__(self, *, api_key: str | None = None, mode: str = "ok", **params: Any) -> None:
        self.api_key = api_key
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._mode = "ok"
        self._params: dict[str, Any] = {}
        self._throttle_left = 0
        self._summary_mode: str | None = None
        self._summary_params: dict[str, Any] = {}
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self.set_mode(mode, **params)

    # -- control --

    def set_mode(self, mode: str, **params: Any) -> None:
        """Switch behaviour: ``"ok"``, ``"slow"`` (``delay`` s), ``"throttle"`` (``count``
        requests get 429, ``retry_after`` s), ``"fail"``, ``"down"``, ``"hallucinate"``,
        ``"status"`` (``status`` code), ``"reply"`` (exactly ``text``)."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {MODES}")
        with self._lock:
            self._mode = mode
            self._params = params
            self._throttle_left = int(params.get("count", 1)) if mode == "throttle" else 0

    def set_summary_mode(self, mode: str | None, **params: Any) -> None:
        """Give chunk summarisation requests their own behaviour (one of :data:`MODES`;
        ``None``: the same as every request). Throttling counts are shared."""
        if mode is not None and mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {MODES}")
        with self._lock:
            self._summary_mode = mode
            self._summary_params = params

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def summary_requests(self) -> list[dict[str, Any]]:
        """The chunk summarisation requests recorded, in arrival order."""
        with self._lock:
            return [b for b in self.requests if is_summary_request(b)]

    @property
    def caption_requests(self) -> list[dict[str, Any]]:
        """The caption requests recorded, in arrival order."""
        with self._lock:
            return [b for b in self.requests if is_caption_request(b)]

    @property
    def answer_requests(self) -> list[dict[str, Any]]:
        """The question-answering requests recorded, in arrival order."""
        with self._lock:
            return [
                b for b in self.requests if not (is_summary_request(b) or is_caption_request(b))
            ]

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self.requests)

    def request_bodies_text(self) -> str:
        """Every request body seen, as one JSON text (for "no PII was sent" assertions)."""
        with self._lock:
            return "\n".join(json.dumps(b, ensure_ascii=False) for b in self.requests)

    def reset(self) -> None:
        """Forget recorded requests (mode unchanged)."""
        with self._lock:
            self.requests.clear()
            self.headers.clear()

    def _record(self, body: dict[str, Any], headers: dict[str, str]) -> tuple[str, dict[str, Any]]:
        with self._lock:
            self.requests.append(body)
            self.headers.append(headers)
            if self._summary_mode is not None and is_summary_request(body):
                return self._summary_mode, dict(self._summary_params)
            return self._mode, dict(self._params)

    def _take_throttle(self) -> bool:
        with self._lock:
            if self._throttle_left > 0:
                self._throttle_left -= 1
                return True
            return False

    # -- lifecycle --

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> LlmTestServer:
        self._stop.clear()
        httpd = _Server(("127.0.0.1", 0), _Handler)
        httpd.owner = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="llm-test-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Shut down: release slow handlers, stop serving, close the socket, join."""
        self._stop.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> LlmTestServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


if __name__ == "__main__":  # a manual server: python -m tests.llm_server
    with LlmTestServer() as srv:
        print(f"OPENAI_BASE_URL={srv.base_url}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
