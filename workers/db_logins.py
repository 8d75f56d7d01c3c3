"""Postgres logins of the worker roles: who each worker connects as, and their passwords.

Each worker role that touches Postgres logs in as its own least-privilege LOGIN role
(migrations/0003 grants, 0004): the cpu workers as ``mmrag_ingest``, the query workers as
``mmrag_query``. A login *is* the role, so ``RESET ROLE`` has nothing to return to, and
neither login owns a table, so neither can disable the audit log's append-only triggers.
The owner (``MMRAG_DATABASE_URL``) runs migrations and admin tools only.

Passwords are set by ``set_passwords``: ``mmrag stack up`` with random ones it keeps in the
state dir, ``mmrag db upgrade`` (compose's migrate job) from ``MMRAG_DB_INGEST_PASSWORD`` /
``MMRAG_DB_QUERY_PASSWORD``. The SCRAM verifier is computed here, by libpq, so the clear
password never reaches the server (whose log prints a failed statement) nor any log here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from settings import WORKER_LOGINS

__all__ = ["WORKER_LOGINS", "passwords_from_env", "set_passwords"]


def passwords_from_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """login -> password for each worker login whose variable is set and non-empty."""
    env = os.environ if env is None else env
    found = {
        "mmrag_ingest": env.get("MMRAG_DB_INGEST_PASSWORD", ""),
        "mmrag_query": env.get("MMRAG_DB_QUERY_PASSWORD", ""),
    }
    return {login: password for login, password in found.items() if password}


def set_passwords(owner_url: str, passwords: Mapping[str, str]) -> None:
    """Give each login its password and the right to log in, as the owner at ``owner_url``.

    Idempotent (the same password again changes nothing a client sees). A login that is not
    a role yet (migrations not applied) is an error: run the migrations first."""
    from psycopg import sql
    from sqlalchemy import create_engine, pool

    if not passwords:
        return
    engine = create_engine(owner_url, poolclass=pool.NullPool)
    try:
        raw = engine.raw_connection()
        try:
            conn = raw.driver_connection
            assert conn is not None
            with conn.cursor() as cur:
                for login, password in passwords.items():
                    verifier = conn.pgconn.encrypt_password(
                        password.encode(), login.encode(), b"scram-sha-256"
                    )
                    cur.execute(
                        sql.SQL("ALTER ROLE {} WITH LOGIN PASSWORD {}").format(
                            sql.Identifier(login), sql.Literal(verifier.decode())
                        )
                    )
            raw.commit()
        finally:
            raw.close()
    finally:
        engine.dispose()
