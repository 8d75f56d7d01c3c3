"""Secrets never leak: a canary API key is planted in the generate worker, and every
Postgres login's password (random, made by the stack) is in the URL its users connect with
(tests/conftest.py: the owner's for this process, a role's own login for its workers); then
worker logs, workflow histories, the audit table and error messages are scanned for all.
The codec key is scanned for in tests/test_codec.py, where the encrypted worker runs."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from pathlib import Path

from temporalio.client import Client

from starters.ask import ask
from starters.ingest import start_ingest
from starters.synthetic_corpus import write_corpus
from tests.conftest import LLM_API_KEY, ServerStack, Workers
from tests.helpers import engine, wait_searchable
from tests.llm_server import LlmTestServer
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
