"""API keys: one tenant and one role each, stored as a digest (migrations 0007).

A key reads ``mmrag_<key_id>_<secret>``: ``key_id`` (12 hex characters) finds the row,
``secret`` (32 random bytes, URL-safe base64) is checked against its SHA-256 digest in
constant time. The secret is shown once, when the key is created, and stored nowhere.

Keys are managed by ``mmrag apikey create|list|revoke`` with the database owner's URL; the
server only reads them, as the query login, and remembers a verified key (or a refusal)
for ``MMRAG_WEB_KEY_CACHE_S`` seconds, so a revocation takes effect within that time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Column, DateTime, Engine, MetaData, String, Table, func, select, update

from workers.auth import READER, WRITER

KEY_ROLES = (READER, WRITER)
PREFIX = "mmrag_"
_KEY = re.compile(r"^mmrag_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")

metadata = MetaData()
api_keys = Table(
    "api_keys",
    metadata,
    Column("key_id", String(32), primary_key=True),
    Column("secret_sha256", String(64), nullable=False),
    Column("tenant", String(128), nullable=False),
    Column("role", String(16), nullable=False),
    Column("name", String(255), nullable=False, server_default=""),
    Column("created_at", DateTime(timezone=True), server_default=func.now()),
    Column("revoked_at", DateTime(timezone=True)),
)


@dataclass(frozen=True)
class ApiKey:
    """What a verified key proves (never its secret)."""

    key_id: str
    tenant: str
    role: str
    name: str = ""

    @property
    def subject(self) -> str:
        """Who the workflow credential and audit rows name: the key, not a person."""
        return f"apikey:{self.key_id}"


@dataclass(frozen=True)
class KeyRow:
    key_id: str
    tenant: str
    role: str
    name: str
    created_at: datetime | None
    revoked_at: datetime | None


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(engine: Engine, tenant: str, role: str, name: str = "") -> tuple[ApiKey, str]:
    """A new key for ``tenant`` at ``role``: the row, and the full key (shown once)."""
    if role not in KEY_ROLES:
        raise ValueError(
            f"--role {role!r}: an API key is {' or '.join(KEY_ROLES)} (operators use "
            "`mmrag token issue`: their credential spans every tenant)"
        )
    if not tenant or len(tenant) > 128 or not tenant.isprintable():
        raise ValueError(f"--tenant {tenant!r}: a tenant is 1 to 128 printable characters")
    key_id = secrets.token_hex(6)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    with engine.begin() as conn:
        conn.execute(
            api_keys.insert().values(
                key_id=key_id,
                secret_sha256=_digest(secret),
                tenant=tenant,
                role=role,
                name=name[:255],
            )
        )
    return ApiKey(key_id, tenant, role, name), f"{PREFIX}{key_id}_{secret}"


def list_keys(engine: Engine, tenant: str = "") -> list[KeyRow]:
    query = select(api_keys).order_by(api_keys.c.tenant, api_keys.c.created_at)
    if tenant:
        query = query.where(api_keys.c.tenant == tenant)
    with engine.connect() as conn:
        return [
            KeyRow(r.key_id, r.tenant, r.role, r.name, r.created_at, r.revoked_at)
            for r in conn.execute(query)
        ]


def revoke_key(engine: Engine, key_id: str) -> bool:
    """Revoke a key by its id (or the whole key); False when no live key has that id."""
    match = _KEY.match(key_id)
    key_id = match.group(1) if match else key_id
    with engine.begin() as conn:
        done = conn.execute(
            update(api_keys)
            .where(api_keys.c.key_id == key_id, api_keys.c.revoked_at.is_(None))
            .values(revoked_at=datetime.now(UTC))
        )
    return bool(done.rowcount)


def key_id_of(presented: str) -> str:
    """The public id a presented key claims ("" when it is not shaped like a key)."""
    match = _KEY.match(presented)
    return match.group(1) if match else ""


class KeyVerifier:
    """Checks presented keys against the table, remembering answers for ``cache_s``."""

    def __init__(self, engine: Engine, cache_s: float) -> None:
        self._engine = engine
        self._cache_s = cache_s
        self._cache: dict[str, tuple[float, ApiKey | None]] = {}
        self._lock = threading.Lock()

    def remembered(self, presented: str) -> tuple[bool, ApiKey | None]:
        """``(True, answer)`` when the answer for this key is cached and fresh: the event
        loop asks this first, and goes to a thread (and the database) only on a miss."""
        cache_key = hashlib.sha256(presented.encode()).hexdigest()
        with self._lock:
            hit = self._cache.get(cache_key)
        if hit is not None and hit[0] > time.monotonic():
            return True, hit[1]
        return False, None

    def verify(self, presented: str) -> ApiKey | None:
        """The key's tenant and role, or None for a malformed, unknown, revoked or wrong key.
        Blocking (a database read on a miss): call it from a thread."""
        match = _KEY.match(presented)
        if not match:
            return None
        key_id, secret = match.groups()
        cache_key = hashlib.sha256(presented.encode()).hexdigest()
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(cache_key)
        if hit is not None and hit[0] > now:
            return hit[1]
        with self._engine.connect() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.key_id == key_id)).first()
        found = None
        if (
            row is not None
            and row.revoked_at is None
            and hmac.compare_digest(row.secret_sha256, _digest(secret))
        ):
            found = ApiKey(row.key_id, row.tenant, row.role, row.name)
        with self._lock:
            if len(self._cache) > 10_000:  # many wrong keys: forget them all, not the server
                self._cache.clear()
            self._cache[cache_key] = (now + self._cache_s, found)
        return found
