"""Least-privilege roles: what each kind of worker may do, enforced by Postgres.

``mmrag_ingest`` (ingest, re-index, forget: the cpu workers) reads and writes the
registry and index versions and appends audit rows; ``mmrag_query`` (a query-only
deployment, reporting) reads the registry and appends audit rows. Neither may UPDATE,
DELETE or TRUNCATE the audit log, nor DELETE registry rows (forgetting wipes a row to a
tombstone instead). The owner that runs migrations keeps DDL. The roles are created
NOLOGIN; since 0004 each worker logs in as its role itself (workers/db_logins.py gives it
LOGIN and a password), never as the owner.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

ROLES = ("mmrag_ingest", "mmrag_query")


def upgrade() -> None:
    for role in ROLES:
        op.execute(
            f"DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') "
            f"THEN CREATE ROLE {role} NOLOGIN; END IF; END $$;"
        )
    op.execute("REVOKE ALL ON assets, index_versions, reindex_runs, audit_log FROM PUBLIC")
    op.execute("GRANT USAGE ON SCHEMA public TO mmrag_ingest, mmrag_query")
    op.execute(
        "GRANT SELECT, INSERT, UPDATE ON assets, index_versions, reindex_runs TO mmrag_ingest"
    )
    op.execute("GRANT SELECT ON assets, index_versions TO mmrag_query")
    op.execute("GRANT SELECT, INSERT ON audit_log TO mmrag_ingest, mmrag_query")
    op.execute(
        "GRANT USAGE ON SEQUENCE audit_log_id_seq, reindex_runs_id_seq TO mmrag_ingest, mmrag_query"
    )


def downgrade() -> None:
    op.execute(
        "REVOKE ALL ON assets, index_versions, reindex_runs, audit_log "
        "FROM mmrag_ingest, mmrag_query"
    )
    op.execute("REVOKE USAGE ON SCHEMA public FROM mmrag_ingest, mmrag_query")
    op.execute(
        "REVOKE USAGE ON SEQUENCE audit_log_id_seq, reindex_runs_id_seq "
        "FROM mmrag_ingest, mmrag_query"
    )
