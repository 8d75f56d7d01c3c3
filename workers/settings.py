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
    # Least privilege with Milvus authorization on (workers/milvus_rbac.py, README "Milvus
    # RBAC"): a worker role's own token, used by that role's activities instead of
    # milvus_token (which stays the default, and is what CLI tools use). cpu: mmrag_ingest
    # (collections, aliases, deletes, Ask's search); encode: mmrag_encode (vector writes,
    # the alias's model); query: mmrag_query (search, the alias's model). The generate role
    # never touches Milvus.
    milvus_token_cpu: SecretStr = SecretStr("")
    milvus_token_encode: SecretStr = SecretStr("")
    milvus_token_query: SecretStr = SecretStr("")
    collection_prefix: str = "mmrag"  # collections are <prefix>_v<N>; the alias is <prefix>

    # Postgres: asset registry, index versions and the audit trail.
    database_url: SecretStr = SecretStr("")  # empty: the embedded stack's URL from state_dir
    # A least-privilege role assumed on every connection (migrations/0003): mmrag_ingest
    # for cpu workers, mmrag_query for query workers. Empty: the login user's own privileges.
    database_role: str = ""

    # Media.
    gcs_project: str = ""  # for google-cloud-storage; credentials come from ADC
    max_object_bytes: int = 50 * 1024 * 1024
    max_image_pixels: int = 40_000_000  # above this an image is a decompression bomb

    # Media breadth and hostile-input bounds (activities/media.py, pdf.py, video.py,
    # sandbox.py). Every bound below fails the asset alone, non-retryably, with a reason
    # that names the setting. PDFs and videos are decoded in a child process with hard
    # limits (decode_time_limit_s, decode_memory_mb): a hostile file costs at most that
    # much and can never take the worker down; images are decoded in-process, bounded by
    # max_image_pixels (checked from the header, before any pixel is allocated).
    render_max_side: int = 512  # px, longer side of a rendered PDF page / kept video frame
    pdf_max_pages: int = 500  # more pages than this: refused as a page bomb, nothing rendered
    video_max_bytes: int = 1024 * 1024 * 1024  # videos may exceed max_object_bytes
    video_max_seconds: float = 3600.0  # longer videos are refused (declared or decoded time)
    video_frame_interval_s: float = 5.0  # keep a frame at least this often ...
    video_scene_threshold: float = 0.2  # ... and on a scene change (0..1 colour shift; 0 = off)
    video_max_frames: int = 200  # kept frames per video; the interval stretches to cover it
    decode_time_limit_s: float = 600.0  # per PDF/video per attempt: time spent waiting on
    # its decoder (not on the encoder); an hour of 1080p H.264 decodes in ~3-9 min on CPUs
    decode_memory_mb: int = 2048  # address-space limit (RLIMIT_AS) of a decoder child; 0: none

    # CLIP encoder.
    clip_model: str = "ViT-B-32"
    clip_pretrained: str = "laion2b_s34b_b79k"
    clip_checkpoint: str = ""  # a local checkpoint file; overrides clip_pretrained
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = 32  # images per encode activity and per forward pass
    decode_threads: int = 4
    torch_threads: int = 0  # 0: torch's default on CPU, 1 on CUDA (encoder.CUDA_TORCH_THREADS)

    # Ask: prompt fusion budgets (tokens).
    prompt_token_budget: int = 3000
    prompt_chunk_tokens: int = 200
    # Sources longer than prompt_chunk_tokens are summarised by the LLM (on the generate
    # worker, falling back to the extractive summary per chunk) when one is configured.
    # Off on either the CPU or the generate worker: extractive summaries only.
    llm_summarize_chunks: bool = True
    llm_summary_timeout_s: float = 10.0  # per summary request (capped by MMRAG_LLM_TIMEOUT_S)
    # Send the top image sources to a vision-capable model as data URLs (downscaled JPEGs).
    llm_vision: bool = False
    llm_vision_images: int = 2
    llm_vision_max_side: int = 512

    # Workers.
    max_concurrent_activities: int = 8
    max_concurrent_encode_activities: int = 2
    graceful_shutdown_seconds: float = 30.0

    # -- Operability: payload encryption, codec server, metrics, tracing -----------------
    # Payload encryption (workers/codec.py). Keys are base64 AES keys (32 bytes: AES-256).
    # MMRAG_CODEC_KEY is one key named MMRAG_CODEC_KEY_ID; MMRAG_CODEC_KEY_FILE is a keyring
    # (`key_id=base64` lines, or JSON / TOML {"keys": {id: base64}, "active": id}) for
    # rotation: the active key (MMRAG_CODEC_KEY_ID, else the inline key, else the file's
    # "active" or first key) encrypts, every key decrypts. No key: payloads stay plaintext.
    codec_key: SecretStr = SecretStr("")
    codec_key_id: str = ""
    codec_key_file: str = ""
    codec_compress_min_bytes: int = 4096  # zlib before encrypting from this size; 0: never
    # `mmrag codec-server`: /encode and /decode for the Web UI and `temporal --codec-endpoint`.
    codec_server_host: str = "127.0.0.1"
    codec_server_port: int = 8234
    codec_server_token: SecretStr = SecretStr("")  # required as "Authorization: Bearer …"
    codec_server_origins: str = "http://localhost:8233,http://127.0.0.1:8233"  # CORS, commas
    codec_server_namespaces: str = ""  # commas; empty: any X-Namespace is served
    # Prometheus /metrics of the Temporal SDK runtime plus mmrag_* series, one per worker
    # process (workers/telemetry.py). 0: off.
    metrics_port: int = 0
    metrics_host: str = "0.0.0.0"  # reachable by a scraper in a pod; 127.0.0.1 on a laptop
    # OpenTelemetry tracing (TracingInterceptor): none | console | otlp. For otlp the
    # endpoint defaults to OTEL_EXPORTER_OTLP_ENDPOINT (the exporter's own variable).
    tracing_exporter: str = "none"
    tracing_endpoint: str = ""
    tracing_service_name: str = "mmrag"
    # -- end of operability settings ------------------------------------------------------

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

    def for_milvus_role(self, role: str) -> Settings:
        """These settings with ``milvus_token`` set to the worker role's own token, if any,
        so every activity of the role connects as the role's Milvus user."""
        token = {
            "cpu": self.milvus_token_cpu,
            "encode": self.milvus_token_encode,
            "query": self.milvus_token_query,
        }.get(role)
        if token is None or not token.get_secret_value():
            return self
        return self.model_copy(update={"milvus_token": token})

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
