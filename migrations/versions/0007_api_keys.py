"""API keys of the HTTP front end (``mmrag serve``): each maps to one tenant and one role.

Only a SHA-256 digest of a key's secret is stored (the secret is 32 random bytes, so a
plain digest cannot be brute-forced, and a stolen table lets nobody in); ``key_id`` is the
public part a key starts with, for lookups, listings and audit rows. A key is revoked by
setting ``revoked_at``, never deleted, so audit rows keep naming a key that existed.

The server logs in as the query login (``mmrag_query``): it reads keys, it never writes
them. Keys are created and revoked by ``mmrag apikey`` with the owner's URL, like
``mmrag db upgrade``: whoever may manage keys may already read every tenant's data.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("name", sa.String(255), nullable=False, server_default=""),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("revoked_at", sa.DateTime(timezone=True)),
        sa.CheckConstraint("role IN ('reader', 'writer')", name="api_keys_role"),
    )
    op.create_index("api_keys_by_tenant", "api_keys", ["tenant"])
    op.execute("REVOKE ALL ON api_keys FROM PUBLIC")
    op.execute("GRANT SELECT ON api_keys TO mmrag_query")


def downgrade() -> None:
    op.execute("REVOKE ALL ON api_keys FROM mmrag_query")
    op.drop_index("api_keys_by_tenant", table_name="api_keys")
    op.drop_table("api_keys")
