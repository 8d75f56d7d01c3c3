"""Postgres schema: the asset registry, index versions and the append-only audit trail.

The schema itself is created by the Alembic migrations under ``migrations/``; these
models mirror it for typed reads and writes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, DateTime, Integer, String, Text, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class IndexVersion(Base):
    """One Milvus collection built with one model; queries read the ``active`` one."""

    __tablename__ = "index_versions"

    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    collection: Mapped[str] = mapped_column(String(255), unique=True)
    model: Mapped[str] = mapped_column(String(255))
    pretrained: Mapped[str] = mapped_column(String(255))
    dim: Mapped[int] = mapped_column(Integer)
    checkpoint: Mapped[str] = mapped_column(Text, default="")
    state: Mapped[str] = mapped_column(String(32))  # building | active | retired | dropped | failed
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    activated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    retired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    drop_after: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Asset(Base):
    """The registry: what mmrag knows about every object of every tenant."""

    __tablename__ = "assets"

    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    asset_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    uri: Mapped[str] = mapped_column(Text)
    generation: Mapped[str] = mapped_column(String(128))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    media_type: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(32))  # ingested | failed | forgotten
    reason: Mapped[str] = mapped_column(Text, default="")
    chunks: Mapped[int] = mapped_column(Integer, default=0)
    index_version: Mapped[int] = mapped_column(Integer)
    tags: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    object_created_at: Mapped[int] = mapped_column(BigInteger, default=0)
    allow_reingest: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ReindexRun(Base):
    """One re-index; a running row per tenant scope is the lock against overlapping runs."""

    __tablename__ = "reindex_runs"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    workflow_id: Mapped[str] = mapped_column(Text, unique=True)
    tenant_scope: Mapped[str] = mapped_column(String(128))
    mode: Mapped[str] = mapped_column(String(16))
    target_version: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class AuditEvent(Base):
    """Append-only: the database refuses UPDATE, DELETE and TRUNCATE on this table.

    ``idempotency_key`` makes a retried activity write its row once: inserts use
    ``ON CONFLICT DO NOTHING`` on it.
    """

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    tenant: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    asset_id: Mapped[str] = mapped_column(String(64), default="")
    uri: Mapped[str] = mapped_column(Text, default="")
    workflow_id: Mapped[str] = mapped_column(Text, default="")
    run_id: Mapped[str] = mapped_column(String(64), default="")
    actor: Mapped[str] = mapped_column(String(255), default="")
    details: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    idempotency_key: Mapped[str] = mapped_column(Text, unique=True)
