"""All mmrag settings in one class, read from ``MMRAG_*`` environment variables or ``.env``.

The Temporal connection is *not* here: it follows Temporal's own conventions
(``TEMPORAL_ADDRESS``, ``TEMPORAL_NAMESPACE``, ``TEMPORAL_API_KEY``, TLS variables and
``temporal.toml`` profiles) through ``temporalio.envconfig``; see ``workers/temporal_client.py``.

Defaults point at the embedded stack that ``mmrag stack up`` starts; production values
are given in README.md and docker-compose.yml.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL_DIR = REPO_ROOT / "tests" / "fixtures" / "tiny_clip"


class Settings(BaseSettings):
    """mmrag configuration. Every field maps to ``MMRAG_<FIELD>`` (case-insensitive)."""

    model_config = SettingsConfigDict(env_prefix="MMRAG_", env_file=".env", extra="ignore")

    # Where the embedded stack keeps its state (pid files, data dirs, logs).
    state_dir: Path = Field(default=REPO_ROOT / ".mmrag")

    # Vector store: a Milvus URI ("http://host:19530") and token ("user:password" or an
    # API key for Zilliz Cloud).
    milvus_uri: str = ""  # empty: the embedded stack's endpoint from state_dir
    milvus_token: SecretStr = SecretStr("")
    collection_prefix: str = "mmrag"  # collections are <prefix>_v<N>; the alias is <prefix>

    # Postgres: asset registry, index versions and the audit trail.
    database_url: SecretStr = SecretStr("")  # empty: the embedded stack's URL from state_dir

    # Media.
    gcs_project: str = ""  # for google-cloud-storage; credentials come from ADC
    max_object_bytes: int = 50 * 1024 * 1024
    max_image_pixels: int = 40_000_000  # above this an image is a decompression bomb

    # CLIP encoder.
    clip_model: str = "ViT-B-32"
    clip_pretrained: str = "laion2b_s34b_b79k"
    clip_checkpoint: str = ""  # a local checkpoint file; overrides clip_pretrained
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = 32  # images per encode activity and per forward pass
    decode_threads: int = 4
    torch_threads: int = 0  # 0: torch's default

    # Ask: prompt fusion budgets (tokens).
    prompt_token_budget: int = 3000
    prompt_chunk_tokens: int = 200

    # Workers.
    max_concurrent_activities: int = 8
    max_concurrent_encode_activities: int = 2
    graceful_shutdown_seconds: float = 30.0

    def stack_endpoint(self, key: str) -> str:
        """An endpoint the embedded stack recorded in ``state_dir/endpoints.json``."""
        path = self.state_dir / "endpoints.json"
        try:
            endpoints = json.loads(path.read_text())
        except (OSError, ValueError):
            endpoints = {}
        value = endpoints.get(key, "")
        if not value:
            raise RuntimeError(
                f"no {key} configured: set MMRAG_{key.upper()} for an external server, or run "
                f"`mmrag stack up` to start the embedded stack (state in {self.state_dir})"
            )
        return str(value)

    def milvus_endpoint(self) -> str:
        return self.milvus_uri or self.stack_endpoint("milvus_uri")

    def database_endpoint(self) -> str:
        return self.database_url.get_secret_value() or self.stack_endpoint("database_url")

    def resolved_checkpoint(self) -> Path | None:
        if not self.clip_checkpoint:
            return None
        path = Path(self.clip_checkpoint)
        return path if path.is_absolute() else (REPO_ROOT / path)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
