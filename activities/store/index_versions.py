"""Index versions over time: building a new one, swapping to it, rolling back, dropping.

An index version is one Milvus collection built with one model. At most one is
``active`` (queries read it through the alias). While a re-index runs, its target is
``building``; after a swap the old one is ``retired`` until ``drop_after``. Every
version that is not dropped receives ingests and forgets, so a swap or a rollback never
loses a write and never resurrects a deletion.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Engine, and_, func, or_, select, update
from sqlalchemy.orm import Session

from activities.store.orm import Asset, IndexVersion, ReindexRun
from activities.store.registry import AuditRecord, write_audit
from activities.store.registry import index_target as target
from workflows.contracts import INGESTED, IndexTarget

# Staleness after which a "running" re-index row no longer blocks a new run (the
# workflow updates its row every batch; a row this old belongs to a terminated run).
STALE_RUN = timedelta(minutes=30)
_LOCK = 0x6D6D726167  # one advisory lock for every index-version state change


class ReindexConflict(Exception):
    """Another re-index of an overlapping tenant scope is running."""


def writable(engine: Engine) -> list[IndexTarget]:
    """Every version ingests and forgets must reach: active, building, retired in grace."""
    with Session(engine) as session:
        rows = session.scalars(
            select(IndexVersion)
            .where(
                or_(
                    IndexVersion.state.in_(["active", "building"]),
                    and_(IndexVersion.state == "retired", IndexVersion.drop_after > func.now()),
                )
            )
            .order_by(IndexVersion.version)
        )
        return [target(r) for r in rows]


def all_live(engine: Engine) -> list[IndexTarget]:
    """Every version whose collection still exists (forget must clean all of them)."""
    with Session(engine) as session:
        rows = session.scalars(
            select(IndexVersion).where(IndexVersion.state.in_(["active", "building", "retired"]))
        )
        return [target(r) for r in rows]


def create_version(
    engine: Engine,
    prefix: str,
    model: str,
    pretrained: str,
    checkpoint: str,
    dim: int,
    actor: str,
    first: bool = False,
) -> IndexTarget:
    """Record a new version: ``building`` for a re-index, or (``first``) the ``active`` one
    of an empty installation, unless a concurrent start already created it."""
    with Session(engine) as session, session.begin():
        session.execute(func.pg_advisory_xact_lock(_LOCK))
        if first:
            active = session.scalars(
                select(IndexVersion).where(IndexVersion.state == "active")
            ).first()
            if active is not None:
                return target(active)
        version = (session.scalar(select(func.max(IndexVersion.version))) or 0) + 1
        row = IndexVersion(
            version=version,
            collection=f"{prefix}_v{version}",
            model=model,
            pretrained=pretrained,
            checkpoint=checkpoint,
            dim=dim,
            state="active" if first else "building",
            activated_at=func.now() if first else None,
        )
        session.add(row)
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
        session.flush()
        return target(row)


def begin_run(engine: Engine, workflow_id: str, scope: str, mode: str, version: int) -> None:
    """Take the re-index lock for ``scope`` ("*" = all tenants); idempotent per workflow."""
    with Session(engine) as session, session.begin():
        session.execute(func.pg_advisory_xact_lock(_LOCK))
        mine = session.scalars(
            select(ReindexRun).where(ReindexRun.workflow_id == workflow_id)
        ).first()
        if mine is not None:
            return
        query = select(ReindexRun).where(
            ReindexRun.state == "running", ReindexRun.updated_at > func.now() - STALE_RUN
        )
        if scope != "*":  # a run for every tenant overlaps any other run
            query = query.where(
                or_(ReindexRun.tenant_scope == scope, ReindexRun.tenant_scope == "*")
            )
        overlapping = session.scalars(query).first()
        if overlapping is not None:
            raise ReindexConflict(
                f"a re-index of tenant scope {overlapping.tenant_scope!r} is already running "
                f"(workflow {overlapping.workflow_id}); wait for it or cancel it"
            )
        session.add(
            ReindexRun(
                workflow_id=workflow_id,
                tenant_scope=scope,
                mode=mode,
                target_version=version,
                state="running",
            )
        )


def touch_run(engine: Engine, workflow_id: str) -> None:
    with Session(engine) as session, session.begin():
        session.execute(
            update(ReindexRun)
            .where(ReindexRun.workflow_id == workflow_id)
            .values(updated_at=func.now())
        )


def finish_run(engine: Engine, workflow_id: str, state: str) -> None:
    with Session(engine) as session, session.begin():
        session.execute(
            update(ReindexRun)
            .where(ReindexRun.workflow_id == workflow_id, ReindexRun.state == "running")
            .values(state=state, finished_at=func.now(), updated_at=func.now())
        )


def last_success(engine: Engine, scope: str) -> float:
    """Epoch seconds of the last successful re-index covering ``scope`` (0 if none)."""
    with Session(engine) as session:
        at = session.scalar(
            select(func.max(ReindexRun.finished_at)).where(
                ReindexRun.state == "succeeded",
                or_(ReindexRun.tenant_scope == scope, ReindexRun.tenant_scope == "*"),
            )
        )
        return at.timestamp() if at else 0.0


@dataclass
class Swap:
    previous: IndexTarget | None
    active: IndexTarget


def swap(engine: Engine, version: int, grace: timedelta, actor: str) -> Swap:
    """Make ``version`` active and retire the previous one, in one transaction."""
    with Session(engine) as session, session.begin():
        session.execute(func.pg_advisory_xact_lock(_LOCK))
        new = session.get(IndexVersion, version)
        if new is None:
            raise ValueError(f"index version {version} does not exist")
        old = session.scalars(select(IndexVersion).where(IndexVersion.state == "active")).first()
        if old is not None and old.version == version:
            return Swap(None, target(new))
        if old is not None:
            old.state = "retired"
            old.retired_at = func.now()
            old.drop_after = func.now() + grace
            session.flush()
        new.state = "active"
        new.activated_at = func.now()
        new.retired_at = None
        new.drop_after = None
        session.execute(update(Asset).where(Asset.status == INGESTED).values(index_version=version))
        write_audit(
            session,
            [
                AuditRecord(
                    tenant="*",
                    action="index.swap",
                    idempotency_key=f"index.swap/{old.version if old else 0}->{version}/{actor}",
                    actor=actor,
                    details={"from": old.version if old else None, "to": version},
                )
            ],
        )
        session.flush()
        return Swap(target(old) if old else None, target(new))


def rollback_target(engine: Engine) -> IndexTarget:
    """The most recently retired version still within its grace period."""
    with Session(engine) as session:
        row = session.scalars(
            select(IndexVersion)
            .where(IndexVersion.state == "retired", IndexVersion.drop_after > func.now())
            .order_by(IndexVersion.retired_at.desc())
        ).first()
        if row is None:
            raise LookupError(
                "no retired index version is left to roll back to (grace period over?)"
            )
        return target(row)


def expired(engine: Engine) -> list[IndexTarget]:
    """Retired versions past their grace period, and abandoned building versions."""
    with Session(engine) as session:
        rows = session.scalars(
            select(IndexVersion).where(
                or_(
                    and_(IndexVersion.state == "retired", IndexVersion.drop_after <= func.now()),
                    IndexVersion.state == "failed",
                )
            )
        )
        return [target(r) for r in rows]


def mark(engine: Engine, versions: Sequence[int], state: str, actor: str) -> None:
    with Session(engine) as session, session.begin():
        session.execute(
            update(IndexVersion).where(IndexVersion.version.in_(versions)).values(state=state)
        )
        write_audit(
            session,
            [
                AuditRecord(
                    tenant="*",
                    action=f"index.{state}",
                    idempotency_key=f"index.{state}/{v}",
                    actor=actor,
                    details={"version": v},
                )
                for v in versions
            ],
        )
