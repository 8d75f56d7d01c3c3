"""Apply the Alembic migrations under ``migrations/`` to a database."""

from __future__ import annotations

from alembic import command
from alembic.config import Config

from migrations import MIGRATIONS_DIR


def upgrade(database_url: str, revision: str = "head") -> None:
    config = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    command.upgrade(config, revision)
