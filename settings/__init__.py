"""All mmrag settings in one class, read from ``MMRAG_*`` environment variables or ``.env``.

The Temporal connection is *not* here: it follows Temporal's own conventions
(``TEMPORAL_ADDRESS``, ``TEMPORAL_NAMESPACE``, ``TEMPORAL_API_KEY``, TLS variables and
``temporal.toml`` profiles) through ``temporalio.envconfig``; see ``workers/temporal_client.py``.

Defaults point at the embedded stack that ``mmrag stack up`` starts; production values
are given in README.md and docker-compose.yml.

One module of ~450 lines on purpose: one parser and one list of every setting (the bottom
layer; tests/test_compose.py checks compose sets each one), docs/configuration.md explains them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
# Worker role -> its Postgres login (workers/db_logins.py, which also sets their passwords).
WORKER_LOGINS: dict[str, str] = {"cpu": "mmrag_ingest", "query": "mmrag_query"}
# The worker roles, one list for the CLI, the workers (workers/roles.py ROLE_ACTIVITIES holds
# what each runs) and the benches.
WORKER_ROLES = ("cpu", "encode", "generate", "query")


class Settings(BaseSettings):
    """mmrag configuration. Every field maps to ``MMRAG_<FIELD>`` (case-insensitive)."""

    model_config = SettingsConfigDict(env_prefix="MMRAG_", env_file=".env", extra="ignore")
    # The worker role whose Postgres login database_endpoint() returns (for_database_role);
    # None: the owner's URL.
    _database_role: str | None = PrivateAttr(default=None)

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

    # Postgres: asset registry, index versions and the audit trail. The owner's URL runs
    # migrations and admin tools (`mmrag db upgrade`, `mmrag search`) and never a worker:
    # each worker role logs in as its own least-privilege login (workers/db_logins.py) with
    # its own secret, via Settings.for_database_role. Empty: the embedded stack's URLs
    # (state_dir/endpoints.json; passwords in 0600 pgpass files the stack created).
    database_url: SecretStr = SecretStr("")  # the owner (migrations)
    database_url_cpu: SecretStr = SecretStr("")  # mmrag_ingest:<password>@...: cpu workers
    database_url_query: SecretStr = SecretStr("")  # mmrag_query:<password>@...: query workers

    # Storage roots (activities/store/roots.py): JSON {"tenant": ["file:///dir", "gs://b/p"],
    # "*": [...]}. Workers read, list and delete objects only inside the run's tenant's roots
    # (plus "*"), and the stack's <state_dir>/storage_roots.json, which `mmrag ingest PATH`
    # appends to on the stack's own machine.
    storage_roots: str = ""
    # Models a Reindex may build (operators only): "model" or "model/pretrained" entries,
    # comma-separated; the configured clip_model and the shipped tiny model are always allowed.
    # Checkpoint files must lie inside reindex_checkpoint_dir (empty: checkpoint paths refused).
    reindex_models: str = ""
    reindex_checkpoint_dir: str = ""

    # Media.
    gcs_project: str = ""  # for google-cloud-storage; credentials come from ADC
    max_object_bytes: int = 50 * 1024 * 1024
    max_image_pixels: int = 40_000_000  # above this an image is a decompression bomb

    # Media breadth and hostile-input bounds (activities/media/). Every bound below fails
    # the asset alone, non-retryably, with a reason that names the setting. Every file
    # (images and Ask's query images too) is decoded in a child process with hard limits
    # (decode_time_limit_s or image_decode_time_limit_s, decode_memory_mb; see the decoder
    # sandbox block below): a hostile file costs at most that much and can never take the
    # worker down; images are also bounded by max_image_pixels (checked from the header,
    # before any pixel is allocated).
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
    # -- Decoder sandbox (activities/media/sandbox.py; docs/media.md "Decoder sandbox") ------
    # The child gets no secret environment, RLIMIT_CPU/NOFILE/FSIZE/CORE as well as
    # decode_memory_mb, and new user + network namespaces where the kernel allows them.
    image_decode_time_limit_s: float = 20.0  # per image, ingest and Ask's query image: time
    # waiting on its decoder; slower images fail alone (a query image: BadQuery). A 40 Mpx
    # JPEG or PNG decodes in ~0.1-1 s; Ask's encode step has 30 s in all
    decode_require_isolation: bool = False  # true: where the child cannot get its own network
    # namespace, refuse to decode (a loud, retryable error) instead of decoding with the network

    # CLIP encoder.
    clip_model: str = "ViT-B-32"
    clip_pretrained: str = "laion2b_s34b_b79k"
    clip_checkpoint: str = ""  # a local checkpoint file; overrides clip_pretrained
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = 32  # images per encode activity and per forward pass
    decode_threads: int = 4
    torch_threads: int = 0  # 0: torch's default on CPU, 1 on CUDA (encoder.CUDA_TORCH_THREADS)
    # -- GPU JPEG decoding (scale helper, issue 17; activities/media/jpeg_gpu.py, docs/media.md)
    # auto: on when the encoder runs on CUDA; on: the same, and refuse to start on a CPU
    # encoder; off: every image decoded in the sandbox. Only plain JPEGs within the limits
    # go to the GPU decoder; anything else, or one it fails on, takes the sandbox.
    gpu_jpeg_decode: Literal["auto", "on", "off"] = "auto"

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
    # -- The LLM client (activities/llm/client.py LlmConfig.from_settings): read here, the
    # one parser of the environment. The endpoint and key keep the openai client's own names.
    openai_base_url: str = Field(default="", validation_alias="OPENAI_BASE_URL")
    openai_api_key: SecretStr = Field(default=SecretStr(""), validation_alias="OPENAI_API_KEY")
    llm_model: str = "gpt-4o-mini"  # "" too: activities/rag/tokens.py DEFAULT_LLM_MODEL
    llm_timeout_s: float = Field(default=30.0, gt=0)
    breaker_fail_max: int = Field(default=5, ge=1)  # consecutive transient errors to open
    breaker_reset_s: float = Field(default=30.0, ge=0)  # open this long, then one trial call
    llm_temperature: str = "0"  # a number; "none" omits it (models that accept no other)
    llm_max_tokens_param: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
    llm_cache_size: int = 256  # answers and chunk summaries kept per worker
    # Prompts are counted in llm_model's tiktoken encoding (activities/rag/tokens.py); an
    # encoding name here (o200k_base, cl100k_base) overrides it, "approx" never uses tiktoken.
    tokenizer: str = ""
    # -- end of the LLM client ---------------------------------------------------------------

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
    codec_server_token: SecretStr = SecretStr("")  # required: "Authorization: Bearer …"
    codec_server_origins: str = "http://localhost:8233,http://127.0.0.1:8233"  # CORS, commas
    codec_server_namespaces: str = "default"  # commas: the X-Namespaces served (required)
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

    # -- Codec server and events endpoint at the trust boundary (issue 13) -----------------
    # starters/codec_server.py: MMRAG_CODEC_SERVER_TOKEN is required; this waives it, and is
    # honoured on a loopback host only (the local Web UI has no login to send a token with).
    codec_server_insecure_no_token: bool = False
    # Strict: /decode answers a payload the codec did not encrypt with a "refused" marker
    # instead of its content: anyone who can write to Temporal without the key can plant one.
    codec_server_strict: bool = True
    codec_server_read_timeout_s: float = 10.0  # for one whole request: line, headers, body
    # starters/events.py (`mmrag events serve`, Pub/Sub push). events_auth "oidc" (default)
    # verifies Pub/Sub's signed push token (RS256 JWT in "Authorization: Bearer"): aud ==
    # events_audience, email in events_service_accounts (commas), iss accounts.google.com,
    # expiry; signed by a key in events_certs_file (Google's JWKS, its {kid: PEM certificate}
    # JSON, or PEM certificates / public keys). "token": a static MMRAG_EVENTS_TOKEN in the
    # Authorization header, for push senders that cannot sign (the Pub/Sub emulator, relays).
    events_auth: str = "oidc"
    events_audience: str = ""
    events_service_accounts: str = ""
    events_certs_file: str = ""
    events_token: SecretStr = SecretStr("")
    # Buckets whose notifications are acted on, commas; "bucket/prefix/" narrows to a prefix.
    # Required: a notification for anything else is refused (403) and starts nothing.
    events_buckets: str = ""
    events_read_timeout_s: float = 10.0  # for one whole request: line, headers, body
    # -- end of codec server and events settings -------------------------------------------

    # -- Tenant credentials (workers/auth.py; README "Credentials") ---------------------------
    # Every workflow run carries a signed credential (Ed25519 JWT) in the Temporal header
    # `mmrag_auth`: tenants, role (reader | writer | operator), expiry, key id. Workers check it
    # against these public keys, a JSON file {key id: public key PEM} that holds several keys
    # while they rotate. Empty: the local stack's state_dir/auth/verify_keys.json.
    auth_verify_keys_file: str = ""
    # false: runs without a credential are let through (a credential that is present is still
    # checked). Only for a migration window.
    auth_required: bool = True
    # Token issuers only (CLI, demo, an HTTP front end; never workers): the private key, as a
    # PEM file or inline PEM text. Empty: the local stack's state_dir/auth/signing_key.pem
    # when it exists (`mmrag stack up` creates it).
    auth_signing_key_file: str = ""
    auth_signing_key: SecretStr = SecretStr("")
    # A ready token a client attaches to what it starts (`mmrag token issue` prints one);
    # it wins over minting from the signing key.
    auth_token: SecretStr = SecretStr("")
    # Lifetime of operator tokens a client mints from the signing key for its starts, and of
    # the one a schedule keeps in its action (it starts runs long after it was created).
    auth_client_token_ttl_s: float = 900.0
    auth_schedule_token_ttl_days: float = 365.0
    # -- end of tenant credential settings ----------------------------------------------------

    # -- Caller limits (workflows/limits.py, activities/limits.py) -------------------------
    # The most one workflow input may ask of the workers. Larger (or non-positive) values
    # are clamped on the worker side, never refused: they only pace or size the same work.
    max_page_size: int = 512  # IngestBatchInput.page_size: objects listed per scan_page
    max_batch_size: int = 256  # IngestBatch / Reindex batch_size: objects per encode activity
    max_concurrent_batches: int = 8  # IngestBatch / Reindex max_concurrent_batches
    max_heartbeat_timeout_s: int = 600  # IngestBatchInput.encode_heartbeat_timeout_s
    min_watch_interval_s: int = 60  # WatchPrefixInput.interval_s, when not 0 (one pass)
    max_top_k: int = 100  # AskInput.top_k
    max_answer_tokens: int = 2048  # AskInput.max_answer_tokens (the LLM's max_tokens)
    # -- end of caller limits -------------------------------------------------------------

    # -- Text in media: passages, OCR, captions (issue 15; docs/media.md) --------------------
    # A PDF page's text (text layer or OCR) is cut into passages of at most passage_tokens
    # words and punctuation marks, each starting passage_overlap_tokens before the previous
    # one ended; each is its own chunk "page:N:p:K" (activities/media/passages.py).
    passage_tokens: int = 60  # CLIP's text tower reads 77 BPE tokens: ~60 words of prose
    passage_overlap_tokens: int = 15
    # OCR (Tesseract, Debian's tesseract-ocr: `make test` installs it as root) inside the
    # decoder sandbox, on PDF pages whose text layer has fewer than ocr_min_text_chars letters
    # and digits, and on images and video keyframes where a cheap check sees text.
    ocr_enabled: bool = True  # false: no OCR anywhere (also off when tesseract is missing)
    ocr_languages: str = "eng"  # Tesseract's -l: installed language packs joined by "+"
    ocr_min_text_chars: int = 40
    ocr_max_side: int = 2000  # px, longer side a page/image/frame is read at
    ocr_time_budget_s: float = 120.0  # OCR per object (a PDF's pages, a video's frames)
    ocr_page_timeout_s: float = 10.0  # OCR per page, image or frame
    # Captions (activities/captions.py): an OpenAI-compatible vision model, through the
    # same client, breaker and endpoint as generation (OPENAI_BASE_URL / OPENAI_API_KEY),
    # on mmrag-gpu-generate. Empty: no captions. Set it on the cpu worker (which plans and
    # stores captions) and the generate worker (which asks the model).
    caption_model: str = ""
    caption_max_tokens: int = 60  # the caption's length cap (the request's max_tokens)
    caption_max_side: int = 512  # px, the picture sent to the model (a JPEG data URL)
    # -- end of text in media settings ---------------------------------------------------------

    # -- Web app and HTTP API (`mmrag serve`, starters/web/; docs/web.md) --------------------
    web_host: str = "127.0.0.1"
    web_port: int = 8080
    # The most a JSON request body may hold (an inline query image is base64: 256 KB -> 342 KB).
    web_max_body_bytes: int = 1024 * 1024
    # Uploads (POST /v1/ingest/uploads): the whole request, one file, files per request.
    web_max_upload_bytes: int = 100 * 1024 * 1024
    web_max_file_bytes: int = 50 * 1024 * 1024
    web_max_upload_files: int = 200
    # Where uploads are stored, one folder per tenant (registered as that tenant's storage
    # root on the stack's machine). Empty: <state_dir>/uploads.
    web_upload_dir: str = ""
    # A client must send its request line and headers, and then its body, each within this
    # many seconds, or the connection is closed (slow clients hold no server slot for ever).
    web_request_timeout_s: float = 30.0
    web_max_connections: int = 256  # open connections; more are answered 503
    web_ask_timeout_s: float = 120.0  # an Ask not answered by then is 504 and terminated
    # How long a request waits for Temporal to take a call (start a run, describe it) and for
    # Postgres to accept a connection before it is answered 503 (docs/web.md "Outages").
    web_temporal_timeout_s: float = 10.0
    web_database_connect_timeout_s: int = 5
    # Lifetime of the workflow credential the server mints for an API key (one per key,
    # reused until half its life), and how long a verified or revoked key is remembered.
    web_token_ttl_s: float = 300.0
    web_key_cache_s: float = 5.0
    web_preview_cache_items: int = 512  # rendered thumbnails kept in memory
    web_preview_concurrency: int = 2  # decoder children rendering previews at once
    # The Temporal Web UI the page links each run to. Empty: the embedded stack's.
    web_temporal_ui_url: str = ""
    # -- end of web app settings ------------------------------------------------------------

    # -- Vector index at scale (activities/store/vectors.py IndexConfig; docs/performance.md
    # "Scale", docs/scaling.md) ------------------------------------------------------------
    # The ANN index a *new* collection (index version) is built with; existing collections keep
    # theirs until a Reindex builds a new version. Search parameters apply to every search:
    # hnsw_ef to HNSW collections (raised to top_k when lower), ivf_nprobe to IVF ones.
    # Defaults chosen with bench/scale.py (1M clustered 512-d vectors, 2 cores).
    index_type: Literal["HNSW", "IVF_SQ8", "IVF_PQ", "IVF_FLAT", "FLAT"] = "HNSW"
    hnsw_m: int = Field(default=16, ge=4, le=64)  # graph degree: memory and recall
    hnsw_ef_construction: int = Field(default=200, ge=8, le=1024)  # build effort
    hnsw_ef: int = Field(default=256, ge=1, le=32768)  # search breadth: latency vs recall
    ivf_nlist: int = Field(default=1024, ge=1, le=65536)  # clusters per segment
    ivf_nprobe: int = Field(default=32, ge=1, le=65536)  # clusters searched
    ivf_pq_m: int = Field(default=64, ge=1, le=1024)  # IVF_PQ sub-quantizers; divides the dim
    ivf_pq_nbits: int = Field(default=8, ge=1, le=16)
    # New collections make tenant Milvus's partition key (rows hashed over milvus_partitions
    # partitions by tenant; a search for one tenant reads one partition). Existing collections
    # keep a plain tenant field; every read filters on tenant either way. Writes stay
    # delete + insert (upsert with a partition key loses rows on Milvus 2.3.5).
    tenant_partition_key: bool = True
    milvus_partitions: int = Field(default=64, ge=1, le=1024)
    # -- end of vector index settings ---------------------------------------------------------

    # -- Exact search for small tenants (activities/store/vectors.py VectorStore.search;
    # docs/performance.md "Vector search at scale") ------------------------------------------
    # Milvus 2.3.5's filtered HNSW search can return fewer hits than a tenant has matching
    # rows when the filter keeps a tiny share of a segment. A search that comes back short
    # counts the matching rows; when there are more than it returned and at most this many,
    # they are fetched with their vectors and ranked exactly. 0: never (the index's hits only).
    exact_search_max_rows: int = Field(default=4096, ge=0, le=1_000_000)
    # -- end of exact search settings ---------------------------------------------------------

    # -- Hybrid retrieval (activities/store/lexical.py, activities/rag/rerank.py;
    # docs/retrieval.md) -------------------------------------------------------------------
    # An Ask with text searches the lexical index (Postgres full-text search over passages,
    # OCR text, captions, file names and tags) beside Milvus, and fuses the two ranked lists
    # by reciprocal rank fusion: score = sum(weight / (rrf_k + rank)) over the legs that
    # found a chunk, then re-ranks (AskInput.rerank). lexical=False: dense only, as before.
    lexical: bool = True
    fusion_dense_weight: float = Field(default=1.0, ge=0.0, le=100.0)
    fusion_lexical_weight: float = Field(default=1.0, ge=0.0, le=100.0)
    rrf_k: int = Field(default=60, ge=1, le=10000)
    # What a chunk's other leg adds to its best leg's reciprocal rank: 1 is the classic RRF
    # sum, 0 the best leg alone (activities/rag/rerank.py fuse_rrf; docs/retrieval.md).
    fusion_agreement: float = Field(default=0.25, ge=0.0, le=1.0)
    # -- end of hybrid retrieval settings -----------------------------------------------------

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

    @field_validator("llm_temperature")
    @classmethod
    def _temperature(cls, value: str) -> str:
        """A number, or none / null / omit; say which setting otherwise."""
        if value.strip().lower() not in ("", "none", "null", "omit"):
            try:
                float(value)
            except ValueError:
                raise ValueError(
                    f"MMRAG_LLM_TEMPERATURE={value!r}: give a number, or none to omit it"
                ) from None
        return value

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
        """The URL to connect with: the owner's, or in settings made by
        ``for_database_role`` the worker role's own login (never the owner's)."""
        role = self._database_role
        if role is None:
            return self.database_url.get_secret_value() or self.stack_endpoint("database_url")
        if role not in WORKER_LOGINS:
            raise RuntimeError(f"the {role} worker role has no Postgres access")
        own = self._role_database_url(role)
        return own or self.stack_endpoint(f"database_url_{role}")

    def _role_database_url(self, role: str) -> str:
        url = {"cpu": self.database_url_cpu, "query": self.database_url_query}[role]
        return url.get_secret_value()

    def for_database_role(self, role: str) -> Settings:
        """These settings for a worker role's activities: ``database_endpoint()`` is the
        role's own Postgres login (MMRAG_DATABASE_URL_CPU / _QUERY, else the embedded
        stack's), never the owner's; a role without a login (encode, generate) gets none.

        Raises at worker start when an external server is configured (MMRAG_DATABASE_URL)
        without the role's own URL: falling back to the owner would hand a worker the
        rights to rewrite the audit trail."""
        login = WORKER_LOGINS.get(role)
        if login and not self._role_database_url(role) and self.database_url.get_secret_value():
            raise RuntimeError(
                f"the {role} worker needs its own Postgres login: set "
                f"MMRAG_DATABASE_URL_{role.upper()} (user {login}; its password is set by "
                "`mmrag db upgrade` from MMRAG_DB_"
                + login.removeprefix("mmrag_").upper()
                + "_PASSWORD). MMRAG_DATABASE_URL is the owner's, for migrations only"
            )
        copy = self.model_copy()
        copy._database_role = role
        return copy

    def resolved_checkpoint(self) -> Path | None:
        if not self.clip_checkpoint:
            return None
        path = Path(self.clip_checkpoint)
        return path if path.is_absolute() else (REPO_ROOT / path)


def settings_from(env: Mapping[str, str]) -> Settings:
    """Settings read from ``env`` alone (not this process's environment nor ``.env``): a
    container's environment checked before it runs (tests/test_compose.py), a test's."""

    class Only(Settings):
        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, **others):  # type: ignore[no-untyped-def,override]
            return (init_settings,)

    values: dict[str, str] = {}
    variables: dict[str, str] = {}  # field -> its variable
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias if isinstance(info.validation_alias, str) else None
        variables[name] = alias or f"MMRAG_{name.upper()}"
        if variables[name] in env:
            values[alias or name] = env[variables[name]]
    try:
        return Only.model_validate(values)
    except ValidationError as e:  # one line that names the variable, as a ValueError
        first = e.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        variable = variables.get(field, field)
        raise ValueError(f"{variable}={env.get(variable, '')!r}: {first['msg']}") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
