"""The Alembic environment and the schema's versions, installed with the package (as data:
alembic.ini, script.py.mako, versions/*.py), so ``workers.migrate`` finds them in a wheel
install as in a checkout."""

from pathlib import Path

MIGRATIONS_DIR = Path(__file__).resolve().parent
