"""Tenant credentials (workers/auth.py): every run proves who started it.

Each attack is reproduced first, against the real servers and worker processes: a client
with no credential, an expired, forged or unknown-key one, a credential for another tenant
(started from the `temporal` CLI as another backend would), a reader trying Forget, a writer
trying Reindex. Each is refused before any workflow code runs, the victim's data stays, and
the refusal is audited without the token. The proof travels on to child workflows and across
continue-as-new, after the token itself has expired. Replay of recorded histories after key
rotation and expiry is in tests/test_replay.py; the canary scan in tests/test_secrets.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import text
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError

from settings import REPO_ROOT, get_settings
from starters.ingest import start_ingest
from starters.lifecycle import start_forget, start_reindex, start_watch
from starters.synthetic_corpus import write_corpus
from tests.conftest import ServerStack, Workers
from tests.helpers import (
    assets_locked,
    engine,
    issued_token,
    milvus_pks,
    registry_rows,
    temporal_cli_execute,
    wait_searchable,
)
from workers.auth import (
    HEADER,
    UNAUTHORIZED,
    AuthClientInterceptor,
    ClientCredentials,
    CredentialError,
    issue_token,
    kid_for,
    load_signing_key,
    load_verify_keys,
    parse_ttl,
    signing_key_from_settings,
    token_from_payload,
    verify_token,
)
from workflows.contracts import (
    ForgetInput,
    IngestBatchInput,
    IngestResult,
    ReindexInput,
    WatchPrefixInput,
)

CORPUS = 18  # write_corpus(per_class=1)
FOREIGN_KEY = Ed25519PrivateKey.generate()  # a key no worker trusts


# -- tokens, no servers ---------------------------------------------------------------------
def test_a_token_proves_its_claims_and_nothing_else() -> None:
    key = Ed25519PrivateKey.generate()
    kid = kid_for(key.public_key())
    keys = {kid: key.public_key()}
    token = issue_token(key, kid, ["acme", "globex"], "writer", 60, subject="svc-a")
    cred = verify_token(token, keys)
    assert (cred.tenants, cred.role, cred.subject, cred.kid) == (
        ("acme", "globex"),
        "writer",
        "svc-a",
        kid,
    )
    assert cred.allows("globex", "reader") and cred.allows("acme", "writer")
    assert not cred.allows("acme", "operator") and not cred.allows("initech", "reader")
    operator = verify_token(issue_token(key, kid, ["*"], "operator", 60), keys)
    assert operator.allows("any-tenant", "operator")

    bad = {
        "expired": (issue_token(key, kid, ["acme"], "writer", 60, now=time.time() - 120), keys),
        "bad signature": (issue_token(FOREIGN_KEY, kid, ["acme"], "writer", 60), keys),
        "unknown key id": (
            issue_token(FOREIGN_KEY, kid_for(FOREIGN_KEY.public_key()), ["acme"], "writer", 60),
            keys,
        ),
        "not a signed token": ("not-a-jwt", keys),
    }
    for phrase, (candidate, trusted) in bad.items():
        with pytest.raises(CredentialError, match=phrase) as refused:
            verify_token(candidate, trusted)
        assert "mmrag token issue" in str(refused.value) or "VERIFY_KEYS" in str(refused.value)
    with pytest.raises(CredentialError, match="operators only"):
        issue_token(key, kid, ["*"], "writer", 60)
    assert parse_ttl("15m").total_seconds() == 900 and parse_ttl("2h").total_seconds() == 7200
    with pytest.raises(ValueError, match="15m"):
        parse_ttl("soon")


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "starters.cli", "token", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=REPO_ROOT,
    )


def test_cli_issues_tokens_and_rotates_keys(tmp_path: Path) -> None:
    """`mmrag token keygen` writes a private key only its owner reads and adds its public
    key to the verification file, keeping older keys (rotation); `mmrag token issue` prints
    a token and nothing else."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMRAG_AUTH")}
    env["MMRAG_STATE_DIR"] = str(tmp_path / "state")
    auth = tmp_path / "state" / "auth"

    missing = _cli(env, "issue", "--tenant", "acme", "--role", "reader")
    assert missing.returncode == 2 and "MMRAG_AUTH_SIGNING_KEY_FILE" in missing.stderr

    assert _cli(env, "keygen").returncode == 0
    assert stat.S_IMODE((auth / "signing_key.pem").stat().st_mode) == 0o600
    first = _cli(env, "issue", "--tenant", "acme", "--tenant", "globex", "--role", "writer")
    assert first.returncode == 0, first.stderr
    token = first.stdout.strip()
    assert token.count(".") == 2 and "\n" not in token
    cred = verify_token(token, load_verify_keys(auth / "verify_keys.json"))
    assert (cred.tenants, cred.role) == (("acme", "globex"), "writer")
    assert cred.expires_at - cred.issued_at == 900  # --ttl defaults to 15m

    assert _cli(env, "keygen").returncode == 0  # rotation: a new key, the old one still trusted
    keys = load_verify_keys(auth / "verify_keys.json")
    assert len(keys) == 2
    verify_token(token, keys)
    _, new_kid = load_signing_key((auth / "signing_key.pem").read_bytes(), "new")
    second = _cli(env, "issue", "--tenant", "acme", "--role", "reader", "--ttl", "30s")
    assert verify_token(second.stdout.strip(), keys).kid == new_kid != cred.kid

    refused = _cli(env, "issue", "--tenant", "*", "--role", "writer")
    assert refused.returncode == 2 and "operators only" in refused.stderr
    env["MMRAG_AUTH_SIGNING_KEY_FILE"] = str(tmp_path / "nowhere.pem")
    unreadable = _cli(env, "issue", "--tenant", "acme", "--role", "reader")
    assert unreadable.returncode == 2 and "MMRAG_AUTH_SIGNING_KEY_FILE" in unreadable.stderr


# -- against the real servers ---------------------------------------------------------------
def stack_key() -> tuple[Ed25519PrivateKey, str]:
    key = signing_key_from_settings(get_settings())
    assert key is not None
    return key


async def client_with(test_stack: ServerStack, token: str | None) -> Client:
    """A client of another backend: with this token in ``mmrag_auth``, or none at all."""
    interceptors = [AuthClientInterceptor(ClientCredentials(token))] if token else []
    return await Client.connect(
        test_stack.endpoints["temporal_address"], namespace="default", interceptors=interceptors
    )


async def refusal(handle: WorkflowHandle) -> ApplicationError:  # type: ignore[type-arg]
    with pytest.raises(WorkflowFailureError) as failed:
        await asyncio.wait_for(handle.result(), timeout=60)
    cause = failed.value.cause
    assert isinstance(cause, ApplicationError), cause
    assert cause.type == UNAUTHORIZED and cause.non_retryable
    return cause


@dataclass
class Victim:
    tenant: str
    uri: str

    def intact(self) -> None:
        """Every asset still ingested and searchable: the attack changed nothing."""
        rows = registry_rows(self.tenant)
        assert len(rows) == CORPUS and {r.status for r in rows} == {"ingested"}
        assert len(milvus_pks(self.tenant)) == CORPUS


@pytest_asyncio.fixture(scope="module")
async def victim(
    worker: Workers, client: Client, tmp_path_factory: pytest.TempPathFactory
) -> Victim:
    """A tenant with a corpus, ingested by its rightful operator."""
    tenant = f"victim-{uuid.uuid4().hex[:6]}"
    folder = tmp_path_factory.mktemp("victim") / "corpus"
    write_corpus(folder, per_class=1, seed=31)
    handle = await start_ingest(client, tenant, [str(folder)])
    assert (await asyncio.wait_for(handle.result(), timeout=180)).ingested == CORPUS
    wait_searchable(tenant, CORPUS)
    return Victim(tenant, folder.as_uri())


async def test_a_start_without_a_credential_is_refused(
    test_stack: ServerStack, victim: Victim
) -> None:
    """The attack: any Temporal client forgets another tenant's media by naming it."""
    attacker = await client_with(test_stack, None)
    handle = await start_forget(
        attacker, ForgetInput(victim.tenant, uri_prefix=victim.uri, delete_object=True)
    )
    cause = await refusal(handle)
    assert "no credential" in cause.message and HEADER in cause.message
    assert "mmrag token issue" in cause.message
    victim.intact()


@pytest.mark.parametrize("kind", ["expired", "forged", "unknown key"])
async def test_expired_forged_and_unknown_key_credentials_are_refused(
    test_stack: ServerStack, victim: Victim, kind: str
) -> None:
    key, kid = stack_key()
    tenants = [victim.tenant]
    token = {
        # Issued (correctly) two minutes ago for one minute.
        "expired": issue_token(key, kid, tenants, "writer", 60, now=time.time() - 120),
        # The stack's key id, signed by another key.
        "forged": issue_token(FOREIGN_KEY, kid, ["*"], "operator", 60),
        # A key of its own that the workers never trusted.
        "unknown key": issue_token(
            FOREIGN_KEY, kid_for(FOREIGN_KEY.public_key()), ["*"], "operator", 60
        ),
    }[kind]
    attacker = await client_with(test_stack, token)
    cause = await refusal(
        await start_forget(attacker, ForgetInput(victim.tenant, uri_prefix=victim.uri))
    )
    expected = {"expired": "expired at", "forged": "bad signature", "unknown key": "unknown key id"}
    assert expected[kind] in cause.message, cause.message
    victim.intact()


async def test_a_credential_for_another_tenant_is_refused_from_the_temporal_cli(
    worker: Workers, client: Client, test_stack: ServerStack, victim: Victim, tmp_path: Path
) -> None:
    """Another backend with a valid writer credential for its own tenant names the
    victim's tenant: refused. With the victim's own credential the same command works."""
    own = f"own-{uuid.uuid4().hex[:6]}"
    attack = {"tenant": victim.tenant, "uri_prefix": victim.uri, "reason": "t-1"}
    done = temporal_cli_execute(
        test_stack.endpoints["temporal_address"],
        "Forget",
        attack,
        f"cli-Forget-{uuid.uuid4().hex[:8]}",
        issued_token([own], "writer"),
    )
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert UNAUTHORIZED in out and f"not '{victim.tenant}'" in out, out
    victim.intact()

    # The rightful writer, same command: the header is read and accepted.
    tenant = f"cli-writer-{uuid.uuid4().hex[:6]}"
    write_corpus(tmp_path / "c", per_class=1, seed=32)
    handle = await start_ingest(client, tenant, [str(tmp_path / "c")])
    assert (await asyncio.wait_for(handle.result(), timeout=180)).ingested == CORPUS
    payload = {"tenant": tenant, "uri_prefix": (tmp_path / "c").as_uri(), "reason": "t-2"}
    done = temporal_cli_execute(
        test_stack.endpoints["temporal_address"],
        "Forget",
        payload,
        f"cli-Forget-{uuid.uuid4().hex[:8]}",
        issued_token([tenant], "writer"),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["result"]["forgotten"] == CORPUS


async def test_a_reader_cannot_forget_but_a_writer_can(
    worker: Workers, client: Client, test_stack: ServerStack, tenant: str, tmp_path: Path
) -> None:
    write_corpus(tmp_path / "c", per_class=1, seed=33)
    handle = await start_ingest(client, tenant, [str(tmp_path / "c")])
    assert (await asyncio.wait_for(handle.result(), timeout=180)).ingested == CORPUS
    forget = ForgetInput(tenant, uri_prefix=(tmp_path / "c").as_uri(), reason="t-3")

    reader = await client_with(test_stack, issued_token([tenant], "reader"))
    cause = await refusal(await start_forget(reader, forget))
    assert "Forget needs role writer" in cause.message and "--role writer" in cause.message
    assert {r.status for r in registry_rows(tenant)} == {"ingested"}

    writer = await client_with(test_stack, issued_token([tenant], "writer"))
    # A new id: the refused run closed the reader's (same derived id, USE_EXISTING).
    result = await writer.execute_workflow(
        "Forget", forget, id=f"forget/{tenant}/writer", task_queue="mmrag", result_type=dict
    )
    assert result["forgotten"] == CORPUS
    assert {r.status for r in registry_rows(tenant)} == {"forgotten"}


async def test_reindex_is_for_operators_only(test_stack: ServerStack, victim: Victim) -> None:
    writer = await client_with(test_stack, issued_token([victim.tenant], "writer"))
    refused = await refusal(
        await start_reindex(writer, ReindexInput(mode="incremental", tenant=victim.tenant))
    )
    assert "Reindex needs role operator" in refused.message
    everyone = await start_reindex(writer, ReindexInput(mode="full", model="hf-hub:evil/model"))
    assert "needs role operator" in (await refusal(everyone)).message


async def test_the_refusal_is_audited_without_the_token(
    test_stack: ServerStack, victim: Victim
) -> None:
    token = issued_token([f"own-{uuid.uuid4().hex[:6]}"], "writer", subject="svc-audit-canary")
    attacker = await client_with(test_stack, token)
    handle = await start_forget(attacker, ForgetInput(victim.tenant, uri_prefix=victim.uri))
    await refusal(handle)
    with engine().connect() as conn:
        rows = conn.execute(
            text(
                "SELECT action, tenant, actor, details, row_to_json(a)::text AS whole "
                "FROM audit_log a WHERE workflow_id = :id AND run_id = :run"
            ),
            {"id": handle.id, "run": handle.result_run_id},
        ).all()
    assert len(rows) == 1, rows
    action, tenant, actor, details, whole = rows[0]
    assert (action, tenant, actor) == ("unauthorized", victim.tenant, "svc-audit-canary")
    assert details["workflow_type"] == "Forget" and details["required_role"] == "writer"
    assert details["credential_role"] == "writer" and details["kid"] == stack_key()[1]
    assert f"not '{victim.tenant}'" in details["reason"]
    signature = token.rsplit(".", 1)[1]
    assert token not in whole and signature not in whole
    victim.intact()


def started_header(events: list, event_type: int) -> str:  # type: ignore[type-arg]
    """The token in the ``mmrag_auth`` header of a run's first event."""
    first = events[0]
    assert first.event_type == event_type
    header = first.workflow_execution_started_event_attributes.header.fields
    return token_from_payload(header.get(HEADER))


async def test_child_workflows_carry_the_credential(
    worker: Workers, client: Client, test_stack: ServerStack, tenant: str, tmp_path: Path
) -> None:
    """WatchPrefix (writer) starts IngestBatch as a child: the child runs on the parent's
    credential, which it carries in its own header."""
    write_corpus(tmp_path / "c", per_class=1, seed=34)
    token = issued_token([tenant], "writer")
    writer = await client_with(test_stack, token)
    watch = await start_watch(writer, WatchPrefixInput(tenant, (tmp_path / "c").as_uri()))
    result = await asyncio.wait_for(watch.result(), timeout=180)
    assert (result.ingested, result.failed) == (CORPUS, 0)
    child = client.get_workflow_handle(f"{watch.id}/pass-0")
    history = await child.fetch_history()
    started = EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED
    assert started_header(list(history.events), started) == token
    assert history.events[0].workflow_execution_started_event_attributes.parent_workflow_execution


async def test_continue_as_new_carries_the_credential_past_its_expiry(
    worker: Workers, client: Client, test_stack: ServerStack, tenant: str, tmp_path: Path
) -> None:
    """A long ingest continues as new after 20 pages; the credential it started with has
    expired by then (the first run is held on a registry lock until it has), and the
    continued run goes on with it: the caller was allowed to start this job."""
    write_corpus(tmp_path / "c", per_class=2, seed=35)  # 36 objects, 1 per page: 2 runs
    first = await start_ingest(client, tenant, [str(tmp_path / "c")])
    assert (await asyncio.wait_for(first.result(), timeout=180)).ingested == 2 * CORPUS

    ttl = 8.0
    token = issued_token([tenant], "writer", ttl_s=ttl)
    expires = verify_token(token, load_verify_keys(auth_keys(test_stack))).expires_at
    writer = await client_with(test_stack, token)
    inp = IngestBatchInput(
        tenant, [(tmp_path / "c").as_uri()], force=True, page_size=1, batch_size=1
    )
    with assets_locked(tenant):  # the first page's record_outcomes waits here
        handle = await writer.start_workflow(
            "IngestBatch",
            inp,
            id=f"ingest-batch/{tenant}/long",
            task_queue="mmrag",
            result_type=IngestResult,
        )
        await workflow_code_ran(handle)  # accepted while the token was valid
        await asyncio.sleep(max(0.0, expires - time.time()) + 1)
    result = await asyncio.wait_for(handle.result(), timeout=300)
    assert (result.ingested, result.failed) == (2 * CORPUS, 0)
    runs = [w async for w in client.list_workflows(f'WorkflowId = "{handle.id}"')]
    assert len(runs) >= 2  # it did continue as new
    last = max(runs, key=lambda w: w.start_time)
    assert last.start_time.timestamp() > expires  # ... after the token expired
    history = await client.get_workflow_handle(handle.id, run_id=last.run_id).fetch_history()
    started = EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED
    assert started_header(list(history.events), started) == token


def auth_keys(test_stack: ServerStack) -> Path:
    return test_stack.state_dir / "auth" / "verify_keys.json"


async def workflow_code_ran(handle: WorkflowHandle) -> None:  # type: ignore[type-arg]
    """Wait until the run scheduled an activity: it passed the credential check."""
    scheduled = EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    for _ in range(300):
        history = await handle.fetch_history()
        if any(e.event_type == scheduled for e in history.events):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{handle.id} scheduled no activity in 30 s")
