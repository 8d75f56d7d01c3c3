"""The audit trail (and the runs' search attributes) keep no personal data that Forget
cannot remove.

The hole: every ``asset.ingest`` / ``asset.fail`` audit row kept the object's URI in clear
(``file:///.../jane-doe-passport.png``), and failure reasons quote it; the table is
append-only, so after ``Forget`` the person's name stayed in the trail for ever. Now those
fields are sealed under a per-asset key that Forget destroys (activities/store/audit_privacy.py).

Against the real servers: ingest and Forget through Temporal and the worker processes, rows
read back from Postgres as its owner; the migration test runs the real Alembic migrations
on a database of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, pool, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from temporalio.client import Client

from activities.store import audit_privacy
from activities.store.orm import AuditEvent
from starters.ingest import start_ingest
from starters.lifecycle import start_forget
from starters.synthetic_corpus import render
from tests.conftest import ServerStack, Workers
from tests.helpers import engine
from workers.migrate import upgrade
from workflows.common import SOURCE_KEY, source_digest
from workflows.contracts import ForgetInput, asset_id_for

PERSON = "jane-doe"


def _rows_as_text(tenant: str) -> list[str]:
    """Every audit row of ``tenant`` exactly as stored, as JSON text."""
    with engine().connect() as conn:
        return list(
            conn.execute(
                text("SELECT row_to_json(a)::text FROM audit_log a WHERE tenant = :t ORDER BY id"),
                {"t": tenant},
            ).scalars()
        )


def _events(tenant: str) -> list[AuditEvent]:
    with Session(engine()) as session:
        return list(
            session.scalars(
                select(AuditEvent).where(AuditEvent.tenant == tenant).order_by(AuditEvent.id)
            )
        )


def _private(event: AuditEvent) -> dict[str, str] | None:
    with Session(engine()) as session:
        return audit_privacy.open_private(session, event)


async def test_audit_rows_hold_no_uri_and_forget_makes_them_unreadable(
    worker: Workers, client: Client, tmp_path: Path
) -> None:
    import random

    tenant = f"audit-{uuid.uuid4().hex[:6]}"
    folder = tmp_path / f"{PERSON}-documents"
    folder.mkdir()
    good = folder / f"{PERSON}-passport.png"
    render("red", "circle", random.Random(4)).save(good)
    bad = folder / f"{PERSON}-notes.png"
    bad.write_bytes(b"not an image at all")
    handle = await start_ingest(client, tenant, [str(folder)])
    result = await asyncio.wait_for(handle.result(), timeout=180)
    assert (result.ingested, result.failed) == (1, 1)

    # Search attributes are indexed in clear even under payload encryption: a digest of the
    # source, never its URI (before: MmragSource held the path, name included).
    described = await handle.describe()
    source = described.typed_search_attributes.get(SOURCE_KEY)
    assert source == source_digest(tenant, folder.resolve().as_uri())
    assert PERSON not in str(described.raw_description.workflow_execution_info.search_attributes)

    # As stored: no URI, no name, no reason quoting them, in any column.
    stored = _rows_as_text(tenant)
    assert len(stored) == 2
    for row in stored:
        assert PERSON not in row and "file://" not in row, row  # before: the URI, in clear
    # While the assets live, the trail still says which object and why.
    by_action = {e.action: e for e in _events(tenant)}
    assert all(e.uri == "" for e in by_action.values())
    ingest_private = _private(by_action["asset.ingest"])
    assert ingest_private == {"uri": good.resolve().as_uri()}
    fail_private = _private(by_action["asset.fail"])
    assert fail_private is not None and fail_private["uri"] == bad.resolve().as_uri()
    assert "unrecognised content" in fail_private["reason"]

    # Forget both: the keys go, the rows stay exactly as they were and cannot be read.
    for path in (good, bad):
        forget = await start_forget(
            client,
            ForgetInput(tenant, asset_id=asset_id_for(tenant, path.resolve().as_uri())),
        )
        await asyncio.wait_for(forget.result(), timeout=60)
    after = _rows_as_text(tenant)
    assert after[:2] == stored  # append-only: nothing rewritten
    assert [json.loads(r)["action"] for r in after[2:]] == ["asset.forget", "asset.forget"]
    assert all(PERSON not in r and "file://" not in r for r in after)
    for event in _events(tenant)[:2]:
        assert event.details[audit_privacy.SEALED]  # still there ...
        assert _private(event) is None  # ... and unreadable
    with engine().connect() as conn:
        keys = conn.execute(
            text("SELECT count(*) FROM asset_keys WHERE tenant = :t"), {"t": tenant}
        ).scalar()
    assert keys == 0


def test_a_sealed_field_belongs_to_its_row_only() -> None:
    key = os.urandom(32)
    keys = {("t", "a1"): key}
    details = audit_privacy.seal_row("t", "a1", "run/1", {"chunks": 1}, {"uri": "file:///x"}, keys)
    assert details["chunks"] == 1 and "uri" not in details

    class Row:
        tenant, asset_id, idempotency_key = "t", "a1", "run/1"

    sealed = details[audit_privacy.SEALED]
    aad = f"mmrag-audit/v1\x00{Row.tenant}\x00{Row.asset_id}\x00{Row.idempotency_key}".encode()
    assert audit_privacy.unseal(key, sealed, aad) == {"uri": "file:///x"}
    moved = aad.replace(b"run/1", b"run/2")  # the same blob copied into another row
    with pytest.raises(ValueError, match="do not belong"):
        audit_privacy.unseal(key, sealed, moved)
    with pytest.raises(ValueError, match="do not belong"):
        audit_privacy.unseal(os.urandom(32), sealed, aad)
    # No key (an unlisted source, a forgotten asset): the personal fields are left out.
    assert audit_privacy.seal_row("t", "", "k", {"reason": "x"}, {"reason": "x"}, keys) == {}


def test_migration_seals_the_uris_older_rows_kept_in_clear(test_stack: ServerStack) -> None:
    """Rows written before migration 0005 are sealed (or, with no live asset, cleared) once,
    and the table is append-only again afterwards."""
    owner = make_url(test_stack.endpoints["database_url"])
    name = f"mmrag_mig_{uuid.uuid4().hex[:8]}"
    admin = create_engine(owner, poolclass=pool.NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = owner.set(database=name)
    db = create_engine(url, poolclass=pool.NullPool)
    try:
        upgrade(url.render_as_string(hide_password=False), "0004")
        uri_live = "file:///media/jane-doe/passport.png"
        uri_gone = "file:///media/john-roe/id.png"
        with db.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO assets (tenant, asset_id, uri, generation, size_bytes, "
                    "media_type, status, index_version) VALUES "
                    "('t', 'live', :u, 'g1', 1, 'image/png', 'failed', 1), "
                    "('t', 'gone', '', 'g1', 1, 'image/png', 'forgotten', 1)"
                ),
                {"u": uri_live},
            )
            conn.execute(
                text(
                    "INSERT INTO audit_log (tenant, action, asset_id, uri, details, "
                    "idempotency_key) VALUES "
                    "('t', 'asset.fail', 'live', :u, CAST(:d1 AS jsonb), 'k1'), "
                    "('t', 'asset.ingest', 'gone', :g, CAST(:d2 AS jsonb), 'k2'), "
                    "('t', 'asset.fail', '', :u, CAST(:d1 AS jsonb), 'k3'), "
                    "('t', 'asset.forget', 'gone', '', CAST(:d3 AS jsonb), 'k4')"
                ),
                {
                    "u": uri_live,
                    "g": uri_gone,
                    "d1": json.dumps({"generation": "g1", "reason": f"{uri_live}: corrupt"}),
                    "d2": json.dumps({"generation": "g1", "chunks": 1, "note": uri_gone}),
                    "d3": json.dumps({"reason": "ticket 7", "index_versions": [1]}),
                },
            )
        upgrade(url.render_as_string(hide_password=False), "head")

        with db.connect() as conn:
            rows = conn.execute(
                text("SELECT row_to_json(a)::text FROM audit_log a ORDER BY id")
            ).scalars()
            stored = list(rows)
        assert all("jane-doe" not in r and "john-roe" not in r for r in stored), stored
        with Session(db) as session:
            events = {e.idempotency_key: e for e in session.scalars(select(AuditEvent))}
            opened = {k: audit_privacy.open_private(session, e) for k, e in events.items()}
        assert opened["k1"] == {"uri": uri_live, "reason": f"{uri_live}: corrupt"}
        assert opened["k2"] is None and opened["k3"] is None  # forgotten / no asset: cleared
        assert events["k2"].details == {"generation": "g1", "chunks": 1}
        assert events["k4"].details == {"reason": "ticket 7", "index_versions": [1]}
        with pytest.raises(DBAPIError, match="append-only"), db.begin() as conn:
            conn.execute(text("UPDATE audit_log SET uri = 'x'"))
    finally:
        db.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_only_the_ingest_login_touches_the_keys(test_stack: ServerStack) -> None:
    """The query workers never need a key; the cpu workers create and destroy them but,
    like everyone, cannot rewrite the rows sealed with them."""
    query = create_engine(test_stack.env["MMRAG_DATABASE_URL_QUERY"], poolclass=pool.NullPool)
    with pytest.raises(DBAPIError, match="permission denied"), query.begin() as conn:
        conn.execute(text("SELECT key FROM asset_keys"))
    query.dispose()
    ingest = create_engine(test_stack.env["MMRAG_DATABASE_URL_CPU"], poolclass=pool.NullPool)
    with ingest.begin() as conn:
        conn.execute(text("SELECT count(*) FROM asset_keys"))
        conn.execute(text("DELETE FROM asset_keys WHERE tenant = 'no-such-tenant'"))
    with pytest.raises(DBAPIError, match="permission denied|append-only"), ingest.begin() as conn:
        conn.execute(text("UPDATE audit_log SET details = '{}' WHERE tenant = 'no-such-tenant'"))
    ingest.dispose()
