"""Lifecycle: re-index runs, retired index versions with a grace period, forgotten assets.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "index_versions", sa.Column("checkpoint", sa.Text, nullable=False, server_default="")
    )
    op.add_column("index_versions", sa.Column("retired_at", sa.DateTime(timezone=True)))
    op.add_column("index_versions", sa.Column("drop_after", sa.DateTime(timezone=True)))
    op.add_column(
        "assets", sa.Column("object_created_at", sa.BigInteger, nullable=False, server_default="0")
    )
    op.add_column(
        "assets", sa.Column("allow_reingest", sa.Boolean, nullable=False, server_default=sa.false())
    )
    op.create_table(
        "reindex_runs",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("workflow_id", sa.Text, nullable=False),
        sa.Column("tenant_scope", sa.String(128), nullable=False),  # "*" = every tenant
        sa.Column("mode", sa.String(16), nullable=False),  # full | incremental
        sa.Column("target_version", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),  # running | succeeded | failed
        sa.Column(
            "started_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
    )
    op.create_index("reindex_runs_scope_state", "reindex_runs", ["tenant_scope", "state"])
    op.create_index("reindex_runs_workflow", "reindex_runs", ["workflow_id"], unique=True)


def downgrade() -> None:
    op.drop_table("reindex_runs")
    op.drop_column("assets", "allow_reingest")
    op.drop_column("assets", "object_created_at")
    op.drop_column("index_versions", "drop_after")
    op.drop_column("index_versions", "retired_at")
    op.drop_column("index_versions", "checkpoint")
