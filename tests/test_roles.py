"""Least privilege in Postgres: each application role is refused what it must not do."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from tests.conftest import ServerStack
from tests.helpers import engine

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
    ],
}
ALLOWED = {
    "mmrag_ingest": [
        "SELECT count(*) FROM assets",
        "INSERT INTO audit_log (tenant, action, idempotency_key) VALUES ('roles', 'probe', "
        "'roles/ingest') ON CONFLICT DO NOTHING",
        "UPDATE assets SET updated_at = updated_at WHERE false",
    ],
    "mmrag_query": [
        "SELECT count(*) FROM assets",
        "SELECT count(*) FROM index_versions",
        "INSERT INTO audit_log (tenant, action, idempotency_key) VALUES ('roles', 'probe', "
        "'roles/query') ON CONFLICT DO NOTHING",
    ],
}


@pytest.mark.parametrize(
    ("role", "statement"), [(r, s) for r, stmts in REFUSED.items() for s in stmts]
)
def test_role_is_refused(test_stack: ServerStack, role: str, statement: str) -> None:
    with (
        pytest.raises(DBAPIError, match="permission denied|append-only|must be owner"),
        engine().begin() as conn,
    ):
        conn.execute(text(f"SET LOCAL ROLE {role}"))
        conn.execute(text(statement))


@pytest.mark.parametrize(
    ("role", "statement"), [(r, s) for r, stmts in ALLOWED.items() for s in stmts]
)
def test_role_may_do_its_job(test_stack: ServerStack, role: str, statement: str) -> None:
    with engine().begin() as conn:
        conn.execute(text(f"SET LOCAL ROLE {role}"))
        conn.execute(text(statement))
