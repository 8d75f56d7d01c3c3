"""Payload encryption: the codec, the codec server, and real encrypted runs.

The end-to-end tests stop the shared (plaintext) workers, run one encrypted worker process on
the same queues, and check what the Temporal server actually stores: ciphertext for inputs,
results, local activity markers and failure messages; plaintext only through the codec
(the client's, the codec server's for the ``temporal`` CLI). The shared workers are
restarted afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from google.protobuf.message import Message
from temporalio.api.common.v1 import Payload, SearchAttributes
from temporalio.api.failure.v1 import Failure
from temporalio.client import Client, WorkflowFailureError, WorkflowHistory
from temporalio.exceptions import ApplicationError
from temporalio.worker import Replayer

from starters.background import WorkerProcess
from starters.codec_server import READY_LINE, CodecServerConfig, make_server
from starters.ingest import start_ingest
from starters.synthetic_corpus import write_corpus
from tests.conftest import (
    LLM_ENV,
    ServerStack,
    Workers,
    shared_worker_env,
    start_shared_workers,
)
from tests.helpers import milvus_pks, wait_searchable
from tests.llm_server import LlmTestServer
from workers.codec import (
    ENCODING,
    CodecConfigError,
    CodecKeyError,
    EncryptionCodec,
    Keyring,
    codec_from_settings,
)
from workers.settings import REPO_ROOT, Settings
from workers.temporal_client import connect, data_converter
from workflows.ask import Ask
from workflows.contracts import ASK_WORKFLOW, TASK_QUEUE, AskInput, AskResult, IngestResult
from workflows.ingest import IngestAsset, IngestBatch

TEMPORAL = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "temporal"
UI_ORIGIN = "http://localhost:8233"


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def json_payload(value: object) -> Payload:
    return Payload(metadata={"encoding": b"json/plain"}, data=json.dumps(value).encode())


def codec(keys: dict[str, str], active: str, compress_min_bytes: int = 4096) -> EncryptionCodec:
    keyring = Keyring({k: base64.b64decode(v) for k, v in keys.items()}, active)
    return EncryptionCodec(keyring, compress_min_bytes)


def settings_with(**kw: object) -> Settings:
    """Settings from the test environment with these codec fields (and no others)."""
    base: dict[str, object] = {"codec_key": "", "codec_key_id": "", "codec_key_file": ""}
    return Settings(**{**base, **kw})  # type: ignore[arg-type]


# -- the codec ----------------------------------------------------------------------------
def test_roundtrip_hides_the_payload_and_names_its_key() -> None:
    c = codec({"k1": new_key()}, "k1")
    original = json_payload({"uri": "file:///secret/patient-42.png"})
    sealed = c.encode_payload(original)
    assert sealed.metadata["encoding"] == ENCODING
    assert sealed.metadata["encryption-key-id"] == b"k1"
    assert b"patient-42" not in sealed.SerializeToString()
    assert c.decode_payload(sealed) == original
    # Same input, fresh nonce: equal plaintexts do not give equal ciphertexts.
    assert c.encode_payload(original).data != sealed.data


def test_large_payloads_are_compressed_before_encryption() -> None:
    c = codec({"k1": new_key()}, "k1", compress_min_bytes=1024)
    big = json_payload({"answer": "a red circle on a white background. " * 3000})
    sealed = c.encode_payload(big)
    assert len(sealed.data) < len(big.data) // 10
    assert c.decode_payload(sealed) == big
    small = json_payload({"q": "x" * 100})
    overhead = len(c.encode_payload(small).data) - len(small.SerializeToString())
    assert overhead == 12 + 16 + 1  # nonce + tag + format flag: small ones are not compressed


def test_rotation_new_key_encrypts_old_keys_still_decrypt() -> None:
    k1, k2 = new_key(), new_key()
    before = codec({"k1": k1}, "k1").encode_payload(json_payload("old"))
    rotated = codec({"k2": k2, "k1": k1}, "k2")
    assert rotated.decode_payload(before) == json_payload("old")
    after = rotated.encode_payload(json_payload("new"))
    assert after.metadata["encryption-key-id"] == b"k2"


def test_missing_key_error_names_the_key_id_and_the_setting() -> None:
    k1 = new_key()
    sealed = codec({"k1": k1}, "k1").encode_payload(json_payload("x"))
    with pytest.raises(CodecKeyError) as e:
        codec({"k2": new_key()}, "k2").decode_payload(sealed)
    assert "'k1'" in str(e.value) and "MMRAG_CODEC_KEY_FILE" in str(e.value)
    assert k1 not in str(e.value)
    with pytest.raises(CodecKeyError, match=r"key id 'k1' but no codec key is configured.*"):
        EncryptionCodec(None).decode_payload(sealed)


def test_wrong_key_under_the_right_id_and_tampering_are_refused() -> None:
    sealed = codec({"k1": new_key()}, "k1").encode_payload(json_payload("x"))
    with pytest.raises(CodecKeyError, match="key id 'k1'.*not the one"):
        codec({"k1": new_key()}, "k1").decode_payload(sealed)
    # Relabelling the key id fails authentication (the id is in the AAD).
    keys = {"k1": new_key(), "k2": new_key()}
    sealed = codec(keys, "k1").encode_payload(json_payload("x"))
    sealed.metadata["encryption-key-id"] = b"k2"
    with pytest.raises(CodecKeyError, match="'k2'"):
        codec(keys, "k1").decode_payload(sealed)


def test_plaintext_payloads_pass_through() -> None:
    plain = json_payload({"written": "before encryption was turned on"})
    assert codec({"k1": new_key()}, "k1").decode_payload(plain) == plain
    assert EncryptionCodec(None).encode_payload(plain) == plain


@pytest.mark.parametrize("fmt", ["lines", "json", "toml"])
def test_key_file_formats_and_the_active_key(tmp_path: Path, fmt: str) -> None:
    k1, k2 = new_key(), new_key()
    if fmt == "lines":
        path = tmp_path / "keys"
        path.write_text(f"# newest first\nk2={k2}\nk1={k1}\n")
    elif fmt == "json":
        path = tmp_path / "keys.json"
        path.write_text(json.dumps({"active": "k2", "keys": {"k1": k1, "k2": k2}}))
    else:
        path = tmp_path / "keys.toml"
        path.write_text(f'active = "k2"\n[keys]\nk1 = "{k1}"\nk2 = "{k2}"\n')
    path.chmod(0o600)
    ring = Keyring.from_settings(settings_with(codec_key_file=str(path)))
    assert ring is not None and ring.active == "k2" and sorted(ring.keys) == ["k1", "k2"]
    assert k1 not in repr(ring) and k2 not in repr(ring)
    explicit = Keyring.from_settings(settings_with(codec_key_file=str(path), codec_key_id="k1"))
    assert explicit is not None and explicit.active == "k1"


def test_bad_key_settings_say_what_to_fix_without_echoing_the_key(tmp_path: Path) -> None:
    short = base64.b64encode(b"0123456789").decode()
    with pytest.raises(CodecConfigError, match="MMRAG_CODEC_KEY.*10 bytes") as e:
        Keyring.from_settings(settings_with(codec_key=short))
    assert short not in str(e.value)
    with pytest.raises(CodecConfigError, match="not base64"):
        Keyring.from_settings(settings_with(codec_key="not a key at all!"))
    ring = _lines(tmp_path, k1=new_key())
    with pytest.raises(CodecConfigError, match="names key 'k9'"):
        Keyring.from_settings(settings_with(codec_key_file=str(ring), codec_key_id="k9"))
    with pytest.raises(CodecConfigError, match="cannot read"):
        Keyring.from_settings(settings_with(codec_key_file=str(tmp_path / "absent")))
    assert Keyring.from_settings(settings_with()) is None


def _lines(tmp_path: Path, **keys: str) -> Path:
    path = tmp_path / f"ring-{uuid.uuid4().hex[:6]}"
    path.write_text("".join(f"{k}={v}\n" for k, v in keys.items()))
    path.chmod(0o600)
    return path


async def test_data_converter_encrypts_values_and_failure_messages() -> None:
    converter = data_converter(settings_with(codec_key=new_key(), codec_key_id="k1"))
    [payload] = await converter.encode([{"question": "where is patient 42?"}])
    assert payload.metadata["encoding"] == ENCODING
    assert (await converter.decode([payload]))[0] == {"question": "where is patient 42?"}
    failure = Failure()
    await converter.encode_failure(ApplicationError("file:///x/patient-42.png is corrupt"), failure)
    assert b"patient-42" not in failure.SerializeToString()
    decoded = await converter.decode_failure(failure)
    assert "patient-42" in str(decoded)
    plain = data_converter(settings_with())
    failure = Failure()
    await plain.encode_failure(ApplicationError("visible"), failure)
    assert failure.message == "visible"  # no key: failures stay readable in the UI


# -- the codec server ---------------------------------------------------------------------
@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, object]:
        return json.loads(self.body)  # type: ignore[no-any-return]


def http(
    method: str, url: str, body: object = None, headers: dict[str, str] | None = None
) -> Response:  # noqa: E501
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return Response(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read())
    except urllib.error.HTTPError as e:
        return Response(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read())


@dataclass
class RunningCodecServer:
    url: str
    codec: EncryptionCodec
    token: str


@pytest.fixture(scope="module")
def codec_keys() -> dict[str, str]:
    return {"k2": new_key(), "k1": new_key()}


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory, codec_keys: dict[str, str]) -> Path:
    path = tmp_path_factory.mktemp("keys") / "mmrag-keys"
    path.write_text("".join(f"{k}={v}\n" for k, v in codec_keys.items()))  # k2 is active
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def codec_server(key_file: Path) -> Iterator[RunningCodecServer]:
    token = "codec-token-" + uuid.uuid4().hex
    config = CodecServerConfig.from_settings(
        settings_with(codec_key_file=str(key_file), codec_server_token=token)
    )
    server = make_server(config, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    try:
        yield RunningCodecServer(f"http://{host}:{port}", config.codec, token)
    finally:
        server.shutdown()
        server.server_close()


def as_json(payload: Payload) -> dict[str, object]:
    return {
        "metadata": {k: base64.b64encode(v).decode() for k, v in payload.metadata.items()},
        "data": base64.b64encode(payload.data).decode(),
    }


def from_json(doc: dict[str, object]) -> Payload:
    return Payload(
        metadata={k: base64.b64decode(v) for k, v in doc.get("metadata", {}).items()},  # type: ignore[attr-defined]
        data=base64.b64decode(doc.get("data", "")),  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("route", ["/decode", "/encode"])
@pytest.mark.parametrize("origin", ["http://localhost:8233", "http://127.0.0.1:8233"])
def test_preflight_allows_the_ui_origin(
    codec_server: RunningCodecServer, route: str, origin: str
) -> None:  # noqa: E501
    r = http(
        "OPTIONS",
        codec_server.url + route,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,x-namespace,authorization",
        },
    )
    assert r.status == 200
    assert r.headers["access-control-allow-origin"] == origin
    assert r.headers["access-control-allow-credentials"] == "true"
    allowed = r.headers["access-control-allow-headers"].lower()
    assert {"content-type", "x-namespace", "authorization"} <= {
        h.strip() for h in allowed.split(",")
    }
    assert "POST" in r.headers["access-control-allow-methods"]


def test_other_origins_are_refused(codec_server: RunningCodecServer) -> None:
    evil = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    r = http("OPTIONS", codec_server.url + "/decode", headers=evil)
    assert r.status == 403 and "access-control-allow-origin" not in r.headers
    auth = {"Authorization": f"Bearer {codec_server.token}", "Origin": "https://evil.example"}
    r = http("POST", codec_server.url + "/decode", {"payloads": []}, auth)
    assert r.status == 403 and "access-control-allow-origin" not in r.headers


def test_bearer_token_is_enforced(codec_server: RunningCodecServer) -> None:
    sealed = codec_server.codec.encode_payload(json_payload({"q": "secret question"}))
    body = {"payloads": [as_json(sealed)]}
    assert http("POST", codec_server.url + "/decode", body).status == 401
    wrong = {"Authorization": "Bearer nope"}
    r = http("POST", codec_server.url + "/decode", body, wrong)
    assert r.status == 401 and codec_server.token not in r.body.decode()
    ok = {
        "Authorization": f"Bearer {codec_server.token}",
        "X-Namespace": "default",
        "Origin": UI_ORIGIN,
    }
    r = http("POST", codec_server.url + "/decode", body, ok)
    assert r.status == 200, r.body
    assert r.headers["access-control-allow-origin"] == UI_ORIGIN
    [decoded] = r.json()["payloads"]  # type: ignore[misc]
    assert from_json(decoded) == json_payload({"q": "secret question"})
    # /encode is the inverse (the UI uses it to send signals and start workflows).
    r = http("POST", codec_server.url + "/encode", {"payloads": [as_json(json_payload(1))]}, ok)
    [encoded] = r.json()["payloads"]  # type: ignore[misc]
    assert from_json(encoded).metadata["encryption-key-id"] == b"k2"
    assert codec_server.codec.decode_payload(from_json(encoded)) == json_payload(1)


def test_codec_server_reports_an_unknown_key_by_id(codec_server: RunningCodecServer) -> None:
    foreign = codec({"k0": new_key()}, "k0").encode_payload(json_payload("x"))
    auth = {"Authorization": f"Bearer {codec_server.token}"}
    r = http("POST", codec_server.url + "/decode", {"payloads": [as_json(foreign)]}, auth)
    assert r.status == 400
    assert "'k0'" in r.json()["error"]  # type: ignore[operator]


def test_codec_server_needs_a_key_and_can_restrict_namespaces(key_file: Path) -> None:
    with pytest.raises(CodecConfigError, match="MMRAG_CODEC_KEY"):
        CodecServerConfig.from_settings(settings_with())
    config = CodecServerConfig.from_settings(
        settings_with(codec_key_file=str(key_file), codec_server_namespaces="prod, staging")
    )
    server = make_server(config, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = "http://{}:{}/decode".format(*server.server_address[:2])
    try:
        assert http("POST", url, {"payloads": []}, {"X-Namespace": "prod"}).status == 200
        assert http("POST", url, {"payloads": []}, {"X-Namespace": "dev"}).status == 403
    finally:
        server.shutdown()
        server.server_close()


# -- real encrypted runs ------------------------------------------------------------------
@dataclass
class Encrypted:
    client: Client  # with the codec
    plain: Client  # without: sees what the server stores
    address: str
    key_file: Path
    worker: WorkerProcess


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def encrypted(
    test_stack: ServerStack, worker: Workers, llm: LlmTestServer, key_file: Path
) -> AsyncIterator[Encrypted]:
    """One encrypted worker process on the shared queues while the plaintext ones are stopped
    (a plaintext worker cannot read encrypted tasks); they are restarted afterwards, each
    with its own environment again."""
    shared = (worker.cpu, worker.encode, worker.generate, worker.query)
    await asyncio.gather(*(asyncio.to_thread(w.stop) for w in shared))
    enc = None
    try:
        enc = test_stack.start_worker(
            "all", MMRAG_CODEC_KEY_FILE=str(key_file), OPENAI_BASE_URL=llm.base_url, **LLM_ENV
        )
        address = test_stack.endpoints["temporal_address"]
        yield Encrypted(
            client=await connect(settings_with(codec_key_file=str(key_file))),
            plain=await Client.connect(address, namespace="default"),
            address=address,
            key_file=key_file,
            worker=enc,
        )
    finally:
        if enc is not None:
            enc.stop()
        restarted = await asyncio.to_thread(start_shared_workers, test_stack, llm)
        for role in shared_worker_env(llm):
            setattr(worker, role, getattr(restarted, role))


def payloads_in(message: Message) -> Iterator[Payload]:
    """Every Payload anywhere in a proto message (fields, repeated fields, maps)."""
    if isinstance(message, Payload):
        yield message
        return
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None:
            continue
        if isinstance(value, Message):
            values = [value]
        elif descriptor.message_type.GetOptions().map_entry:
            values = list(value.values())
        else:
            values = list(value)  # a repeated field
        for item in values:
            if isinstance(item, Message):
                yield from payloads_in(item)


# The SDK's own marker bookkeeping (local activity id, sequence and time; patch id) is written
# by the Rust core, not through the data converter. The local activity *result* is encrypted.
SDK_BOOKKEEPING = {"marker_recorded_event_attributes.details[data]"}


def unencrypted_payloads(message: Message, path: str = "") -> list[str]:
    """Where a stored history holds a payload the codec did not encrypt, other than in
    search attributes (which the server indexes, so they can never be encrypted)."""
    if isinstance(message, SearchAttributes):
        return []
    if isinstance(message, Payload):
        return [] if message.metadata.get("encoding") == ENCODING else [path]
    found: list[str] = []
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None:
            continue
        if isinstance(value, Message):
            items = [(descriptor.name, value)]
        elif descriptor.message_type.GetOptions().map_entry:
            items = [(f"{descriptor.name}[{k}]", v) for k, v in value.items()]
        else:
            items = [(descriptor.name, v) for v in value]
        for name, item in items:
            where = f"{path}.{name}" if path else name
            if isinstance(item, Message) and where not in SDK_BOOKKEEPING:
                found += unencrypted_payloads(item, where)
    return found


def stored_bytes(history: WorkflowHistory) -> bytes:
    return b"".join(e.SerializeToString() for e in history.events)


async def test_server_stores_ciphertext_and_the_cli_decodes_with_the_codec_server(
    encrypted: Encrypted,
    codec_server: RunningCodecServer,
    llm: LlmTestServer,
    tenant: str,
    tmp_path: Path,
) -> None:
    canary = f"zebracanary{uuid.uuid4().hex[:8]}"
    corpus = tmp_path / "corpus"
    files = write_corpus(corpus, per_class=1, seed=5)
    for path, _ in files[:6]:
        path.rename(path.with_name(f"{canary}-{path.name}"))
    (corpus / f"{canary}-broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")

    handle = await start_ingest(encrypted.client, tenant, [str(corpus)], batch_size=8)
    result: IngestResult = await asyncio.wait_for(handle.result(), timeout=120)
    assert (result.ingested, result.failed) == (18, 1)
    assert canary in result.failures[0].uri

    llm.set_mode("ok")
    wait_searchable(tenant, len(milvus_pks(tenant)))
    question = f"a red circle {canary}q"
    ask_id = f"ask/{tenant}/{uuid.uuid4().hex}"
    answer = await _ask(encrypted.client, ask_id, AskInput(tenant=tenant, text=question, top_k=3))
    assert answer.sources and answer.answer_kind == "generated"

    # A query image that does not exist: the failure message quotes its URI.
    fail_id = f"ask/{tenant}/{uuid.uuid4().hex}"
    missing = f"file:///nowhere/{canary}-missing.png"
    with pytest.raises(WorkflowFailureError) as failed:
        await _ask(encrypted.client, fail_id, AskInput(tenant=tenant, image_uri=missing))
    assert canary in str(failed.value.cause.cause)

    ingest_history = await encrypted.plain.get_workflow_handle(handle.id).fetch_history()
    histories = {
        "ingest": ingest_history,
        "ask": await encrypted.plain.get_workflow_handle(ask_id).fetch_history(),
        "failed ask": await encrypted.plain.get_workflow_handle(fail_id).fetch_history(),
    }
    decoder = codec_server.codec
    keys = [line.split("=", 1)[1].encode() for line in encrypted.key_file.read_text().split()]
    for name, history in histories.items():
        raw = stored_bytes(history)
        assert canary.encode() not in raw, f"plaintext in the stored {name} history"
        clear = [p for e in history.events for p in unencrypted_payloads(e)]
        assert not clear, f"unencrypted payloads in the {name} history: {clear}"
        # Search attributes are indexed by the server, so they are never encrypted.
        assert tenant.encode() in raw
        decoded = b"".join(
            decoder.decode_payload(p).data
            for e in history.events
            for p in payloads_in(e)
            if p.metadata.get("encoding") == ENCODING
        )
        assert canary.encode() in decoded, f"the {name} history does not carry the data"
        assert not any(k in raw or k in decoded for k in keys), f"codec key in the {name} history"

    # The temporal CLI shows plaintext through the codec server, and only through it.
    shown = _cli_show(encrypted.address, handle.id, codec_server)
    assert canary in shown
    assert canary not in _cli_show(encrypted.address, handle.id, None)
    assert question in _cli_show(encrypted.address, ask_id, codec_server)

    # Another backend without an SDK codec: the CLI encrypts the input and decrypts the
    # result through the codec server.
    cli_ask = subprocess.run(
        [
            *_cli(encrypted.address, codec_server),
            "workflow",
            "execute",
            "--type",
            ASK_WORKFLOW,
            "--task-queue",
            TASK_QUEUE,
            "--workflow-id",
            f"cli-ask/{tenant}/{uuid.uuid4().hex[:6]}",
            "--input",
            json.dumps({"tenant": tenant, "text": question, "generate": False, "top_k": 2}),
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli_ask.returncode == 0, cli_ask.stderr
    assert len(json.loads(cli_ask.stdout)["result"]["sources"]) == 2

    # Replay of an encrypted history needs the same converter, and works with it.
    replayer = Replayer(
        workflows=[IngestBatch, IngestAsset, Ask],
        data_converter=data_converter(settings_with(codec_key_file=str(encrypted.key_file))),
    )
    for history in histories.values():
        await replayer.replay_workflow(history)


async def test_wrong_key_gives_a_clear_error(
    encrypted: Encrypted, tenant: str, tmp_path: Path
) -> None:
    write_corpus(tmp_path / "c", per_class=1, seed=6)
    handle = await start_ingest(encrypted.client, tenant, [str(tmp_path / "c")], batch_size=18)
    await asyncio.wait_for(handle.result(), timeout=120)
    other = tmp_path / "other-keys"
    other.write_text(f"k2={new_key()}\n")  # same id, different key
    other.chmod(0o600)
    wrong = await connect(settings_with(codec_key_file=str(other)))
    with pytest.raises(CodecKeyError, match="key id 'k2'.*not the one") as e:
        await wrong.get_workflow_handle(handle.id, result_type=IngestResult).result()
    assert "MMRAG_CODEC_KEY" in str(e.value)
    keys = [line.split("=", 1)[1] for line in encrypted.key_file.read_text().split()]
    assert not any(k in str(e.value) for k in [*keys, other.read_text().split("=", 1)[1]])
    none = await connect(settings_with())
    with pytest.raises(CodecKeyError, match="no codec key is configured"):
        await none.get_workflow_handle(handle.id, result_type=IngestResult).result()
    assert codec_from_settings(settings_with()).enabled is False
    # The worker says which keys it holds, by id only.
    log = encrypted.worker.log()
    assert "payload encryption: Keyring(active='k2', ids=['k1', 'k2'])" in log
    for line in encrypted.key_file.read_text().split():
        assert line.split("=", 1)[1] not in log


async def _ask(client: Client, workflow_id: str, inp: AskInput) -> AskResult:
    return await asyncio.wait_for(
        client.execute_workflow(
            ASK_WORKFLOW, inp, id=workflow_id, task_queue=TASK_QUEUE, result_type=AskResult
        ),
        timeout=60,
    )


def _cli(address: str, server: RunningCodecServer | None) -> list[str]:
    """The temporal CLI against the test server, ignoring the user's config."""
    cmd = [
        str(TEMPORAL),
        "--address",
        address,
        "--namespace",
        "default",
        "--disable-config-env",
        "--disable-config-file",
    ]
    if server is not None:
        cmd += ["--codec-endpoint", server.url, "--codec-auth", f"Bearer {server.token}"]
    return cmd


def _cli_show(address: str, workflow_id: str, server: RunningCodecServer | None) -> str:
    cmd = [*_cli(address, server), "workflow", "show", "--workflow-id", workflow_id]
    out = subprocess.run([*cmd, "--output", "json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return _decode_json_payloads(out.stdout)


def _decode_json_payloads(text: str) -> str:
    """The CLI prints payload data base64-encoded in JSON output; unwrap it for searching."""
    found: list[str] = [text]

    def walk(node: object) -> None:
        if isinstance(node, dict):
            data = node.get("data")
            if isinstance(data, str) and "metadata" in node:
                with contextlib.suppress(ValueError):
                    found.append(base64.b64decode(data).decode(errors="replace"))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(json.loads(text))
    return "\n".join(found)


def test_codec_server_command_serves_and_stops_on_sigterm(key_file: Path) -> None:
    """`python -m starters.codec_server` (what `mmrag codec-server` runs): ready line, a
    decode, a clean exit on SIGTERM; the token is never printed."""
    from tests.conftest import free_port

    port = free_port()
    token = "tok-" + uuid.uuid4().hex
    env = {
        **os.environ,
        "MMRAG_CODEC_KEY_FILE": str(key_file),
        "MMRAG_CODEC_SERVER_TOKEN": token,
        "MMRAG_CODEC_SERVER_ORIGINS": "https://ui.example.com",
    }
    cmd = [sys.executable, "-m", "starters.codec_server", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(READY_LINE) and f":{port}" in line and token not in line
        assert "origins https://ui.example.com" in line and "token required" in line
        url = f"http://127.0.0.1:{port}"
        preflight = http("OPTIONS", url + "/decode", headers={"Origin": "https://ui.example.com"})
        assert preflight.status == 200
        assert http("OPTIONS", url + "/decode", headers={"Origin": UI_ORIGIN}).status == 403
        auth = {"Authorization": f"Bearer {token}"}
        assert http("POST", url + "/decode", {"payloads": []}, auth).status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    keyless = {k: v for k, v in env.items() if k != "MMRAG_CODEC_KEY_FILE"}
    out = subprocess.run(cmd, env=keyless, cwd=REPO_ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "MMRAG_CODEC_KEY" in out.stderr
