"""Audit rows for what the HTTP layer refuses: a key reaching for another tenant.

Runs a request starts are audited by the workers, as every run is; these rows record what
never became a run. A key that names another tenant in a body, or asks for an asset or an
ingest that is not its tenant's, leaves a ``web_refused`` row in the key's tenant's trail
and, when the asset belongs to another tenant, one in that tenant's trail too: its owner
sees that someone tried. The rows name the key by id, never the key.
"""

from __future__ import annotations

import logging
import uuid

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from activities.store.orm import Asset
from activities.store.registry import AuditRecord, write_audit
from starters.web.keys import ApiKey

log = logging.getLogger("mmrag.web")
REFUSED = "web_refused"


def owners_of(engine: Engine, asset_id: str, but: str) -> list[str]:
    """Tenants other than ``but`` holding an asset with this id (for the audit only)."""
    with Session(engine) as session:
        rows = session.execute(
            select(Asset.tenant).where(Asset.asset_id == asset_id, Asset.tenant != but).limit(5)
        )
        return [str(t) for (t,) in rows]


def refused(
    engine: Engine, key: ApiKey, what: str, reason: str, *, asset_id: str = "", tenant: str = ""
) -> None:
    """Record that ``key`` was refused ``what`` (``reason`` in words; never a secret).
    ``tenant``: the other tenant it reached for, when known. Never raises: a failed audit
    write is logged, and the refusal stands either way."""
    details = {"what": what, "reason": reason, "key_tenant": key.tenant, "key_role": key.role}
    try:
        targets = {key.tenant}
        if tenant:
            targets.add(tenant)
        if asset_id:
            targets.update(owners_of(engine, asset_id, key.tenant))
        records = [
            AuditRecord(
                tenant=target,
                action=REFUSED,
                idempotency_key=f"web/{uuid.uuid4().hex}",
                asset_id=asset_id if target != key.tenant else "",
                actor=key.subject,
                details=details,
            )
            for target in sorted(targets)
        ]
        with Session(engine) as session, session.begin():
            write_audit(session, records)
    except Exception:
        log.exception("could not write the audit row of a refused request (%s)", what)
