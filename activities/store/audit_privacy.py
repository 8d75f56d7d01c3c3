"""Personal data in the append-only audit trail, removable by ``Forget``: crypto-shredding.

The audit log is append-only, enforced by Postgres (migrations/0001), so no row can be
changed or deleted when a person asks to be forgotten; yet an ingest's audit row names the
object (its URI: ``gs://bucket/users/jane-doe/passport.jpg``) and a failure's reason quotes
it. So an audit row never holds those in clear. Each asset gets its own random 256-bit key
in ``asset_keys`` (a normal table, migrations/0005); the row's personal fields (``uri``,
``reason``, ``note``) are sealed with AES-256-GCM under that key, bound to the row (tenant,
asset id and idempotency key are the associated data, so a blob cannot be moved to another
row), and stored as ``details["sealed"]``; the ``uri`` column stays empty. While the asset
lives, :func:`open_private` reads them back. ``Forget`` deletes the key in the transaction
that writes its tombstone (:func:`destroy_keys`), and every sealed field of that asset, in
every row ever written, is unreadable from then on, with no row touched.

Why this and not a keyed hash of the URI: a keyed hash makes the trail useless for what it
is for (which object failed, and why: nobody can read it back) and is still personal data
that ``Forget`` cannot remove, since whoever holds the hash key can confirm a guessed URI for
ever. Per-asset keys keep the trail readable while the asset exists and make it unreadable,
for good, when it is forgotten.

What remains after ``Forget``: the rows' actions, times, tenant, workflow ids, generations
and the asset id, a truncated SHA-256 of tenant and URI that the tombstone needs (it is how
a re-upload of the same object is recognised and refused), so someone who already knows a
URI can still tell that it was once ingested. A deleted key stays in Postgres's data files
until VACUUM reuses the space, and in base backups and WAL archives until they expire: the
backup retention bounds how long a forgotten key can be recovered.

A row about something that has no asset (a source that could not be listed) or whose asset
is already forgotten has no key to seal with: its personal fields are left out (the run's
own result still reports the reason to whoever started it).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import (
    Column,
    DateTime,
    LargeBinary,
    MetaData,
    String,
    Table,
    and_,
    delete,
    func,
    literal,
    select,
    tuple_,
)
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from activities.store.orm import Asset

#: Fields of an audit row that may identify a person: sealed, never stored in clear.
PRIVATE_FIELDS = ("uri", "reason", "note")
SEALED = "sealed"  # the details key holding the sealed fields
_VERSION = "v1"
_FORGOTTEN = "forgotten"  # activities.store.registry.FORGOTTEN (registry imports this module)

# Mirrors migrations/versions/0005_audit_keys.py.
asset_keys = Table(
    "asset_keys",
    MetaData(),
    Column("tenant", String(128), primary_key=True),
    Column("asset_id", String(64), primary_key=True),
    Column("key", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), server_default=func.now()),
)

Pair = tuple[str, str]  # (tenant, asset_id)


def _aad(tenant: str, asset_id: str, idempotency_key: str) -> bytes:
    return f"mmrag-audit/{_VERSION}\x00{tenant}\x00{asset_id}\x00{idempotency_key}".encode()


def seal(key: bytes, private: Mapping[str, str], aad: bytes) -> str:
    """``private`` as JSON, AES-256-GCM under ``key`` with a fresh 96-bit nonce:
    ``"v1:" + base64url(nonce || ciphertext || tag)``."""
    nonce = os.urandom(12)
    blob = AESGCM(key).encrypt(nonce, json.dumps(dict(private), sort_keys=True).encode(), aad)
    return f"{_VERSION}:" + base64.urlsafe_b64encode(nonce + blob).decode()


def unseal(key: bytes, sealed: str, aad: bytes) -> dict[str, str]:
    """The fields :func:`seal` sealed; ``ValueError`` if the blob is not ours, or was made
    for another row, or tampered with."""
    version, _, b64 = sealed.partition(":")
    if version != _VERSION:
        raise ValueError(f"unknown sealed audit format {version!r}")
    raw = base64.urlsafe_b64decode(b64)
    try:
        plain = AESGCM(key).decrypt(raw[:12], raw[12:], aad)
    except InvalidTag:
        raise ValueError("sealed audit fields do not belong to this row") from None
    return dict(json.loads(plain))


def _in(pairs: Iterable[Pair], tenant_col: Any, asset_col: Any) -> Any:
    return tuple_(tenant_col, asset_col).in_([tuple_(literal(t), literal(a)) for t, a in pairs])


def keys_for_live_assets(session: Session, pairs: Iterable[Pair]) -> dict[Pair, bytes]:
    """The key of each asset in ``pairs`` that is registered and not forgotten, created on
    first use (``ON CONFLICT DO NOTHING``: two writers agree on one key). Forgotten or
    unregistered assets get none, so nothing is sealed under a key that ``Forget`` has
    already destroyed or will never find."""
    wanted = sorted(set(pairs))
    if not wanted:
        return {}
    live = session.execute(
        select(Asset.tenant, Asset.asset_id).where(
            _in(wanted, Asset.tenant, Asset.asset_id), Asset.status != _FORGOTTEN
        )
    ).all()
    if not live:
        return {}
    session.execute(
        insert(asset_keys)
        .values([{"tenant": t, "asset_id": a, "key": os.urandom(32)} for t, a in live])
        .on_conflict_do_nothing(index_elements=["tenant", "asset_id"])
    )
    rows = session.execute(
        select(asset_keys.c.tenant, asset_keys.c.asset_id, asset_keys.c.key).where(
            _in(live, asset_keys.c.tenant, asset_keys.c.asset_id)
        )
    )
    return {(r.tenant, r.asset_id): bytes(r.key) for r in rows}


def seal_row(
    tenant: str,
    asset_id: str,
    idempotency_key: str,
    details: Mapping[str, Any],
    private: Mapping[str, str],
    keys: Mapping[Pair, bytes],
) -> dict[str, Any]:
    """``details`` with ``private`` (the non-empty ones) sealed into ``details["sealed"]``
    under the asset's key, or left out when the asset has none; a key of ``details`` that
    ``private`` names is never kept in clear."""
    out = {k: v for k, v in details.items() if k not in private}
    fields = {k: v for k, v in private.items() if v}
    key = keys.get((tenant, asset_id))
    if fields and key is not None:
        out[SEALED] = seal(key, fields, _aad(tenant, asset_id, idempotency_key))
    return out


def open_private(session: Session, event: Any) -> dict[str, str] | None:
    """The sealed personal fields of an audit row (``uri``, ``reason``, ``note``: those it
    has), or ``None`` when it has none or its asset was forgotten (the key is gone)."""
    sealed = (event.details or {}).get(SEALED)
    if not sealed:
        return None
    key = session.scalar(
        select(asset_keys.c.key).where(
            asset_keys.c.tenant == event.tenant, asset_keys.c.asset_id == event.asset_id
        )
    )
    if key is None:
        return None
    return unseal(bytes(key), sealed, _aad(event.tenant, event.asset_id, event.idempotency_key))


def destroy_keys(session: Session, tenant: str, asset_ids: Iterable[str]) -> None:
    """Crypto-shred: delete the keys of these assets, making every sealed field of theirs
    in the audit trail unreadable (call in the transaction that forgets them)."""
    ids = list(asset_ids)
    if ids:
        session.execute(
            delete(asset_keys).where(
                and_(asset_keys.c.tenant == tenant, asset_keys.c.asset_id.in_(ids))
            )
        )
