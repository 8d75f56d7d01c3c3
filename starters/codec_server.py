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
- ``MMRAG_CODEC_SERVER_TOKEN`` is required: every POST needs ``Authorization: Bearer
  <token>`` (the CLI's ``--codec-auth``). It is read from the environment only, never from
  a flag (flags are visible in ``ps``). Without one the server does not start, unless
  ``MMRAG_CODEC_SERVER_INSECURE_NO_TOKEN`` waives it on a loopback address (the local dev
  Web UI has no login, so it cannot send a token). Preflights carry no credentials.
- ``X-Namespace`` (sent by the UI and the CLI) is required and must be one of
  ``MMRAG_CODEC_SERVER_NAMESPACES`` (default ``default``), so one server cannot be pointed
  at another namespace's payloads. Checked after the token: unauthenticated callers learn
  nothing about namespaces.
- Strict (``MMRAG_CODEC_SERVER_STRICT``, default on): ``/decode`` never hands back a
  payload the codec did not encrypt. Anyone who can write to Temporal without the key can
  plant one (a forged workflow input, a forged failure), and a reader would see it next to
  real data. Each comes back as :data:`PLAINTEXT_REFUSED` instead; the answer stays 200,
  because Temporal's own bookkeeping (local activity and patch markers, written by the SDK's
  core, not its codec) is plaintext in every history, and the CLI and the UI fail a whole
  history page on one error.
- ``Content-Length`` is checked before anything is read (one plain number up to
  ``MAX_BODY_BYTES``), every request has ``MMRAG_CODEC_SERVER_READ_TIMEOUT_S`` to arrive
  whole, and open connections are capped (``starters/http_guard.py``).

Standard library HTTP server, one thread per request: decoding is CPU work on small
payloads, and this keeps the codec server free of a web framework dependency.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus

from google.protobuf import json_format
from temporalio.api.common.v1 import Payload, Payloads

from settings import Settings, get_settings
from starters.http_guard import (
    MAX_CONNECTIONS,
    GuardedHandler,
    GuardedServer,
    RequestRefused,
    declared_length,
)
from workers.codec import (
    CodecConfigError,
    CodecKeyError,
    EncryptionCodec,
    codec_from_settings,
    is_encrypted,
)

log = logging.getLogger("mmrag.codec_server")

MAX_BODY_BYTES = 32 * 1024 * 1024  # a history page of payloads; Temporal caps one at 2 MiB
ALLOWED_HEADERS = "Content-Type, X-Namespace, Authorization"
READY_LINE = "mmrag codec server on"
# What strict /decode answers for a payload the codec did not encrypt (see the docstring).
PLAINTEXT_REFUSED = Payload(
    metadata={"encoding": b"json/plain"},
    data=json.dumps(
        {
            "mmrag-codec": "refused: this payload is not encrypted, so it was not written "
            "through mmrag's codec and its content is not shown (MMRAG_CODEC_SERVER_STRICT)"
        }
    ).encode(),
)


def _split(value: str) -> list[str]:
    return [v.strip().rstrip("/") for v in value.split(",") if v.strip()]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class CodecServerConfig:
    codec: EncryptionCodec
    origins: frozenset[str]
    token: str  # "": waived (MMRAG_CODEC_SERVER_INSECURE_NO_TOKEN, loopback only)
    namespaces: frozenset[str]
    strict: bool = True
    read_timeout_s: float = 10.0

    @classmethod
    def from_settings(
        cls, settings: Settings, origins: Sequence[str] | None = None, host: str | None = None
    ) -> CodecServerConfig:
        """The configuration for serving on ``host`` (default MMRAG_CODEC_SERVER_HOST);
        raises CodecConfigError, naming the setting, when it would be unsafe to serve."""
        codec = codec_from_settings(settings)
        if not codec.enabled:
            raise CodecConfigError(
                "the codec server needs the payload key: set MMRAG_CODEC_KEY or "
                "MMRAG_CODEC_KEY_FILE (the same keyring as the workers)"
            )
        token = settings.codec_server_token.get_secret_value()
        host = settings.codec_server_host if host is None else host
        if not token and not settings.codec_server_insecure_no_token:
            raise CodecConfigError(
                "the codec server needs a bearer token: set MMRAG_CODEC_SERVER_TOKEN (e.g. "
                "`openssl rand -hex 24`; clients send it as `--codec-auth 'Bearer …'`). For a "
                "local Web UI without login only: MMRAG_CODEC_SERVER_INSECURE_NO_TOKEN=true on "
                "127.0.0.1"
            )
        if not token and not _is_loopback(host):
            raise CodecConfigError(
                f"MMRAG_CODEC_SERVER_INSECURE_NO_TOKEN is honoured on a loopback address only, "
                f"not {host}: set MMRAG_CODEC_SERVER_TOKEN, or serve on 127.0.0.1"
            )
        namespaces = frozenset(_split(settings.codec_server_namespaces))
        if not namespaces:
            raise CodecConfigError(
                "MMRAG_CODEC_SERVER_NAMESPACES is empty: name the Temporal namespaces whose "
                "payloads this server decodes (commas), e.g. default"
            )
        return cls(
            codec=codec,
            origins=frozenset(
                o.rstrip("/") for o in (origins or _split(settings.codec_server_origins))
            ),
            token=token,
            namespaces=namespaces,
            strict=settings.codec_server_strict,
            read_timeout_s=settings.codec_server_read_timeout_s,
        )

    def origin_allowed(self, origin: str) -> bool:
        return "*" in self.origins or origin.rstrip("/") in self.origins


class CodecRequestHandler(GuardedHandler):
    server_version = "mmrag-codec"
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
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._reply(status, json.dumps({"error": message}).encode())

    def _refusal(self) -> tuple[int, str] | None:
        """Why this POST may not be served (origin, token, namespace), or None."""
        origin = self.headers.get("Origin", "")
        if origin and not self.config.origin_allowed(origin):
            return HTTPStatus.FORBIDDEN, f"origin {origin} is not in MMRAG_CODEC_SERVER_ORIGINS"
        if self.config.token:
            given = self.headers.get("Authorization", "")
            expected = f"Bearer {self.config.token}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return HTTPStatus.UNAUTHORIZED, "a valid 'Authorization: Bearer <token>' is needed"
        namespace = self.headers.get("X-Namespace", "")
        if not namespace:
            return HTTPStatus.BAD_REQUEST, "the X-Namespace header is required"
        if namespace not in self.config.namespaces:
            return (
                HTTPStatus.FORBIDDEN,
                f"namespace {namespace!r} is not in MMRAG_CODEC_SERVER_NAMESPACES",
            )
        return None

    def _decode(self, payload: Payload) -> Payload:
        if self.config.strict and not is_encrypted(payload):
            return PLAINTEXT_REFUSED
        return self.config.codec.decode_payload(payload)

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
        # Every refusal before the body is read closes the connection: the unread body must
        # never be parsed as the next request.
        route = self._route()
        if not route:
            self.close_connection = True
            self._error(HTTPStatus.NOT_FOUND, "use /encode or /decode")
            return
        try:
            declared_length(self.headers, MAX_BODY_BYTES)  # before anything is read
            refusal = self._refusal()
            if refusal is not None:
                raise RequestRefused(*refusal)
            body = self.read_body(MAX_BODY_BYTES)
        except RequestRefused as e:
            self.close_connection = True
            self._error(e.status, e.message)
            return
        payloads = Payloads()
        try:
            json_format.Parse(body or b"{}", payloads, ignore_unknown_fields=True)
        except json_format.ParseError as e:
            self._error(HTTPStatus.BAD_REQUEST, f"not a Payloads JSON document: {e}")
            return
        convert = self.config.codec.encode_payload if route == "encode" else self._decode
        try:
            result = Payloads(payloads=[convert(p) for p in payloads.payloads])
        except CodecKeyError as e:
            self._error(HTTPStatus.BAD_REQUEST, str(e))
            return
        except Exception as e:  # a malformed payload; say what, not its content
            self._error(HTTPStatus.BAD_REQUEST, f"cannot {route} payload: {type(e).__name__}")
            return
        self._reply(HTTPStatus.OK, json_format.MessageToJson(result, indent=None).encode())


def make_server(
    config: CodecServerConfig,
    host: str = "127.0.0.1",
    port: int = 0,
    max_connections: int = MAX_CONNECTIONS,
) -> GuardedServer:
    """A bound, not yet serving, server (port 0: a free port; see ``server_address``)."""
    handler = type(
        "BoundCodecRequestHandler",
        (CodecRequestHandler,),
        {"config": config, "read_timeout_s": config.read_timeout_s},
    )
    return GuardedServer((host, port), handler, max_connections)


def serve(
    settings: Settings | None = None,
    host: str | None = None,
    port: int | None = None,
    origins: Sequence[str] | None = None,
) -> GuardedServer:
    """A bound codec server from settings (arguments override them); call serve_forever()."""
    settings = settings or get_settings()
    host = settings.codec_server_host if host is None else host
    config = CodecServerConfig.from_settings(settings, origins, host)
    return make_server(config, host, settings.codec_server_port if port is None else port)


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
    except CodecConfigError as e:  # configuration a user can fix: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(
            f"error: cannot listen on {args.host or settings.codec_server_host}:"
            f"{args.port or settings.codec_server_port} ({e.strerror}): pick another "
            "--port / MMRAG_CODEC_SERVER_PORT",
            file=sys.stderr,
        )
        return 2
    config: CodecServerConfig = server.RequestHandlerClass.config  # type: ignore[attr-defined]
    host, port = str(server.server_address[0]), int(server.server_address[1])
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, name="codec-server", daemon=True)
    thread.start()
    print(
        f"{READY_LINE} http://{host}:{port} (keys {config.codec.keyring!r}; origins "
        f"{', '.join(sorted(config.origins))}; namespaces {', '.join(sorted(config.namespaces))}"
        f"; bearer token {'required' if config.token else 'NOT required (insecure, loopback)'}"
        f"; {'strict' if config.strict else 'NOT strict: plaintext payloads shown'})",
        flush=True,
    )
    stop.wait()
    server.shutdown()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
