"""Least privilege in Postgres: each worker role logs in as its own login, which is refused
what it must not do, and cannot become the owner.

The attack these tests first reproduce: workers used to log in as the owner and ``SET
ROLE`` to their role, so ``RESET ROLE`` gave the owner back, and the owner may disable the
audit log's append-only triggers and then rewrite history.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from pydantic import SecretStr
from sqlalchemy import Connection, create_engine, pool, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from temporalio.client import Client

from settings import Settings
from starters.ask import ask
from starters.ingest import start_ingest
from starters.synthetic_corpus import write_corpus
from tests.conftest import ServerStack, Workers
from tests.helpers import engine, wait_searchable
from workflows.contracts import QUERY_TASK_QUEUE, AskInput

LOGIN_ENV = {"mmrag_ingest": "MMRAG_DATABASE_URL_CPU", "mmrag_query": "MMRAG_DATABASE_URL_QUERY"}
DENIED = "permission denied|must be owner|append-only|must be superuser"

REFUSED = {
    "mmrag_ingest": [
        "UPDATE audit_log SET action = 'x'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
        "DELETE FROM assets",
        "DROP TABLE assets",
        "CREATE TABLE sneaky (id int)",
    ],
    "mmrag_query": [
        "UPDATE audit_log SET action = 'x'",
        "DELETE FROM audit_log",
        "INSERT INTO assets (tenant, asset_id, uri, generation, size_bytes, media_type, status, "
        "index_version) VALUES ('t', 'a', 'u', 'g', 0, 'm', 'ingested', 1)",
        "UPDATE assets SET status = 'x'",
        "UPDATE index_versions SET state = 'x'",
        "INSERT INTO reindex_runs (workflow_id, tenant_scope, mode, target_version, state) "
        "VALUES ('w', '*', 'full', 1, 'running')",
        # The lexical index (migration 0006): the query login reads it, never writes it.
        "INSERT INTO lexical_chunks (tenant, asset_id, chunk, body) VALUES ('t', 'a', 'c', 'x')",
        "UPDATE lexical_chunks SET caption = 'x'",
        "DELETE FROM lexical_chunks",
    ],
}
ALLOWED = {
    "mmrag_ingest": [
        "SELECT count(*) FROM assets",
        "INSERT INTO audit_log (tenant, action, idempotency_key) VALUES ('roles', 'probe', "
        "'roles/ingest') ON CONFLICT DO NOTHING",
        "UPDATE assets SET updated_at = updated_at WHERE false",
        "DELETE FROM lexical_chunks WHERE false",  # ingest, forget and re-index write it
        "UPDATE lexical_chunks SET caption = caption WHERE false",
    ],
    "mmrag_query": [
        "SELECT count(*) FROM assets",
        "SELECT count(*) FROM index_versions",
        "SELECT count(*) FROM lexical_chunks",
        "INSERT INTO audit_log (tenant, action, idempotency_key) VALUES ('roles', 'probe', "
        "'roles/query') ON CONFLICT DO NOTHING",
    ],
}
# What a worker whose login is taken over would try, to get out of its role or past the
# append-only audit log.
ESCAPES = [
    "SET ROLE postgres",
    "SET SESSION AUTHORIZATION postgres",
    "ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_update_delete",
    "ALTER TABLE audit_log DISABLE TRIGGER ALL",
    "DROP TRIGGER audit_log_no_update_delete ON audit_log",
    "DROP TRIGGER audit_log_no_truncate ON audit_log",
    "DROP FUNCTION audit_log_is_append_only() CASCADE",
    "SET session_replication_role = replica",  # would skip every ordinary trigger
    "ALTER TABLE audit_log OWNER TO CURRENT_USER",
    "ALTER ROLE CURRENT_USER SUPERUSER",
    "CREATE ROLE sneaky LOGIN SUPERUSER",
]


@pytest.fixture
def login(test_stack: ServerStack, request: pytest.FixtureRequest) -> Iterator[Connection]:
    """A connection made exactly as a worker of that login makes it: its own URL."""
    url = test_stack.env[LOGIN_ENV[request.param]]
    assert make_url(url).username == request.param
    eng = create_engine(url, poolclass=pool.NullPool)
    try:
        with eng.connect() as conn:
            yield conn
    finally:
        eng.dispose()


def _audit_row() -> int:
    with engine().begin() as conn:
        conn.execute(
            text(
                "INSERT INTO audit_log (tenant, action, idempotency_key) VALUES "
                "('roles', 'probe', 'roles/escape') ON CONFLICT DO NOTHING"
            )
        )
        return int(
            conn.execute(
                text("SELECT id FROM audit_log WHERE idempotency_key = 'roles/escape'")
            ).scalar_one()
        )


def test_set_role_from_the_owner_could_be_escaped(test_stack: ServerStack) -> None:
    """The attack, as the old configuration allowed it: the owner's login that only SET
    ROLE to mmrag_ingest gets the owner back with RESET ROLE, and may then disable the
    audit triggers. (Rolled back: this shows why workers no longer use the owner's login.)"""
    with engine().connect() as conn, conn.begin() as tx:
        conn.execute(text("SET ROLE mmrag_ingest"))
        conn.execute(text("RESET ROLE"))
        assert conn.execute(text("SELECT current_user")).scalar_one() == "postgres"
        conn.execute(text("ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_update_delete"))
        tx.rollback()


@pytest.mark.parametrize("login", list(LOGIN_ENV), indirect=True)
def test_worker_login_cannot_reset_into_the_owner(login: Connection) -> None:
    name = login.execute(text("SELECT session_user")).scalar_one()
    assert name in LOGIN_ENV
    login.execute(text("RESET ROLE"))
    login.execute(text("RESET SESSION AUTHORIZATION"))
    assert login.execute(text("SELECT current_user, session_user")).one() == (name, name)
    superuser = login.execute(text("SELECT rolsuper FROM pg_roles WHERE rolname = :n"), {"n": name})
    assert superuser.scalar_one() is False
    member_of = login.execute(
        text("SELECT pg_has_role(:n, 'postgres', 'MEMBER')"), {"n": name}
    ).scalar_one()
    assert member_of is False
    login.rollback()


@pytest.mark.parametrize("statement", ESCAPES)
@pytest.mark.parametrize("login", list(LOGIN_ENV), indirect=True)
def test_worker_login_cannot_touch_the_audit_triggers(login: Connection, statement: str) -> None:
    login.execute(text("RESET ROLE"))
    with pytest.raises(DBAPIError, match=DENIED):
        login.execute(text(statement))
    login.rollback()


@pytest.mark.parametrize("statement", ["UPDATE", "DELETE"])
@pytest.mark.parametrize("login", list(LOGIN_ENV), indirect=True)
def test_worker_login_cannot_rewrite_audit_rows(login: Connection, statement: str) -> None:
    row = _audit_row()
    login.execute(text("RESET ROLE"))
    # Not the owner: granting itself more is a no-op (PostgreSQL only warns) ...
    login.execute(text("GRANT UPDATE, DELETE ON audit_log TO CURRENT_USER"))
    sql = {
        "UPDATE": "UPDATE audit_log SET action = 'rewritten' WHERE id = :id",
        "DELETE": "DELETE FROM audit_log WHERE id = :id",
    }[statement]
    with pytest.raises(DBAPIError, match=DENIED):  # ... and the row stays as it was
        login.execute(text(sql), {"id": row})
    login.rollback()
    with engine().connect() as conn:
        action = conn.execute(text("SELECT action FROM audit_log WHERE id = :id"), {"id": row})
        assert action.scalar_one() == "probe"


def test_logins_need_their_own_password(test_stack: ServerStack) -> None:
    """A login's name alone, or another login's password, is not enough (SCRAM, no trust)."""
    owner = make_url(test_stack.env["MMRAG_DATABASE_URL"])
    ingest = make_url(test_stack.env["MMRAG_DATABASE_URL_CPU"])
    for attempt in (
        ingest._replace(password=None),
        ingest.set(password=owner.password),
        owner.set(password=ingest.password),
        owner._replace(password=None),
    ):
        eng = create_engine(attempt, poolclass=pool.NullPool)
        with pytest.raises(DBAPIError, match="password"):
            eng.connect().close()
        eng.dispose()


@pytest.mark.parametrize(
    ("role", "statement"), [(r, s) for r, stmts in REFUSED.items() for s in stmts]
)
def test_role_is_refused(test_stack: ServerStack, role: str, statement: str) -> None:
    eng = create_engine(test_stack.env[LOGIN_ENV[role]], poolclass=pool.NullPool)
    with pytest.raises(DBAPIError, match=DENIED), eng.begin() as conn:
        conn.execute(text(statement))
    eng.dispose()


@pytest.mark.parametrize(
    ("role", "statement"), [(r, s) for r, stmts in ALLOWED.items() for s in stmts]
)
def test_role_may_do_its_job(test_stack: ServerStack, role: str, statement: str) -> None:
    eng = create_engine(test_stack.env[LOGIN_ENV[role]], poolclass=pool.NullPool)
    with eng.begin() as conn:
        conn.execute(text(statement))
    eng.dispose()


def test_a_worker_without_its_own_login_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """An external database given only by the owner's URL: the worker does not fall back
    to the owner, it says which setting to add."""
    for variable in ("MMRAG_DATABASE_URL", *LOGIN_ENV.values()):
        monkeypatch.delenv(variable, raising=False)
    owner_only = Settings(
        _env_file=None, database_url=SecretStr("postgresql+psycopg://o:pw@db/mmrag")
    )  # type: ignore[call-arg]
    for role, variable in (
        ("cpu", "MMRAG_DATABASE_URL_CPU"),
        ("query", "MMRAG_DATABASE_URL_QUERY"),
    ):
        with pytest.raises(RuntimeError, match=variable):
            owner_only.for_database_role(role)
    with pytest.raises(RuntimeError, match="no Postgres access"):
        owner_only.for_database_role("encode").database_endpoint()
    own = Settings(  # type: ignore[call-arg]
        _env_file=None,
        database_url=SecretStr("postgresql+psycopg://o:pw@db/mmrag"),
        database_url_cpu=SecretStr("postgresql+psycopg://mmrag_ingest:pw2@db/mmrag"),
    )
    assert make_url(own.for_database_role("cpu").database_endpoint()).username == "mmrag_ingest"
    assert make_url(own.database_endpoint()).username == "o"


def _postgres_logins_of(pid: int, postgres_port: int) -> set[str]:
    """The login of every Postgres connection the process ``pid`` holds."""
    ports = {
        c.laddr.port
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.raddr and c.raddr.port == postgres_port
    }
    if not ports:
        return set()
    with engine().connect() as conn:
        rows = conn.execute(
            text("SELECT usename FROM pg_stat_activity WHERE client_port = ANY(:ports)"),
            {"ports": list(ports)},
        )
        return {str(r[0]) for r in rows}


async def test_workers_connect_as_their_own_logins_only(
    worker: Workers, client: Client, test_stack: ServerStack, tenant: str, tmp_path: Path
) -> None:
    """After an ingest and an Ask on the query queue, each worker process holds Postgres
    connections as its own login and none as the owner."""
    write_corpus(tmp_path / "c", per_class=1, seed=5)
    handle = await start_ingest(client, tenant, [str(tmp_path / "c")])
    await asyncio.wait_for(handle.result(), timeout=120)
    wait_searchable(tenant, 18)
    await ask(client, AskInput(tenant, text="a red circle", generate=False), QUERY_TASK_QUEUE)
    port = make_url(test_stack.env["MMRAG_DATABASE_URL"]).port
    assert port is not None
    assert _postgres_logins_of(worker.cpu.proc.pid, port) == {"mmrag_ingest"}
    assert _postgres_logins_of(worker.query.proc.pid, port) == {"mmrag_query"}
    for other in (worker.encode, worker.generate):
        assert _postgres_logins_of(other.proc.pid, port) == set()
