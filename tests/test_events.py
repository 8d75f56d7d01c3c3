"""`mmrag events serve`, the Pub/Sub push endpoint, against the real servers.

Pushes are signed the way Pub/Sub signs them: an RS256 OIDC token for a service account,
here from a key pair the tests make (its public half in MMRAG_EVENTS_CERTS_FILE). Every
forged push is refused and, checked on the real Temporal server, starts nothing; each of
these attacks succeeded against the previous endpoint (a static token, also taken from the
URL and then logged; no signature; no bucket allow-list; `Content-Length: abc` answered by
a dropped connection; no read timeout).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import hashlib
import hmac
import json
import logging
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from settings import REPO_ROOT, Settings
from starters.events import (
    EventBridge,
    EventsConfig,
    PubSubOidc,
    forget_workflow_id,
    make_server,
)
from starters.synthetic_corpus import write_corpus
from tests.conftest import ServerStack, Workers, free_port
from tests.helpers import grant_root, milvus_pks
from tests.raw_http import cut_off_slow_client, raw_request
from workflows.contracts import asset_id_for, ingest_asset_workflow_id

AUDIENCE = "https://events.example.com/push"
PUSHER = "pubsub-push@proj.iam.gserviceaccount.com"


# -- signing like Pub/Sub -----------------------------------------------------------------
@dataclass
class Signer:
    key: rsa.RSAPrivateKey
    kid: str

    def token(self, **claims: object) -> str:
        now = int(time.time())
        body: dict[str, object] = {
            "iss": "https://accounts.google.com",
            "aud": AUDIENCE,
            "email": PUSHER,
            "email_verified": True,
            "sub": "1234567890",
            "iat": now,
            "exp": now + 3600,
        }
        body.update(claims)
        return jwt.encode(body, self.key, algorithm="RS256", headers={"kid": self.kid})


def new_signer(kid: str | None = None) -> Signer:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return Signer(key, kid or uuid.uuid4().hex[:12])


def jwks(*signers: Signer) -> str:
    keys = []
    for s in signers:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(s.key.public_key()))
        keys.append({**jwk, "kid": s.kid, "alg": "RS256", "use": "sig"})
    return json.dumps({"keys": keys})


def certificate_pem(signer: Signer) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-push-signer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(signer.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(signer.key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def hs256_with_public_key(signer: Signer, claims: dict[str, object]) -> str:
    """The algorithm-confusion forgery: HMAC keyed with the (public) verification key."""
    public = signer.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": signer.kid}).encode())
    payload = b64(json.dumps(claims).encode())
    mac = hmac.new(public, header + b"." + payload, hashlib.sha256).digest()
    return (header + b"." + payload + b"." + b64(mac)).decode()


# -- the verifier alone ---------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["jwks", "google-v1-certs", "pem-certificate", "pem-public-key"])
def test_certificate_files_in_every_format_google_publishes(tmp_path: Path, fmt: str) -> None:
    signer = new_signer()
    path = tmp_path / "certs"
    if fmt == "jwks":
        path.write_text(jwks(signer))
    elif fmt == "google-v1-certs":
        path.write_text(json.dumps({signer.kid: certificate_pem(signer)}))
    elif fmt == "pem-certificate":
        path.write_text(certificate_pem(signer))
    else:
        path.write_bytes(
            signer.key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    verifier = PubSubOidc(AUDIENCE, frozenset({PUSHER}), path)
    assert verifier.verify(f"Bearer {signer.token()}") == PUSHER


def test_rotated_keys_are_picked_up_without_a_restart(tmp_path: Path) -> None:
    old, new = new_signer(), new_signer()
    path = tmp_path / "certs.json"
    path.write_text(jwks(old))
    verifier = PubSubOidc(AUDIENCE, frozenset({PUSHER}), path)
    assert verifier.verify(f"Bearer {old.token()}") == PUSHER
    path.write_text(jwks(new) + "\n")  # a refresh job rewrites the file
    assert verifier.verify(f"Bearer {new.token()}") == PUSHER


# -- the endpoint against the real stack ------------------------------------------------------
@dataclass
class Endpoint:
    url: str
    address: tuple[str, int]
    tenant: str
    bucket: str


@contextlib.contextmanager
def events_endpoint(settings: Settings, tenant: str, bucket: str) -> Iterator[Endpoint]:
    """`mmrag events serve` in this process: the bridge connects with workers'
    temporal_client.connect(), the server listens on a free loopback port."""
    config = EventsConfig.from_settings(settings, tenant)
    bridge = EventBridge.connect(settings, tenant)
    server = make_server(bridge, config, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Endpoint(
            f"http://127.0.0.1:{server.server_port}/",
            ("127.0.0.1", server.server_port),
            tenant,
            bucket,
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        bridge.close()


def events_settings(certs: Path, bucket: str, **kw: object) -> Settings:
    return Settings(  # type: ignore[arg-type]
        **{
            "events_auth": "oidc",
            "events_audience": AUDIENCE,
            "events_service_accounts": f"{PUSHER}, other@proj.iam.gserviceaccount.com",
            "events_certs_file": str(certs),
            "events_buckets": f"{bucket}/inbox/",
            **kw,
        }
    )


def envelope(kind: str, bucket: str, name: str, generation: str) -> bytes:
    resource = {"bucket": bucket, "name": name, "generation": generation}
    return json.dumps(
        {
            "message": {
                "attributes": {
                    "eventType": kind,
                    "bucketId": bucket,
                    "objectId": name,
                    "objectGeneration": generation,
                },
                "data": base64.b64encode(json.dumps(resource).encode()).decode(),
                "messageId": uuid.uuid4().hex,
            },
            "subscription": "projects/p/subscriptions/s",
        }
    ).encode()


def push(url: str, body: bytes, authorization: str | None) -> int:
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


@pytest.fixture(scope="module")
def signer() -> Signer:
    return new_signer()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory, signer: Signer) -> Path:
    path = tmp_path_factory.mktemp("events") / "google-certs.json"
    path.write_text(jwks(signer))
    return path


@pytest.fixture(scope="module")
def bucket(test_stack: ServerStack) -> str:
    gcs = storage.Client(project="test", credentials=AnonymousCredentials())
    return str(gcs.create_bucket(f"ev-{uuid.uuid4().hex[:8]}").name)


async def test_signed_notifications_ingest_and_delete_idempotently(
    worker: Workers,
    client: Client,
    test_stack: ServerStack,
    signer: Signer,
    certs: Path,
    bucket: str,
    tmp_path: Path,
) -> None:
    tenant = f"events-{uuid.uuid4().hex[:6]}"
    grant_root(test_stack.state_dir, tenant, f"gs://{bucket}/")
    blob = (
        storage.Client(project="test", credentials=AnonymousCredentials())
        .bucket(bucket)
        .blob("inbox/photo.png")
    )
    files = write_corpus(tmp_path / "e", per_class=1, seed=81)
    blob.upload_from_filename(str(files[0][0]))
    blob.reload()
    gen1 = str(blob.generation)
    uri = f"gs://{bucket}/inbox/photo.png"
    asset_id = asset_id_for(tenant, uri)

    def signed(kind: str, generation: str) -> int:
        body = envelope(kind, bucket, "inbox/photo.png", generation)
        return push(server.url, body, f"Bearer {signer.token()}")

    with events_endpoint(events_settings(certs, bucket), tenant, bucket) as server:
        assert await asyncio.to_thread(signed, "OBJECT_FINALIZE", gen1) == 204
        assert await asyncio.to_thread(signed, "OBJECT_FINALIZE", gen1) == 204  # redelivery
        first = client.get_workflow_handle(ingest_asset_workflow_id(tenant, uri, gen1))
        assert (await asyncio.wait_for(first.result(), timeout=60))["ingested"] == 1
        runs = [w async for w in client.list_workflows(f'WorkflowId = "{first.id}"')]
        assert len(runs) == 1  # the redelivery started nothing
        assert milvus_pks(tenant) == [f"{asset_id}:image"]

        # Overwrite (generation 2), then the delete of generation 1 arrives late.
        blob.upload_from_filename(str(files[1][0]))
        blob.reload()
        gen2 = str(blob.generation)
        assert await asyncio.to_thread(signed, "OBJECT_FINALIZE", gen2) == 204
        second = client.get_workflow_handle(ingest_asset_workflow_id(tenant, uri, gen2))
        assert (await asyncio.wait_for(second.result(), timeout=60))["ingested"] == 1
        assert await asyncio.to_thread(signed, "OBJECT_DELETE", gen1) == 204
        stale = client.get_workflow_handle(forget_workflow_id(tenant, asset_id, gen1))
        assert (await asyncio.wait_for(stale.result(), timeout=60))["forgotten"] == 0
        assert milvus_pks(tenant) == [f"{asset_id}:image"]
        assert await asyncio.to_thread(signed, "OBJECT_DELETE", gen2) == 204
        current = client.get_workflow_handle(forget_workflow_id(tenant, asset_id, gen2))
        assert (await asyncio.wait_for(current.result(), timeout=60))["forgotten"] == 1
        assert milvus_pks(tenant) == []


def _forgeries(signer: Signer, url_token: str) -> dict[str, tuple[str, str | None, int]]:
    """name -> (path, Authorization header, expected status) for an OBJECT_FINALIZE."""
    attacker = Signer(new_signer().key, signer.kid)  # its own key, the real key id
    now = int(time.time())
    valid = f"Bearer {signer.token()}"
    claims = {"iss": "https://accounts.google.com", "aud": AUDIENCE, "email": PUSHER}
    return {
        "no credential": ("/", None, 401),
        "a static token": ("/", "Bearer s3cret-static-token-value", 401),
        "the token in the URL": (f"/?token={url_token}", None, 400),
        "a URL token besides a valid header": ("/?token=s3cret", valid, 400),
        "signed by another key under the real key id": ("/", f"Bearer {attacker.token()}", 401),
        "signed by an unknown key": ("/", f"Bearer {new_signer().token()}", 401),
        "alg none": (
            "/",
            "Bearer " + jwt.encode({**claims, "iat": now, "exp": now + 600}, None, "none"),
            401,
        ),
        "HS256 keyed with the public key": (
            "/",
            "Bearer " + hs256_with_public_key(signer, {**claims, "iat": now, "exp": now + 600}),
            401,
        ),
        "another audience": ("/", f"Bearer {signer.token(aud='https://other.example/')}", 401),
        "expired": ("/", f"Bearer {signer.token(iat=now - 7200, exp=now - 3600)}", 401),
        "another issuer": ("/", f"Bearer {signer.token(iss='https://evil.example')}", 401),
        "another service account": (
            "/",
            f"Bearer {signer.token(email='attacker@evil.iam.gserviceaccount.com')}",
            403,
        ),
        "an unverified email": ("/", f"Bearer {signer.token(email_verified=False)}", 403),
    }


async def test_forged_pushes_are_refused_start_nothing_and_leak_no_token(
    client: Client,
    test_stack: ServerStack,
    signer: Signer,
    certs: Path,
    bucket: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    tenant = f"forged-{uuid.uuid4().hex[:6]}"
    grant_root(test_stack.state_dir, tenant, f"gs://{bucket}/")
    foreign = f"other-{uuid.uuid4().hex[:8]}"
    url_token = signer.token(sub="in-the-url")
    must_not_exist: list[str] = []
    with events_endpoint(events_settings(certs, bucket), tenant, bucket) as server:
        valid = f"Bearer {signer.token()}"
        cases = {
            name: (path, auth, status, bucket, f"inbox/{i}.png")
            for i, (name, (path, auth, status)) in enumerate(_forgeries(signer, url_token).items())
        }
        cases["a bucket not allowed"] = ("/", valid, 403, foreign, "inbox/x.png")
        cases["an allowed bucket outside its prefix"] = ("/", valid, 403, bucket, "private/x.png")
        for name, (path, auth, status, in_bucket, obj) in cases.items():
            url = server.url.rstrip("/") + path
            body = envelope("OBJECT_FINALIZE", in_bucket, obj, "1")
            assert await asyncio.to_thread(push, url, body, auth) == status, name
            must_not_exist.append(ingest_asset_workflow_id(tenant, f"gs://{in_bucket}/{obj}", "1"))
        # A delete for a foreign bucket is refused the same way (no Forget).
        body = envelope("OBJECT_DELETE", foreign, "inbox/x.png", "1")
        assert await asyncio.to_thread(push, server.url, body, valid) == 403
        must_not_exist.append(
            forget_workflow_id(tenant, asset_id_for(tenant, f"gs://{foreign}/inbox/x.png"), "1")
        )
        # Lengths are checked before anything is read, whoever sends them.
        head = f"POST / HTTP/1.1\nHost: x\nAuthorization: {valid}\nContent-Length: "
        for length, status in (("abc", 400), ("-1", 400), ("1048577", 413)):
            r = await asyncio.to_thread(raw_request, server.address, head + length, b"{" * 4096)
            assert r.status == status, length
    for workflow_id in must_not_exist:
        with pytest.raises(RPCError) as e:
            await client.get_workflow_handle(workflow_id).describe()
        assert e.value.status == RPCStatusCode.NOT_FOUND, workflow_id
    # The request lines were logged (so the scan means something), without a token.
    assert "POST /?<query removed>" in caplog.text
    assert url_token not in caplog.text and "token=" not in caplog.text
    assert "eyJ" not in caplog.text  # no JWT at all (base64 of '{"')


def test_slow_clients_are_cut_off(
    test_stack: ServerStack, signer: Signer, certs: Path, bucket: str
) -> None:
    settings = events_settings(certs, bucket, events_read_timeout_s=1.0)
    with events_endpoint(settings, "slow", bucket) as server:
        assert cut_off_slow_client(server.address, "POST / HTTP/1.1\nContent-Length: 100")
        # Signed, so it gets past the checks that need no body; then the body never comes.
        head = f"POST / HTTP/1.1\nAuthorization: Bearer {signer.token()}\nContent-Length: 100"
        with pytest.raises(AssertionError, match="closed the connection"):
            raw_request(server.address, head, b"{", timeout=30)
        assert push(server.url, b"{}", None) == 401  # others are still served


def test_a_static_token_is_an_explicit_opt_in_taken_from_the_header_only(
    test_stack: ServerStack, bucket: str
) -> None:
    token = "static-" + uuid.uuid4().hex
    settings = Settings(  # type: ignore[call-arg]
        events_auth="token", events_token=token, events_buckets=bucket
    )
    with events_endpoint(settings, "static", bucket) as server:
        body = envelope("OBJECT_METADATA_UPDATE", bucket, "a.png", "1")  # acted on: no
        assert push(server.url, body, f"Bearer {token}") == 204
        assert push(server.url, body, "Bearer " + "x" * len(token)) == 401
        assert push(f"{server.url}?token={token}", body, None) == 400


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({}, "MMRAG_EVENTS_AUDIENCE, MMRAG_EVENTS_SERVICE_ACCOUNTS, MMRAG_EVENTS_CERTS_FILE"),
        ({"MMRAG_EVENTS_AUTH": "token", "MMRAG_EVENTS_TOKEN": "short"}, "MMRAG_EVENTS_TOKEN"),
        ({"MMRAG_EVENTS_AUTH": "anyone"}, "MMRAG_EVENTS_AUTH"),
        (
            {
                "MMRAG_EVENTS_AUDIENCE": AUDIENCE,
                "MMRAG_EVENTS_SERVICE_ACCOUNTS": PUSHER,
                "MMRAG_EVENTS_CERTS_FILE": "CERTS",
            },
            "MMRAG_EVENTS_BUCKETS",
        ),
    ],
)
def test_events_serve_refuses_to_start_without_its_settings(
    tmp_path: Path, env: dict[str, str], named: str
) -> None:
    certs = tmp_path / "certs.json"
    certs.write_text(jwks(new_signer()))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MMRAG_EVENTS_")}
    env = {k: v.replace("CERTS", str(certs)) for k, v in env.items()}
    cmd = [sys.executable, "-m", "starters.cli", "events", "serve", "--port", str(free_port())]
    out = subprocess.run(
        cmd, env={**clean, **env}, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2, out.stderr
    assert named in out.stderr and "Traceback" not in out.stderr
