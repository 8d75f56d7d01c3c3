"""Postgres writes and reads: index versions, the asset registry and the audit trail.

Every write is idempotent so a retried activity changes nothing twice: the registry is
upserted by (tenant, asset_id) and audit rows carry an idempotency key that makes a
second insert of the same event a no-op (``ON CONFLICT DO NOTHING``, which the
append-only triggers allow). Audit rows hold no URI, failure reason or note in clear:
:func:`write_audit` seals them under the asset's own key, which ``Forget`` destroys
(:mod:`activities.store.audit_privacy`).

One module of ~430 lines: every Postgres read and write of the activities, so the
idempotency and sealing rules above are kept in one place.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, NamedTuple

from sqlalchemy import Engine, create_engine, func, literal, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from activities.store import audit_privacy
from activities.store.orm import Asset, AuditEvent, IndexVersion
from workflows.activities.lifecycle import ReindexItem
from workflows.contracts import FAILED, INGESTED, AssetOutcome, IndexTarget, ObjectRef

FORGOTTEN = "forgotten"


@lru_cache(maxsize=4)
def get_engine(url: str) -> Engine:
    """One pooled engine per process and URL; ``pool_pre_ping`` survives a Postgres restart.

    Workers pass their role's own login (``Settings.for_database_role``), so a worker holds
    only that login's privileges (migrations/0003, 0004), with nothing to ``RESET ROLE``
    back to."""
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


@dataclass
class AuditRecord:
    """One audit event. ``uri`` and ``private`` (a failure's ``reason``, a ``note``) may
    identify a person: :func:`write_audit` seals them, they are never stored in clear."""

    tenant: str
    action: str
    idempotency_key: str
    asset_id: str = ""
    uri: str = ""
    workflow_id: str = ""
    run_id: str = ""
    actor: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    private: dict[str, str] = field(default_factory=dict)


def write_audit(session: Session, records: Iterable[AuditRecord]) -> None:
    """Append ``records`` (a retried write of the same idempotency key is a no-op).

    Each record's ``uri`` and ``private`` fields are sealed into ``details["sealed"]`` under
    its asset's key (:func:`activities.store.audit_privacy.keys_for_live_assets`); a record with
    no live asset keeps none of them. The ``uri`` column is always left empty."""
    records = list(records)
    if not records:
        return
    needs = {
        (r.tenant, r.asset_id) for r in records if r.asset_id and (r.uri or any(r.private.values()))
    }
    keys = audit_privacy.keys_for_live_assets(session, needs)
    rows = []
    for r in records:
        row = {k: v for k, v in r.__dict__.items() if k != "private"}
        row["uri"] = ""
        row["details"] = audit_privacy.seal_row(
            r.tenant, r.asset_id, r.idempotency_key, r.details, {"uri": r.uri, **r.private}, keys
        )
        rows.append(row)
    session.execute(
        insert(AuditEvent).values(rows).on_conflict_do_nothing(index_elements=["idempotency_key"])
    )


def index_target(row: IndexVersion) -> IndexTarget:
    """An index version as the workflows see it."""
    return IndexTarget(
        version=row.version,
        collection=row.collection,
        model=row.model,
        pretrained=row.pretrained,
        dim=row.dim,
        checkpoint=row.checkpoint or "",
    )


def _ref(row: Asset) -> ObjectRef:
    """A registry row as the object reference the encoder works from."""
    return ObjectRef(
        uri=row.uri,
        generation=row.generation,
        size=row.size_bytes,
        asset_id=row.asset_id,
        media_type=row.media_type,
        created_at=row.object_created_at,
    )


def active_index(engine: Engine) -> IndexTarget | None:
    with Session(engine) as session:
        row = session.scalars(select(IndexVersion).where(IndexVersion.state == "active")).first()
        return index_target(row) if row else None


@dataclass
class KnownAsset:
    generation: str
    status: str
    index_version: int
    allow_reingest: bool
    tags: dict[str, str] = field(default_factory=dict)


def known_generations(
    engine: Engine, tenant: str, asset_ids: Sequence[str]
) -> dict[str, KnownAsset]:
    """What the registry holds for these assets (absent: never seen)."""
    if not asset_ids:
        return {}
    with Session(engine) as session:
        rows = session.execute(
            select(
                Asset.asset_id,
                Asset.generation,
                Asset.status,
                Asset.index_version,
                Asset.allow_reingest,
                Asset.tags,
            ).where(Asset.tenant == tenant, Asset.asset_id.in_(asset_ids))
        )
        return {
            r.asset_id: KnownAsset(
                r.generation, r.status, r.index_version, r.allow_reingest, dict(r.tags or {})
            )
            for r in rows
        }


def retag(
    engine: Engine,
    tenant: str,
    refs: Sequence[ObjectRef],
    tags: dict[str, str],
    index_version: int,
    workflow_id: str,
    run_id: str,
) -> None:
    """Give ingested assets new tags (their vectors already carry them) and append one
    ``asset.retag`` audit row each; the tags themselves stay out of the audit row, as in
    ``asset.ingest`` (a tag may name a person). Only rows still ingested at the generation
    the scan saw are changed: an object re-encoded meanwhile keeps that ingest's tags."""
    if not refs:
        return
    with Session(engine) as session, session.begin():
        for ref in refs:
            session.execute(
                update(Asset)
                .where(
                    Asset.tenant == tenant,
                    Asset.asset_id == ref.asset_id,
                    Asset.generation == ref.generation,
                    Asset.status == INGESTED,
                )
                .values(tags=tags, updated_at=func.now())
            )
        write_audit(
            session,
            [
                AuditRecord(
                    tenant=tenant,
                    action="asset.retag",
                    idempotency_key=f"{run_id}/asset.retag/{ref.asset_id}/{ref.generation}",
                    asset_id=ref.asset_id,
                    workflow_id=workflow_id,
                    run_id=run_id,
                    details={"generation": ref.generation, "index_version": index_version},
                )
                for ref in refs
            ],
        )


def allow_reingest(engine: Engine, tenant: str, asset_ids: Sequence[str]) -> None:
    """An explicit decision to bring forgotten assets back (ingest with allow_forgotten)."""
    with Session(engine) as session, session.begin():
        session.execute(
            update(Asset)
            .where(Asset.tenant == tenant, Asset.asset_id.in_(asset_ids))
            .values(allow_reingest=True)
        )


@dataclass
class LiveAsset:
    tenant: str
    ref: ObjectRef
    status: str = INGESTED
    reason: str = ""  # why it failed, for a failed asset


def live_assets_page(
    engine: Engine, tenant: str, cursor: str, limit: int, statuses: Sequence[str] = (INGESTED,)
) -> tuple[list[LiveAsset], str]:
    """Registry assets in (tenant, asset_id) order after ``cursor``; "" ends the walk."""
    query = select(Asset).where(Asset.status.in_(statuses))
    if tenant:
        query = query.where(Asset.tenant == tenant)
    if cursor:
        after_tenant, _, after_id = cursor.partition("\x00")
        query = query.where(
            tuple_(Asset.tenant, Asset.asset_id) > tuple_(literal(after_tenant), literal(after_id))
        )
    with Session(engine) as session:
        rows = list(session.scalars(query.order_by(Asset.tenant, Asset.asset_id).limit(limit)))
    assets = [LiveAsset(r.tenant, _ref(r), r.status, r.reason or "") for r in rows]
    next_cursor = f"{rows[-1].tenant}\x00{rows[-1].asset_id}" if len(rows) == limit else ""
    return assets, next_cursor


def live_generations(engine: Engine, tenant: str) -> dict[tuple[str, str], str]:
    """(tenant, asset_id) -> generation of every ingested asset in scope ("" = all)."""
    query = select(Asset.tenant, Asset.asset_id, Asset.generation).where(Asset.status == INGESTED)
    if tenant:
        query = query.where(Asset.tenant == tenant)
    with Session(engine) as session:
        return {(r.tenant, r.asset_id): r.generation for r in session.execute(query)}


def tags_of(engine: Engine, tenant: str, asset_ids: Sequence[str]) -> dict[str, dict[str, str]]:
    with Session(engine) as session:
        rows = session.execute(
            select(Asset.asset_id, Asset.tags).where(
                Asset.tenant == tenant, Asset.asset_id.in_(asset_ids)
            )
        )
        return {r.asset_id: dict(r.tags or {}) for r in rows}


def count_assets(engine: Engine, tenant: str, statuses: Sequence[str]) -> int:
    query = select(func.count()).select_from(Asset).where(Asset.status.in_(statuses))
    if tenant:
        query = query.where(Asset.tenant == tenant)
    with Session(engine) as session:
        return int(session.scalar(query) or 0)


def _by_keys(keys: Sequence[tuple[str, str]]):  # type: ignore[no-untyped-def]
    return tuple_(Asset.tenant, Asset.asset_id).in_(
        [tuple_(literal(t), literal(a)) for t, a in keys]
    )


def tags_by_key(
    engine: Engine, keys: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], dict[str, str]]:
    if not keys:
        return {}
    with Session(engine) as session:
        rows = session.execute(
            select(Asset.tenant, Asset.asset_id, Asset.tags).where(_by_keys(keys))
        )
        return {(r.tenant, r.asset_id): dict(r.tags or {}) for r in rows}


def statuses_by_key(
    engine: Engine, keys: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], tuple[str, int]]:
    if not keys:
        return {}
    with Session(engine) as session:
        rows = session.execute(
            select(Asset.tenant, Asset.asset_id, Asset.status, Asset.index_version).where(
                _by_keys(keys)
            )
        )
        return {(r.tenant, r.asset_id): (r.status, r.index_version) for r in rows}


def items_by_key(engine: Engine, keys: Sequence[tuple[str, str]]) -> list[ReindexItem]:
    """Registry rows as re-embed work items (ingested assets only)."""
    if not keys:
        return []
    with Session(engine) as session:
        rows = list(session.scalars(select(Asset).where(_by_keys(keys), Asset.status == INGESTED)))
    return [
        ReindexItem(
            r.tenant,
            _ref(r),
            dict(r.tags or {}),
        )
        for r in rows
    ]


class ForgetCandidate(NamedTuple):
    asset_id: str
    uri: str
    generation: str
    status: str


def forget_candidates(
    engine: Engine,
    tenant: str,
    asset_id: str,
    uri_prefix: str,
    tags: dict[str, str],
    after: str,
    limit: int,
) -> list[ForgetCandidate]:
    """This tenant's assets that match, in asset_id order, with their status: only an
    object that was ingested successfully may have its object deleted."""
    query = select(Asset.asset_id, Asset.uri, Asset.generation, Asset.status).where(
        Asset.tenant == tenant
    )
    if asset_id:
        query = query.where(Asset.asset_id == asset_id)
    if uri_prefix:
        escaped = uri_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        query = query.where(Asset.uri.like(escaped + "%", escape="\\"))
    if tags:
        query = query.where(Asset.tags.contains(tags))
    if after:
        query = query.where(Asset.asset_id > after)
    with Session(engine) as session:
        rows = session.execute(query.order_by(Asset.asset_id).limit(limit))
        return [ForgetCandidate(r.asset_id, r.uri, r.generation, r.status) for r in rows]


def mark_forgotten(
    engine: Engine,
    tenant: str,
    asset_ids: Sequence[str],
    reason: str,
    allow_reingest: bool,
    versions: Sequence[int],
    workflow_id: str,
    generations: dict[str, str],
) -> None:
    """Wipe what identifies the object, destroy its audit key (its audit rows' sealed URI
    and reasons become unreadable: :mod:`activities.store.audit_privacy`) and write one tombstone
    per asset version (no personal data: no URI, no tags; the reason is PII-redacted by the
    caller)."""
    if not asset_ids:
        return
    with Session(engine) as session, session.begin():
        session.execute(
            update(Asset)
            .where(Asset.tenant == tenant, Asset.asset_id.in_(asset_ids))
            .values(
                status=FORGOTTEN,
                uri="",
                tags={},
                reason="",
                chunks=0,
                allow_reingest=allow_reingest,
                updated_at=func.now(),
            )
        )
        audit_privacy.destroy_keys(session, tenant, asset_ids)
        write_audit(
            session,
            [
                AuditRecord(
                    tenant=tenant,
                    action="asset.forget",
                    idempotency_key=(
                        f"asset.forget/{tenant}/{asset_id}/{generations.get(asset_id, '')}"
                    ),
                    asset_id=asset_id,
                    workflow_id=workflow_id,
                    details={"reason": reason, "index_versions": list(versions)},
                )
                for asset_id in asset_ids
            ],
        )


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
                    "object_created_at": ref.created_at if ref else 0,
                    "allow_reingest": False,
                }
            )
        action = "asset.ingest" if outcome.status == INGESTED else "asset.fail"
        subject = outcome.asset_id or hashlib.sha256(outcome.uri.encode()).hexdigest()[:32]
        details: dict[str, Any] = {"generation": outcome.generation, "index_version": index_version}
        # Reasons and notes quote the URI: sealed with it (write_audit).
        private = {"reason": outcome.reason if outcome.status == FAILED else ""}
        if outcome.status == INGESTED:
            details["chunks"] = outcome.chunks
        if outcome.note:  # e.g. the name or declared type disagrees with the bytes
            private["note"] = outcome.note
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
                private=private,
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
            "object_created_at": statement.excluded.object_created_at,
            "allow_reingest": statement.excluded.allow_reingest,
            "updated_at": func.now(),
        },
        # A forgotten asset is only brought back by an ingest that was allowed to.
        where=(Asset.status != FORGOTTEN) | Asset.allow_reingest,
    )
    return statement
