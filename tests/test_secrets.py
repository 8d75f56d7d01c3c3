"""Secrets never leak: a canary API key is planted in the generate worker, and every
Postgres login's password (random, made by the stack) is in the URL its users connect with
(tests/conftest.py: the owner's for this process, a role's own login for its workers); then
worker logs, workflow histories, the audit table and error messages are scanned for all.
The codec key is scanned for in tests/test_codec.py, where the encrypted worker runs.
Credentials and the stack's signing key are scanned for the same way; a credential is kept
only in the ``mmrag_auth`` header of the runs it started."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from sqlalchemy import text
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client, WorkflowFailureError

from settings import get_settings
from starters.ask import ask
from starters.ingest import start_ingest
from starters.synthetic_corpus import write_corpus
from tests.conftest import LLM_API_KEY, ServerStack, Workers
from tests.helpers import engine, wait_searchable
from tests.llm_server import LlmTestServer
from workers.auth import (
    HEADER,
    AuthClientInterceptor,
    ClientCredentials,
    issue_token,
    signing_key_from_settings,
)
from workflows.contracts import AskInput


async def test_canary_secret_appears_nowhere(
    worker: Workers, client: Client, llm: LlmTestServer, test_stack: ServerStack, tmp_path: Path
) -> None:
    tenant = f"canary-{uuid.uuid4().hex[:6]}"
    write_corpus(tmp_path / "c", per_class=1, seed=7)
    handle = await start_ingest(client, tenant, [str(tmp_path / "c")])
    await asyncio.wait_for(handle.result(), timeout=120)
    wait_searchable(tenant, 18)
    # A normal answer, then the provider rejects the key and echoes it back (401).
    llm.set_mode("ok")
    ok = await ask(client, AskInput(tenant, text="a red circle", max_answer_tokens=33))
    assert ok.answer_kind == "generated"
    llm.set_mode("status", status=401)
    rejected = await ask(client, AskInput(tenant, text="a blue circle", max_answer_tokens=34))
    llm.set_mode("ok")
    assert rejected.degraded and "OPENAI_API_KEY" in rejected.degraded_reason
    assert LLM_API_KEY not in rejected.answer + rejected.degraded_reason

    # The key did reach the provider (so the scan below is meaningful) ...
    assert any(
        LLM_API_KEY in h.get("authorization", h.get("Authorization", "")) for h in llm.headers
    )
    # Each database password is in the URL its users connected with (so it was there to
    # leak), and a CLI whose database is down must not echo it either.
    passwords = test_stack.db_passwords
    assert set(passwords) == {"postgres", "mmrag_ingest", "mmrag_query"}
    assert passwords["postgres"] in test_stack.env["MMRAG_DATABASE_URL"]
    assert passwords["mmrag_ingest"] in test_stack.env["MMRAG_DATABASE_URL_CPU"]
    assert passwords["mmrag_query"] in test_stack.env["MMRAG_DATABASE_URL_QUERY"]
    owner_password = passwords["postgres"]
    down = subprocess.run(
        [sys.executable, "-m", "starters.cli", "db", "upgrade"],
        env={
            **test_stack.env,
            "MMRAG_DATABASE_URL": f"postgresql+psycopg://postgres:{owner_password}@127.0.0.1:1/x",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert down.returncode != 0 and "Postgres is unreachable" in down.stderr, down.stderr
    assert owner_password not in down.stdout + down.stderr

    # ... and nowhere else: worker logs, every workflow history, the audit table.
    secrets = {"LLM key": LLM_API_KEY}
    secrets |= {f"{login}'s database password": p for login, p in passwords.items()}
    logs = list((test_stack.state_dir / "logs").glob("*.log"))
    assert len(logs) >= 3
    for log in logs:
        content = log.read_text(errors="replace")
        for name, secret in secrets.items():
            assert secret not in content, f"{name} in {log.name}"
    histories = 0
    async for wf in client.list_workflows():
        history = await client.get_workflow_handle(wf.id, run_id=wf.run_id).fetch_history()
        # Serialized events hold payload data as raw bytes (JSON would base64 them).
        stored = b"".join(e.SerializeToString() for e in history.events)
        for name, secret in secrets.items():
            assert secret.encode() not in stored, f"{name} in history {wf.id}"
        histories += 1
    assert histories > 2
    with engine().connect() as conn:
        from sqlalchemy import text

        rows = conn.execute(text("SELECT row_to_json(a)::text FROM audit_log a")).scalars().all()
    assert rows and not any(secret in r for r in rows for secret in secrets.values())


def without_credential_headers(event: HistoryEvent) -> bytes:
    """An event serialized without the ``mmrag_auth`` header, the one place a credential is
    kept (a start's header; encrypted with payload encryption on)."""
    copy = HistoryEvent()
    copy.CopyFrom(event)
    for attributes in (
        copy.workflow_execution_started_event_attributes,
        copy.start_child_workflow_execution_initiated_event_attributes,
        copy.child_workflow_execution_started_event_attributes,  # the server echoes it
        copy.workflow_execution_continued_as_new_event_attributes,
    ):
        if HEADER in attributes.header.fields:
            del attributes.header.fields[HEADER]
    return copy.SerializeToString()


async def test_credentials_and_the_signing_key_appear_nowhere_else(
    worker: Workers, client: Client, test_stack: ServerStack, tmp_path: Path
) -> None:
    """The stack's signing key and every credential (a canary writer token used for real
    runs, a forged and an expired one refused, and the operator tokens the test client
    mints) appear in no log, audit row, error or history, except the header of the runs they
    started."""
    tenant = f"canary-auth-{uuid.uuid4().hex[:6]}"
    key, kid = signing_key_from_settings(get_settings()) or (None, "")
    assert key is not None
    pem = (test_stack.state_dir / "auth" / "signing_key.pem").read_text()
    key_body = "".join(line for line in pem.splitlines() if not line.startswith("-----"))
    raw_key = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    canary = issue_token(key, kid, [tenant], "writer", 900, subject="canary")
    forged = canary[: canary.rindex(".") + 1] + "A" * 86
    expired = issue_token(key, kid, [tenant], "writer", 60, now=time.time() - 600)
    address = test_stack.endpoints["temporal_address"]

    async def as_caller(token: str) -> Client:
        credentials = [AuthClientInterceptor(ClientCredentials(token))]
        return await Client.connect(address, namespace="default", interceptors=credentials)

    write_corpus(tmp_path / "c", per_class=1, seed=8)
    handle = await start_ingest(await as_caller(canary), tenant, [str(tmp_path / "c")])
    assert (await asyncio.wait_for(handle.result(), timeout=120)).ingested == 18
    started = (await handle.fetch_history()).events[0]
    header = started.workflow_execution_started_event_attributes.header.fields[HEADER]
    assert canary.encode() in header.data  # it was there to leak
    errors = []
    for token in (forged, expired):
        refused = await start_ingest(await as_caller(token), tenant, [str(tmp_path / "c")])
        with pytest.raises(WorkflowFailureError) as failed:
            await asyncio.wait_for(refused.result(), timeout=60)
        errors.append(f"{failed.value} {failed.value.cause}")

    # Every token of this key begins with the same signed header: it finds minted ones too.
    token_prefix = canary.split(".")[0] + "."
    secrets = {
        "signing key": key_body,
        "canary token": canary,
        "forged token": forged,
        "expired token": expired,
        "a token of the stack's key": token_prefix,
    }
    for error in errors:
        assert "unauthorized" in error
        assert not [name for name, s in secrets.items() if s in error], error
    for log in (test_stack.state_dir / "logs").glob("*.log"):
        content = log.read_text(errors="replace")
        assert not [name for name, s in secrets.items() if s in content], log.name
    histories = 0
    async for wf in client.list_workflows():
        history = await client.get_workflow_handle(wf.id, run_id=wf.run_id).fetch_history()
        stored = b"".join(without_credential_headers(e) for e in history.events)
        for name, secret in {**secrets, "raw signing key": raw_key}.items():
            needle = secret if isinstance(secret, bytes) else secret.encode()
            assert needle not in stored, f"{name} in history {wf.id}"
        histories += 1
    assert histories > 3
    with engine().connect() as conn:
        rows = conn.execute(text("SELECT row_to_json(a)::text FROM audit_log a")).scalars().all()
    refusals = [r for r in rows if '"unauthorized"' in r and tenant in r]
    assert len(refusals) == 2  # the forged and the expired start, audited
    assert not [name for r in rows for name, s in secrets.items() if s in r]
