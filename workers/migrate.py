"""Apply the Alembic migrations under ``migrations/`` to a database."""

from __future__ import annotations

from alembic import command
from alembic.config import Config

from settings import REPO_ROOT


def upgrade(database_url: str, revision: str = "head") -> None:
    config = Config(str(REPO_ROOT / "migrations" / "alembic.ini"))
    config.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    command.upgrade(config, revision)
