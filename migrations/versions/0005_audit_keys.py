"""Per-asset audit keys: the audit trail's URIs and reasons become removable by Forget.

Audit rows used to keep each object's URI (and failure reasons quoting it) in clear, for
ever: the table is append-only, so ``Forget`` could not remove them. From now on they are
sealed under a per-asset key kept in ``asset_keys``, and ``Forget`` deletes the key
(crypto-shredding; the reasoning is in activities/store/audit_privacy.py).

Rows written before this migration are sealed here, once: the append-only trigger is
disabled for this one UPDATE, inside this migration's transaction, by the owner that runs
migrations (the worker logins cannot: they own nothing, migrations/0004), and enabled again
before the transaction commits, so no other session ever sees the table without it. A row
whose asset is already forgotten, or that never had one, loses its clear personal fields
instead (there is no key to seal them with).

The cpu workers' login (``mmrag_ingest``) may read, create and delete keys; the query login
never sees them.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from activities.store import audit_privacy

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_audit = sa.table(
    "audit_log",
    sa.column("id", sa.BigInteger),
    sa.column("tenant", sa.String),
    sa.column("action", sa.String),
    sa.column("asset_id", sa.String),
    sa.column("uri", sa.Text),
    sa.column("details", JSONB),
    sa.column("idempotency_key", sa.Text),
)
_BATCH = 1000


def upgrade() -> None:
    op.create_table(
        "asset_keys",
        sa.Column("tenant", sa.String(128), primary_key=True),
        sa.Column("asset_id", sa.String(64), primary_key=True),
        sa.Column("key", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
        sa.CheckConstraint("octet_length(key) = 32", name="asset_keys_key_is_256_bits"),
    )
    op.execute("REVOKE ALL ON asset_keys FROM PUBLIC")
    op.execute("GRANT SELECT, INSERT, DELETE ON asset_keys TO mmrag_ingest")
    _seal_existing_rows()


def _seal_existing_rows() -> None:
    session = Session(bind=op.get_bind())
    details = _audit.c.details
    in_clear = sa.or_(
        _audit.c.uri != "",
        details.has_key("note"),
        details.has_key("reason") & _audit.c.action.in_(["asset.ingest", "asset.fail"]),
    )
    op.execute("ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_update_delete")
    last_id = 0
    while True:
        rows = session.execute(
            sa.select(_audit)
            .where(in_clear, _audit.c.id > last_id)
            .order_by(_audit.c.id)
            .limit(_BATCH)
        ).all()
        if not rows:
            break
        last_id = rows[-1].id
        keys = audit_privacy.keys_for_live_assets(
            session, {(r.tenant, r.asset_id) for r in rows if r.asset_id}
        )
        for r in rows:
            old = dict(r.details or {})
            private = {"uri": r.uri, **{k: str(old.get(k) or "") for k in ("reason", "note")}}
            sealed = audit_privacy.seal_row(
                r.tenant, r.asset_id, r.idempotency_key, old, private, keys
            )
            session.execute(
                sa.update(_audit).where(_audit.c.id == r.id).values(uri="", details=sealed)
            )
    op.execute("ALTER TABLE audit_log ENABLE TRIGGER audit_log_no_update_delete")


def downgrade() -> None:
    raise RuntimeError(
        "audit rows are sealed under per-asset keys: dropping asset_keys would shred them all; "
        "this migration is not reversible"
    )
