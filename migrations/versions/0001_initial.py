"""Asset registry, index versions and the append-only audit trail.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "index_versions",
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("collection", sa.String(255), nullable=False, unique=True),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("pretrained", sa.String(255), nullable=False),
        sa.Column("dim", sa.Integer, nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
        sa.Column("activated_at", sa.DateTime(timezone=True)),
    )
    # At most one active index version.
    op.create_index(
        "index_versions_one_active",
        "index_versions",
        ["state"],
        unique=True,
        postgresql_where=sa.text("state = 'active'"),
    )
    op.create_table(
        "assets",
        sa.Column("tenant", sa.String(128), primary_key=True),
        sa.Column("asset_id", sa.String(64), primary_key=True),
        sa.Column("uri", sa.Text, nullable=False),
        sa.Column("generation", sa.String(128), nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("media_type", sa.String(64), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("reason", sa.Text, nullable=False, server_default=""),
        sa.Column("chunks", sa.Integer, nullable=False, server_default="0"),
        sa.Column("index_version", sa.Integer, nullable=False),
        sa.Column("tags", JSONB, nullable=False, server_default="{}"),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
    )
    op.create_index("assets_tenant_status", "assets", ["tenant", "status"])
    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("asset_id", sa.String(64), nullable=False, server_default=""),
        sa.Column("uri", sa.Text, nullable=False, server_default=""),
        sa.Column("workflow_id", sa.Text, nullable=False, server_default=""),
        sa.Column("run_id", sa.String(64), nullable=False, server_default=""),
        sa.Column("actor", sa.String(255), nullable=False, server_default=""),
        sa.Column("details", JSONB, nullable=False, server_default="{}"),
        sa.Column("idempotency_key", sa.Text, nullable=False, unique=True),
    )
    op.create_index("audit_log_tenant_at", "audit_log", ["tenant", "at"])
    # Append-only, enforced by the database: any UPDATE, DELETE or TRUNCATE raises.
    op.execute(
        """
        CREATE FUNCTION audit_log_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'audit_log is append-only: % is not allowed', TG_OP
                USING ERRCODE = 'insufficient_privilege';
        END;
        $$;
        """
    )
    op.execute(
        "CREATE TRIGGER audit_log_no_update_delete BEFORE UPDATE OR DELETE ON audit_log "
        "FOR EACH ROW EXECUTE FUNCTION audit_log_is_append_only();"
    )
    op.execute(
        "CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log "
        "FOR EACH STATEMENT EXECUTE FUNCTION audit_log_is_append_only();"
    )


def downgrade() -> None:
    raise RuntimeError("the audit trail is append-only: this migration is not reversible")
