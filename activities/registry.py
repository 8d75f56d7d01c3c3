"""Postgres writes and reads: index versions, the asset registry and the audit trail.

Every write is idempotent so a retried activity changes nothing twice: the registry is
upserted by (tenant, asset_id) and audit rows carry an idempotency key that makes a
second insert of the same event a no-op (``ON CONFLICT DO NOTHING``, which the
append-only triggers allow).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, create_engine, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from activities.models import Asset, AuditEvent, IndexVersion
from workflows.contracts import FAILED, INGESTED, AssetOutcome, IndexTarget, ObjectRef


@lru_cache(maxsize=4)
def get_engine(url: str) -> Engine:
    """One pooled engine per process; ``pool_pre_ping`` survives a Postgres restart."""
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


@dataclass
class AuditRecord:
    tenant: str
    action: str
    idempotency_key: str
    asset_id: str = ""
    uri: str = ""
    workflow_id: str = ""
    run_id: str = ""
    actor: str = ""
    details: dict[str, Any] = field(default_factory=dict)


def write_audit(session: Session, records: Iterable[AuditRecord]) -> None:
    rows = [r.__dict__ for r in records]
    if rows:
        session.execute(
            insert(AuditEvent)
            .values(rows)
            .on_conflict_do_nothing(index_elements=["idempotency_key"])
        )


def _target(row: IndexVersion) -> IndexTarget:
    return IndexTarget(
        version=row.version,
        collection=row.collection,
        model=row.model,
        pretrained=row.pretrained,
        dim=row.dim,
    )


def active_index(engine: Engine) -> IndexTarget | None:
    with Session(engine) as session:
        row = session.scalars(select(IndexVersion).where(IndexVersion.state == "active")).first()
        return _target(row) if row else None


def create_first_index(
    engine: Engine, prefix: str, model: str, pretrained: str, dim: int, actor: str
) -> IndexTarget:
    """Record version 1 as active unless some version already is (a concurrent start)."""
    with Session(engine) as session, session.begin():
        session.execute(func.pg_advisory_xact_lock(0x6D6D726167))  # serialise first creation
        row = session.scalars(select(IndexVersion).where(IndexVersion.state == "active")).first()
        if row is not None:
            return _target(row)
        version = (session.scalar(select(func.max(IndexVersion.version))) or 0) + 1
        row = IndexVersion(
            version=version,
            collection=f"{prefix}_v{version}",
            model=model,
            pretrained=pretrained,
            dim=dim,
            state="active",
            activated_at=func.now(),
        )
        session.add(row)
        session.flush()
        write_audit(
            session,
            [
                AuditRecord(
                    tenant="*",
                    action="index.create",
                    idempotency_key=f"index.create/{version}",
                    actor=actor,
                    details={
                        "version": version,
                        "model": model,
                        "pretrained": pretrained,
                        "dim": dim,
                    },
                )
            ],
        )
        return _target(row)


def known_generations(
    engine: Engine, tenant: str, asset_ids: Sequence[str]
) -> dict[str, tuple[str, str, int]]:
    """asset_id -> (generation, status, index_version) for the assets already registered."""
    if not asset_ids:
        return {}
    with Session(engine) as session:
        rows = session.execute(
            select(Asset.asset_id, Asset.generation, Asset.status, Asset.index_version).where(
                Asset.tenant == tenant, Asset.asset_id.in_(asset_ids)
            )
        )
        return {r.asset_id: (r.generation, r.status, r.index_version) for r in rows}


def record_outcomes(
    engine: Engine,
    tenant: str,
    index_version: int,
    objects: Sequence[ObjectRef],
    outcomes: Sequence[AssetOutcome],
    tags: dict[str, str],
    workflow_id: str,
    run_id: str,
) -> None:
    """Upsert the registry and append one audit row per change, in one transaction."""
    by_id = {o.asset_id: o for o in objects}
    changed = [o for o in outcomes if o.status in (INGESTED, FAILED)]
    if not changed:
        return
    registry_rows = []
    audit: list[AuditRecord] = []
    for outcome in changed:
        ref = by_id.get(outcome.asset_id)
        if outcome.asset_id:  # "" for a source that could not be listed: audit only
            registry_rows.append(
                {
                    "tenant": tenant,
                    "asset_id": outcome.asset_id,
                    "uri": outcome.uri,
                    "generation": outcome.generation,
                    "size_bytes": ref.size if ref else 0,
                    "media_type": (ref.media_type if ref else "") or "",
                    "status": outcome.status,
                    "reason": outcome.reason,
                    "chunks": outcome.chunks,
                    "index_version": index_version,
                    "tags": tags,
                }
            )
        action = "asset.ingest" if outcome.status == INGESTED else "asset.fail"
        subject = outcome.asset_id or hashlib.sha256(outcome.uri.encode()).hexdigest()[:32]
        details: dict[str, Any] = {"generation": outcome.generation, "index_version": index_version}
        if outcome.status == INGESTED:
            details["chunks"] = outcome.chunks
        else:
            details["reason"] = outcome.reason
        audit.append(
            AuditRecord(
                tenant=tenant,
                action=action,
                idempotency_key=f"{run_id}/{action}/{subject}/{outcome.generation}",
                asset_id=outcome.asset_id,
                uri=outcome.uri,
                workflow_id=workflow_id,
                run_id=run_id,
                details=details,
            )
        )
    with Session(engine) as session, session.begin():
        if registry_rows:
            session.execute(_upsert_assets(registry_rows))
        write_audit(session, audit)


def _upsert_assets(rows: list[dict[str, Any]]):  # type: ignore[no-untyped-def]
    statement = insert(Asset).values(rows)
    statement = statement.on_conflict_do_update(
        index_elements=["tenant", "asset_id"],
        set_={
            "uri": statement.excluded.uri,
            "generation": statement.excluded.generation,
            "size_bytes": statement.excluded.size_bytes,
            "media_type": statement.excluded.media_type,
            "status": statement.excluded.status,
            "reason": statement.excluded.reason,
            "chunks": statement.excluded.chunks,
            "index_version": statement.excluded.index_version,
            "tags": statement.excluded.tags,
            "updated_at": func.now(),
        },
    )
    return statement
