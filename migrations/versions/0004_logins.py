"""Worker roles are logins of their own, never entered from the owner with SET ROLE.

A worker that logged in as the owner and ran ``SET ROLE mmrag_ingest`` could ``RESET ROLE``
back to the owner, which may disable the audit log's append-only triggers. Now each worker
role logs in as itself (workers/db_logins.py sets LOGIN and the password: ``mmrag stack
up`` with random ones, ``mmrag db upgrade`` from MMRAG_DB_INGEST_PASSWORD /
MMRAG_DB_QUERY_PASSWORD), so there is no other role to return to. This migration pins what
such a login must not be able to do, whoever created the role first: no superuser, no
role or database creation, no replication, no row-security bypass, no objects of its own
in the schema (PostgreSQL < 15 lets PUBLIC create in ``public``).

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

LOGINS = ("mmrag_ingest", "mmrag_query")


def upgrade() -> None:
    op.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    for login in LOGINS:
        op.execute(
            f"ALTER ROLE {login} NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"
        )


def downgrade() -> None:
    for login in LOGINS:
        op.execute(f"ALTER ROLE {login} NOLOGIN")
