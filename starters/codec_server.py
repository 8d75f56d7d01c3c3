"""``mmrag codec-server``: ``/encode`` and ``/decode`` for the Temporal Web UI and CLI.

With payload encryption on, the Temporal server stores ciphertext only; people still need to
read inputs, results and failures. The Web UI (Settings → Codec Server, or
``temporal server start-dev --ui-codec-endpoint``) and the CLI (``--codec-endpoint``) send
payloads here and show what comes back. The key never leaves this process.

Protocol (Temporal's remote codec): ``POST <prefix>/decode`` or ``<prefix>/encode`` with
``{"payloads": [{"metadata": {...base64...}, "data": "base64"}]}``, answered in the same
shape. The UI calls from the browser, so:

- CORS: only origins in ``MMRAG_CODEC_SERVER_ORIGINS`` (default the local UI on 8233) get
  ``Access-Control-Allow-Origin``; ``OPTIONS`` preflight is answered on both routes, with
  ``Content-Type, X-Namespace, Authorization`` allowed and credentials permitted. A browser
  request from any other origin is refused outright (403), not merely left unreadable.
- ``X-Namespace`` (sent by the UI and the CLI): when ``MMRAG_CODEC_SERVER_NAMESPACES`` is
  set, other namespaces are refused, so one server cannot be pointed at the wrong keyring.
- ``MMRAG_CODEC_SERVER_TOKEN``: when set, every POST needs ``Authorization: Bearer
  <token>`` (the CLI's ``--codec-auth``). It is read from the environment only, never from
  a flag (flags are visible in ``ps``). Preflights carry no credentials and are not checked.

Standard library HTTP server, one thread per request: decoding is CPU work on small
payloads, and this keeps the codec server free of a web framework dependency.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from google.protobuf import json_format
from temporalio.api.common.v1 import Payloads

from workers.codec import CodecConfigError, CodecKeyError, EncryptionCodec, codec_from_settings
from workers.settings import Settings, get_settings

log = logging.getLogger("mmrag.codec_server")

MAX_BODY_BYTES = 32 * 1024 * 1024  # a history page of payloads; Temporal caps one at 2 MiB
ALLOWED_HEADERS = "Content-Type, X-Namespace, Authorization"
READY_LINE = "mmrag codec server on"


def _split(value: str) -> list[str]:
    return [v.strip().rstrip("/") for v in value.split(",") if v.strip()]


@dataclass(frozen=True)
class CodecServerConfig:
    codec: EncryptionCodec
    origins: frozenset[str]
    token: str = ""
    namespaces: frozenset[str] = frozenset()

    @classmethod
    def from_settings(
        cls, settings: Settings, origins: Sequence[str] | None = None
    ) -> CodecServerConfig:
        codec = codec_from_settings(settings)
        if not codec.enabled:
            raise CodecConfigError(
                "the codec server needs the payload key: set MMRAG_CODEC_KEY or "
                "MMRAG_CODEC_KEY_FILE (the same keyring as the workers)"
            )
        return cls(
            codec=codec,
            origins=frozenset(
                o.rstrip("/") for o in (origins or _split(settings.codec_server_origins))
            ),
            token=settings.codec_server_token.get_secret_value(),
            namespaces=frozenset(_split(settings.codec_server_namespaces)),
        )

    def origin_allowed(self, origin: str) -> bool:
        return "*" in self.origins or origin.rstrip("/") in self.origins


class CodecRequestHandler(BaseHTTPRequestHandler):
    server_version = "mmrag-codec"
    protocol_version = "HTTP/1.1"
    config: CodecServerConfig  # set on the subclass built by make_server

    # -- helpers -------------------------------------------------------------------------
    def _route(self) -> str:
        path = self.path.split("?", 1)[0].rstrip("/")
        for route in ("/encode", "/decode"):
            if path.endswith(route):
                return route[1:]
        return ""

    def _cors_headers(self) -> None:
        origin = self.headers.get("Origin", "")
        if origin and self.config.origin_allowed(origin):
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Access-Control-Allow-Credentials", "true")
        self.send_header("Vary", "Origin")

    def _reply(
        self, status: int, body: bytes = b"", content_type: str = "application/json"
    ) -> None:
        self.send_response(status)
        self._cors_headers()
        if status == HTTPStatus.UNAUTHORIZED:
            self.send_header("WWW-Authenticate", 'Bearer realm="mmrag-codec"')
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._reply(status, json.dumps({"error": message}).encode())

    def _refusal(self) -> tuple[int, str] | None:
        """Why this POST may not be served (origin, namespace, token), or None."""
        origin = self.headers.get("Origin", "")
        if origin and not self.config.origin_allowed(origin):
            return HTTPStatus.FORBIDDEN, f"origin {origin} is not in MMRAG_CODEC_SERVER_ORIGINS"
        namespace = self.headers.get("X-Namespace", "")
        if self.config.namespaces and namespace and namespace not in self.config.namespaces:
            return HTTPStatus.FORBIDDEN, f"namespace {namespace!r} is not served here"
        if self.config.token:
            given = self.headers.get("Authorization", "")
            expected = f"Bearer {self.config.token}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return HTTPStatus.UNAUTHORIZED, "a valid 'Authorization: Bearer <token>' is needed"
        return None

    # -- verbs ---------------------------------------------------------------------------
    def do_OPTIONS(self) -> None:  # noqa: N802 - http.server's naming
        origin = self.headers.get("Origin", "")
        if not self._route():
            self._error(HTTPStatus.NOT_FOUND, "use /encode or /decode")
        elif origin and not self.config.origin_allowed(origin):
            self._error(HTTPStatus.FORBIDDEN, f"origin {origin} is not allowed")
        else:
            self.send_response(HTTPStatus.OK)
            self._cors_headers()
            self.send_header("Access-Control-Allow-Methods", "POST, OPTIONS")
            self.send_header("Access-Control-Allow-Headers", ALLOWED_HEADERS)
            self.send_header("Access-Control-Max-Age", "86400")
            self.send_header("Content-Length", "0")
            self.end_headers()

    def do_GET(self) -> None:  # noqa: N802
        if self.path.rstrip("/").endswith("/health") or self.path == "/":
            self._reply(HTTPStatus.OK, b'{"status": "ok"}')
        else:
            self._error(HTTPStatus.NOT_FOUND, "POST to /encode or /decode")

    def do_POST(self) -> None:  # noqa: N802
        route = self._route()
        if not route:
            self._error(HTTPStatus.NOT_FOUND, "use /encode or /decode")
            return
        refusal = self._refusal()
        if refusal:
            self._drain()
            self._error(*refusal)
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._error(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
            return
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY_BYTES} bytes")
            return
        body = self.rfile.read(length)
        payloads = Payloads()
        try:
            json_format.Parse(body or b"{}", payloads, ignore_unknown_fields=True)
        except json_format.ParseError as e:
            self._error(HTTPStatus.BAD_REQUEST, f"not a Payloads JSON document: {e}")
            return
        codec = self.config.codec
        convert = codec.encode_payload if route == "encode" else codec.decode_payload
        try:
            result = Payloads(payloads=[convert(p) for p in payloads.payloads])
        except CodecKeyError as e:
            self._error(HTTPStatus.BAD_REQUEST, str(e))
            return
        except Exception as e:  # a malformed payload; say what, not its content
            self._error(HTTPStatus.BAD_REQUEST, f"cannot {route} payload: {type(e).__name__}")
            return
        self._reply(HTTPStatus.OK, json_format.MessageToJson(result, indent=None).encode())

    def _drain(self) -> None:
        try:
            length = min(int(self.headers.get("Content-Length", "0")), MAX_BODY_BYTES)
        except ValueError:
            length = 0
        if length:
            self.rfile.read(length)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        # Request line and status only: never bodies or the Authorization header.
        log.info("%s %s", self.address_string(), format % args)


def make_server(
    config: CodecServerConfig, host: str = "127.0.0.1", port: int = 0
) -> ThreadingHTTPServer:
    """A bound, not yet serving, server (port 0: a free port; see ``server_address``)."""
    handler = type("BoundCodecRequestHandler", (CodecRequestHandler,), {"config": config})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def serve(
    settings: Settings | None = None,
    host: str | None = None,
    port: int | None = None,
    origins: Sequence[str] | None = None,
) -> ThreadingHTTPServer:
    """A bound codec server from settings (arguments override them); call serve_forever()."""
    settings = settings or get_settings()
    config = CodecServerConfig.from_settings(settings, origins)
    return make_server(
        config,
        settings.codec_server_host if host is None else host,
        settings.codec_server_port if port is None else port,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, help="(default MMRAG_CODEC_SERVER_HOST, 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=None, help="(default MMRAG_CODEC_SERVER_PORT, 8234)"
    )
    parser.add_argument(
        "--origin",
        action="append",
        default=None,
        metavar="URL",
        help="a Web UI origin allowed by CORS, repeatable (default MMRAG_CODEC_SERVER_ORIGINS)",
    )


def main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT. The bearer token comes from MMRAG_CODEC_SERVER_TOKEN."""
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(prog="mmrag codec-server", description=__doc__)
        add_arguments(parser)
        args = parser.parse_args(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = get_settings()
    try:
        server = serve(settings, args.host, args.port, args.origin)
    except OSError as e:
        raise RuntimeError(
            f"cannot listen on {args.host or settings.codec_server_host}:"
            f"{args.port or settings.codec_server_port} ({e.strerror}): pick another "
            "--port / MMRAG_CODEC_SERVER_PORT"
        ) from e
    config: CodecServerConfig = server.RequestHandlerClass.config  # type: ignore[attr-defined]
    host, port = str(server.server_address[0]), int(server.server_address[1])
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, name="codec-server", daemon=True)
    thread.start()
    print(
        f"{READY_LINE} http://{host}:{port} (keys {config.codec.keyring!r}; origins "
        f"{', '.join(sorted(config.origins))}; bearer token "
        f"{'required' if config.token else 'not required'})",
        flush=True,
    )
    stop.wait()
    server.shutdown()
    server.server_close()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as e:  # configuration a user can fix: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
