"""``mmrag events serve``: Google Cloud Storage notifications (Pub/Sub push) -> workflows.

Pub/Sub push delivers each notification as ``POST {"message": {"attributes": {...},
"data": base64(object resource), "messageId": ...}, "subscription": ...}``. An
``OBJECT_FINALIZE`` starts ``IngestAsset`` and an ``OBJECT_DELETE`` starts ``Forget`` (that
object generation only, re-ingest allowed); both with workflow ids derived from the
object's generation, so a redelivered notification is a no-op and an out-of-order delete
of an older generation cannot remove a newer one. Workflows are started through
:func:`workers.temporal_client.connect`, so they carry this process's credential.

Who may push (``MMRAG_EVENTS_AUTH``):

- ``oidc`` (default): a push subscription with authentication sends
  ``Authorization: Bearer <JWT>``, an OIDC token Google signs (RS256) for the subscription's
  service account. It is verified against the keys in ``MMRAG_EVENTS_CERTS_FILE`` (Google's
  JWKS from https://www.googleapis.com/oauth2/v3/certs, its ``{kid: PEM}`` certificates from
  .../oauth2/v1/certs, or PEM certificates / public keys; re-read when the file changes, so a
  job can refresh it as Google rotates keys: this server makes no outbound calls). The token
  must be unexpired, issued by accounts.google.com, for ``MMRAG_EVENTS_AUDIENCE`` (the
  subscription's audience: the push endpoint URL unless set otherwise), and name a verified
  ``email`` in ``MMRAG_EVENTS_SERVICE_ACCOUNTS``.
- ``token``: a static ``MMRAG_EVENTS_TOKEN`` in ``Authorization: Bearer``, compared in
  constant time, for senders that cannot sign (the Pub/Sub emulator, a relay outside GCP).
  An explicit opt-in: a shared secret proves less than a signature and never expires.

A credential is never taken from the URL: a request with a query string is refused (400)
and the query string never reaches a log line. Only notifications for
``MMRAG_EVENTS_BUCKETS`` (``bucket`` or ``bucket/prefix/``) are acted on: any other is
refused (403) and starts nothing. Lengths, read timeouts and connection counts are guarded
by ``starters/http_guard.py``, before the body is read.

Answers: 204 started (or already started, or an event type we ignore); 400 malformed (Pub/Sub
should dead-letter it); 401 no valid credential; 403 a valid credential for a service
account or a bucket that is not allowed; 411 / 413 bad length; 503 Temporal unreachable
(Pub/Sub retries).

One module of ~550 lines: the HTTP server, its two ways to authenticate a push and the
mapping to workflows are one trust boundary, reviewed together.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hmac
import json
import logging
import re
import sys
import threading
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from temporalio.client import Client
from temporalio.exceptions import WorkflowAlreadyStartedError

from settings import Settings, get_settings
from starters.http_guard import (
    MAX_CONNECTIONS,
    GuardedHandler,
    GuardedServer,
    RequestRefused,
    declared_length,
)
from starters.runs import start_once
from workflows.contracts import (
    FORGET_WORKFLOW,
    INGEST_ASSET_WORKFLOW,
    ForgetInput,
    IngestAssetInput,
    asset_id_for,
    ingest_asset_workflow_id,
)

log = logging.getLogger("mmrag.events")
T = TypeVar("T")

MAX_BODY = 1024 * 1024  # a GCS notification is ~2 KB; Pub/Sub caps a message at 10 MB
GOOGLE_ISSUERS = frozenset({"accounts.google.com", "https://accounts.google.com"})
CLOCK_SKEW_S = 30
MIN_STATIC_TOKEN_CHARS = 16
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----.+?-----END \1-----", re.DOTALL)


class BadEvent(ValueError):
    """The request is not a GCS notification we understand (answered with 400)."""


class EventsConfigError(RuntimeError):
    """The events settings are unusable; the message names the MMRAG_EVENTS_* setting."""


@dataclass
class ObjectEvent:
    kind: str  # OBJECT_FINALIZE | OBJECT_DELETE | other
    bucket: str
    name: str
    generation: str

    @property
    def uri(self) -> str:
        return f"gs://{self.bucket}/{self.name}"


def parse_push(body: bytes) -> ObjectEvent:
    """The documented Pub/Sub push envelope around a GCS notification."""
    try:
        envelope = json.loads(body)
        message = envelope["message"]
        attributes = message.get("attributes") or {}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise BadEvent(f"not a Pub/Sub push envelope: {e}") from e
    resource: dict[str, Any] = {}
    if message.get("data"):
        try:
            resource = json.loads(base64.b64decode(message["data"]))
        except ValueError as e:
            raise BadEvent(f"message data is not base64 JSON: {e}") from e
    kind = attributes.get("eventType", "")
    bucket = attributes.get("bucketId") or resource.get("bucket", "")
    name = attributes.get("objectId") or resource.get("name", "")
    generation = str(attributes.get("objectGeneration") or resource.get("generation", ""))
    if not (kind and bucket and name and generation):
        raise BadEvent("eventType, bucketId, objectId and objectGeneration are required")
    return ObjectEvent(kind, bucket, name, generation)


# -- who may push ---------------------------------------------------------------------------
class PushAuth(Protocol):
    def verify(self, authorization: str) -> str:
        """Who pushed (for the log), or RequestRefused (401 / 403)."""
        ...


def _bearer(authorization: str) -> str:
    scheme, _, credential = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        raise RequestRefused(HTTPStatus.UNAUTHORIZED, "an 'Authorization: Bearer …' is needed")
    return credential.strip()


@dataclass
class StaticToken:
    """``token`` auth: a shared secret in the Authorization header (explicit opt-in)."""

    token: str = field(repr=False)

    def verify(self, authorization: str) -> str:
        offered = _bearer(authorization) if authorization else ""
        if not offered or not hmac.compare_digest(offered.encode(), self.token.encode()):
            raise RequestRefused(HTTPStatus.UNAUTHORIZED, "bad or missing bearer token")
        return "static token"


def load_push_keys(path: Path) -> dict[str, list[RSAPublicKey]]:
    """RSA public keys by key id ("" for keys without one) from a JWKS, a ``{kid: PEM}``
    JSON object, or PEM certificates / public keys."""
    where = f"MMRAG_EVENTS_CERTS_FILE {path}"
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise EventsConfigError(f"{where}: cannot read it ({e.strerror})") from None
    found: list[tuple[str, object]] = []
    try:
        if raw.lstrip().startswith(b"{"):
            doc = json.loads(raw)
            if isinstance(doc, dict) and isinstance(doc.get("keys"), list):  # JWKS
                for jwk in doc["keys"]:
                    if jwk.get("kty") == "RSA":
                        found.append((str(jwk.get("kid", "")), jwt.PyJWK(jwk).key))
            elif isinstance(doc, dict):  # Google's v1 certs: {kid: certificate PEM}
                for kid, pem in doc.items():
                    found.append((str(kid), _pem_key(str(pem).encode())))
        else:
            found = [("", _pem_key(block.group(0))) for block in _PEM_BLOCK.finditer(raw)]
    except (ValueError, TypeError, jwt.PyJWKError) as e:
        raise EventsConfigError(f"{where}: not a JWKS, {{kid: PEM}} JSON or PEM ({e})") from None
    keys: dict[str, list[RSAPublicKey]] = {}
    for kid, key in found:
        if isinstance(key, RSAPublicKey):
            keys.setdefault(kid, []).append(key)
    if not keys:
        raise EventsConfigError(f"{where}: holds no RSA public key or certificate")
    return keys


def _pem_key(pem: bytes) -> object:
    if b"CERTIFICATE" in pem.split(b"\n", 1)[0]:
        return x509.load_pem_x509_certificate(pem).public_key()
    return load_pem_public_key(pem)


@dataclass
class PubSubOidc:
    """``oidc`` auth: Pub/Sub's signed push token (see the module docstring)."""

    audience: str
    service_accounts: frozenset[str]
    certs_file: Path
    _keys: dict[str, list[RSAPublicKey]] = field(default_factory=dict, repr=False)
    _loaded: tuple[int, int] = (0, 0)  # (mtime_ns, size) of the file the keys came from
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self._current_keys()  # a bad file fails at startup, not at the first push

    def _current_keys(self) -> dict[str, list[RSAPublicKey]]:
        with self._lock:
            try:
                stat = self.certs_file.stat()
                version = (stat.st_mtime_ns, stat.st_size)
            except OSError:
                version = self._loaded
            if version != self._loaded or not self._keys:
                self._keys = load_push_keys(self.certs_file)
                self._loaded = version
            return self._keys

    def verify(self, authorization: str) -> str:
        token = _bearer(authorization)
        unauthorised = HTTPStatus.UNAUTHORIZED
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise RequestRefused(unauthorised, "the bearer credential is not a JWT") from None
        if header.get("alg") != "RS256":
            raise RequestRefused(unauthorised, "the push token must be signed with RS256")
        try:
            keys = self._current_keys()
        except EventsConfigError as e:
            log.error("cannot verify pushes: %s", e)
            raise RequestRefused(
                HTTPStatus.SERVICE_UNAVAILABLE, "verification keys unavailable"
            ) from None
        kid = str(header.get("kid", ""))
        if kid:
            candidates = keys.get(kid) or keys.get("", [])
        else:
            candidates = [key for some in keys.values() for key in some]
        if not candidates:
            raise RequestRefused(
                unauthorised,
                f"the push token is signed by key {kid!r}, which is not in "
                "MMRAG_EVENTS_CERTS_FILE (refresh it from Google's certificates)",
            )
        claims: dict[str, Any] | None = None
        problem = "bad signature"
        for key in candidates:
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=["RS256"],
                    audience=self.audience,
                    leeway=CLOCK_SKEW_S,
                    options={"require": ["exp", "iat", "iss", "aud", "email"]},
                )
                break
            except jwt.InvalidSignatureError:
                continue
            except jwt.ExpiredSignatureError:
                problem = "the push token has expired"
                break
            except jwt.InvalidAudienceError:
                problem = "the push token is for another audience than MMRAG_EVENTS_AUDIENCE"
                break
            except jwt.InvalidTokenError as e:
                problem = f"invalid push token ({type(e).__name__})"
                break
        if claims is None:
            raise RequestRefused(unauthorised, problem)
        if claims.get("iss") not in GOOGLE_ISSUERS:
            raise RequestRefused(unauthorised, "the push token was not issued by Google")
        email = str(claims.get("email", ""))
        if email not in self.service_accounts or claims.get("email_verified") is not True:
            raise RequestRefused(
                HTTPStatus.FORBIDDEN,
                f"service account {email!r} is not in MMRAG_EVENTS_SERVICE_ACCOUNTS",
            )
        return email


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@dataclass(frozen=True)
class EventsConfig:
    tenant: str
    auth: PushAuth
    buckets: tuple[tuple[str, str], ...]  # (bucket, object name prefix)
    read_timeout_s: float = 10.0

    @classmethod
    def from_settings(cls, settings: Settings, tenant: str) -> EventsConfig:
        """Raises EventsConfigError naming the setting when serving would be unsafe."""
        auth: PushAuth
        if settings.events_auth == "oidc":
            missing = [
                name
                for name, value in (
                    ("MMRAG_EVENTS_AUDIENCE", settings.events_audience),
                    ("MMRAG_EVENTS_SERVICE_ACCOUNTS", settings.events_service_accounts),
                    ("MMRAG_EVENTS_CERTS_FILE", settings.events_certs_file),
                )
                if not value.strip()
            ]
            if missing:
                raise EventsConfigError(
                    f"verifying Pub/Sub's signed push tokens needs {', '.join(missing)} (the "
                    "subscription's audience, its push service account, Google's certificates "
                    "in a file); or MMRAG_EVENTS_AUTH=token with MMRAG_EVENTS_TOKEN for "
                    "senders that cannot sign"
                )
            auth = PubSubOidc(
                settings.events_audience.strip(),
                frozenset(_split(settings.events_service_accounts)),
                Path(settings.events_certs_file).expanduser(),
            )
        elif settings.events_auth == "token":
            token = settings.events_token.get_secret_value()
            if len(token) < MIN_STATIC_TOKEN_CHARS:
                raise EventsConfigError(
                    f"MMRAG_EVENTS_AUTH=token needs MMRAG_EVENTS_TOKEN of at least "
                    f"{MIN_STATIC_TOKEN_CHARS} characters (e.g. `openssl rand -hex 24`)"
                )
            auth = StaticToken(token)
        else:
            raise EventsConfigError(
                f"MMRAG_EVENTS_AUTH is {settings.events_auth!r}: use oidc (Pub/Sub's signed "
                "push tokens) or token (a static MMRAG_EVENTS_TOKEN)"
            )
        buckets = tuple(
            (bucket, prefix)
            for bucket, _, prefix in (
                entry.removeprefix("gs://").partition("/")
                for entry in _split(settings.events_buckets)
            )
        )
        if not buckets:
            raise EventsConfigError(
                "MMRAG_EVENTS_BUCKETS is empty: name the buckets (or bucket/prefix/) whose "
                "notifications may start ingests and forgets, commas"
            )
        return cls(tenant, auth, buckets, settings.events_read_timeout_s)

    def allows(self, event: ObjectEvent) -> bool:
        return any(
            event.bucket == bucket and event.name.startswith(prefix)
            for bucket, prefix in self.buckets
        )


# -- starting workflows -------------------------------------------------------------------
class EventBridge:
    """Starts workflows for events on its own event loop thread, for a threaded server."""

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.client: Client | None = None
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    @classmethod
    def connect(cls, settings: Settings, tenant: str) -> EventBridge:
        """A bridge whose client is made by ``workers.temporal_client.connect`` on the
        bridge's own loop: codec, credential and tracing as every mmrag client has them."""
        from workers.auth import WRITER, AuthClientInterceptor, client_credentials
        from workers.temporal_client import connect

        # Least privilege: a writer of its own tenant, never the operator tokens a CLI mints.
        credentials = client_credentials(
            settings, tenants=[tenant], role=WRITER, subject="mmrag-events"
        )
        auth = [AuthClientInterceptor(credentials)] if credentials else []
        bridge = cls(tenant)
        try:
            bridge.client = bridge.run(connect(settings, token="", interceptors=auth), timeout=60)
        except BaseException:
            bridge.close()
            raise
        return bridge

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout)

    def handle(self, event: ObjectEvent) -> str:
        return self.run(self._start(event))

    async def _start(self, event: ObjectEvent) -> str:
        arg: IngestAssetInput | ForgetInput
        if event.kind == "OBJECT_FINALIZE":
            workflow_id = ingest_asset_workflow_id(self.tenant, event.uri, event.generation)
            workflow, arg = INGEST_ASSET_WORKFLOW, IngestAssetInput(self.tenant, event.uri)
        elif event.kind == "OBJECT_DELETE":
            asset_id = asset_id_for(self.tenant, event.uri)
            workflow_id = forget_workflow_id(self.tenant, asset_id, event.generation)
            workflow, arg = (
                FORGET_WORKFLOW,
                ForgetInput(
                    self.tenant,
                    asset_id=asset_id,
                    reason="object deleted from storage",
                    allow_reingest=True,
                    if_generation=event.generation,
                ),
            )
        else:
            return "ignored"
        if self.client is None:
            raise RuntimeError("EventBridge.connect() first")
        try:
            await start_once(self.client, workflow, arg, workflow_id, object, reject_duplicate=True)
        except WorkflowAlreadyStartedError:
            return "duplicate"
        return "started"


def forget_workflow_id(tenant: str, asset_id: str, generation: str) -> str:
    return f"forget/{tenant}/{asset_id}/{generation}"


# -- the HTTP endpoint ----------------------------------------------------------------------
class EventsRequestHandler(GuardedHandler):
    server_version = "mmrag-events"
    bridge: EventBridge  # set on the subclass built by make_server
    config: EventsConfig

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        try:
            if urlsplit(self.path).query:
                raise RequestRefused(
                    HTTPStatus.BAD_REQUEST,
                    "this endpoint takes no query string: send credentials in the "
                    "Authorization header, never in the URL (URLs end up in logs)",
                )
            declared_length(self.headers, MAX_BODY)  # before anything is read
            who = self.config.auth.verify(self.headers.get("Authorization", ""))
            event = parse_push(self.read_body(MAX_BODY))
            if not self.config.allows(event):
                raise RequestRefused(
                    HTTPStatus.FORBIDDEN,
                    f"bucket {event.bucket!r} (object prefix) is not in MMRAG_EVENTS_BUCKETS",
                )
        except RequestRefused as e:
            log.info("refused (%d): %s", e.status, e.message)
            self._answer(e.status, e.message)
            return
        except BadEvent as e:
            self._answer(HTTPStatus.BAD_REQUEST, str(e))
            return
        try:
            outcome = self.bridge.handle(event)
        except Exception as e:  # Temporal unreachable: Pub/Sub will retry
            log.warning("could not start a workflow: %s", type(e).__name__)
            self._answer(
                HTTPStatus.SERVICE_UNAVAILABLE, "workflow service unavailable, retry later"
            )
            return
        log.info("%s gen %s from %s: %s", event.kind, event.generation, who, outcome)
        self._answer(HTTPStatus.NO_CONTENT, "")

    def _answer(self, status: int, message: str) -> None:
        body = message.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        if status >= 400:
            self.close_connection = True  # the body may be unread: never parse it
            self.send_header("Connection", "close")
        self.end_headers()
        if body:
            self.wfile.write(body)


def make_server(
    bridge: EventBridge,
    config: EventsConfig,
    host: str = "127.0.0.1",
    port: int = 0,
    max_connections: int = MAX_CONNECTIONS,
) -> GuardedServer:
    """A bound, not yet serving, server (port 0: a free port; see ``server_port``)."""
    handler = type(
        "BoundEventsRequestHandler",
        (EventsRequestHandler,),
        {"bridge": bridge, "config": config, "read_timeout_s": config.read_timeout_s},
    )
    return GuardedServer((host, port), handler, max_connections)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["serve"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8088)
    parser.add_argument("--tenant", default="default")


def main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """Serve until interrupted; configuration errors: one line on stderr, status 2."""
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(prog="mmrag events", description=__doc__)
        add_arguments(parser)
        args = parser.parse_args(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = get_settings()
    try:
        config = EventsConfig.from_settings(settings, args.tenant)
    except EventsConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bridge = EventBridge.connect(settings, args.tenant)
    try:
        server = make_server(bridge, config, args.host, args.port)
    except OSError as e:
        bridge.close()
        print(f"error: cannot listen on {args.host}:{args.port} ({e.strerror})", file=sys.stderr)
        return 2
    print(
        f"mmrag events listening on http://{args.host}:{server.server_port}/ (auth "
        f"{settings.events_auth}; buckets {settings.events_buckets}; tenant {args.tenant})",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        bridge.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
