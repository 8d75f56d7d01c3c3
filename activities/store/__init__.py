"""What the activities keep, by outside system: objects (local files and GCS, inside each
tenant's storage roots), vectors (Milvus), and the registry of assets, index versions and
audit rows (Postgres, through SQLAlchemy)."""
