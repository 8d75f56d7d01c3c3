"""Session fixtures: the real servers on free loopback ports, and real worker processes.

Everything started here is stopped here, by pid, even when tests fail.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
from sqlalchemy.engine import make_url
from temporalio.client import Client

from activities.clip import TINY_MODEL_DIR
from stack.ports import LOOPBACK, _pick_range, port_bindable
from stack.servers import postgres_password
from stack.services import Stack, StackPorts
from starters.background import WorkerProcess
from tests.llm_server import LlmTestServer

TEST_MAX_OBJECT_BYTES = 2_000_000
TEST_MAX_IMAGE_PIXELS = 4_000_000


@dataclass
class ServerStack:
    stack: Stack
    state_dir: Path
    endpoints: dict[str, str]
    env: dict[str, str] = field(repr=False)  # holds the database passwords
    workers: list[WorkerProcess] = field(default_factory=list)
    metrics_ports: dict[int, int] = field(default_factory=dict)  # worker pid -> /metrics port
    # Each Postgres login's password (random, made by the stack); tests/test_secrets.py
    # proves none appears in a log, history, audit row or error.
    db_passwords: dict[str, str] = field(default_factory=dict, repr=False)

    def start_worker(self, role: str = "all", **extra_env: str) -> WorkerProcess:
        """A worker process; each serves Prometheus /metrics on its own loopback port.

        Workers get their roles' own Postgres logins (MMRAG_DATABASE_URL_CPU / _QUERY),
        never the owner's URL, as in docker-compose.yml."""
        env = {k: v for k, v in {**self.env, **extra_env}.items() if k != "MMRAG_DATABASE_URL"}
        if "MMRAG_METRICS_PORT" not in extra_env:
            env["MMRAG_METRICS_PORT"] = str(free_port())
            env["MMRAG_METRICS_HOST"] = "127.0.0.1"
        worker = WorkerProcess.start(self.state_dir, role, env)
        self.workers.append(worker)
        if int(env.get("MMRAG_METRICS_PORT") or 0):
            self.metrics_ports[worker.proc.pid] = int(env["MMRAG_METRICS_PORT"])
        return worker


def free_port() -> int:
    """A free loopback port below the ephemeral range (see ``StackPorts.free``)."""
    low, high = _pick_range()
    rng = random.SystemRandom()
    for _ in range(2000):
        port = rng.randint(low, high)
        if port_bindable(LOOPBACK, port, reuse=False):
            return port
    raise RuntimeError(f"no free port in {low}-{high}")


def db_logins(endpoints: dict[str, str]) -> dict[str, tuple[str, str]]:
    """endpoint key (database_url, database_url_cpu, ...) -> (its URL, its login)."""
    return {
        key: (url, str(make_url(url).username))
        for key, url in endpoints.items()
        if key.startswith("database_url")
    }


def url_with_password(url: str, password: str) -> str:
    """A stack endpoint URL with the password inline instead of its pgpass file."""
    parsed = make_url(url)
    query = {k: v for k, v in parsed.query.items() if k != "passfile"}
    return parsed.set(password=password, query=query).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def test_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerStack]:
    # Not under pytest's tmp dir: pytest resets it to 0700 at each session start, which
    # locks the (non-root) embedded Postgres out of its data directory.
    state_dir = Path(tempfile.mkdtemp(prefix="mmrag-test-"))
    stack = Stack(state_dir, StackPorts.free(), services=("temporal", "milvus", "postgres", "gcs"))
    try:
        endpoints = stack.up()
        db_passwords = {
            login: postgres_password(state_dir, login) for _, login in db_logins(endpoints).values()
        }
        env = {
            **os.environ,
            "MMRAG_STATE_DIR": str(state_dir),
            "MMRAG_CLIP_MODEL": "mmrag-tiny",
            "MMRAG_CLIP_PRETRAINED": "",
            "MMRAG_CLIP_CHECKPOINT": str(TINY_MODEL_DIR / "mmrag-tiny.pt"),
            "MMRAG_DEVICE": "cpu",
            "MMRAG_TORCH_THREADS": "1",
            "MMRAG_MAX_OBJECT_BYTES": str(TEST_MAX_OBJECT_BYTES),
            "MMRAG_MAX_IMAGE_PIXELS": str(TEST_MAX_IMAGE_PIXELS),
            "MMRAG_GRACEFUL_SHUTDOWN_SECONDS": "5",
            "TEMPORAL_ADDRESS": endpoints["temporal_address"],
            "TEMPORAL_NAMESPACE": "default",
            "STORAGE_EMULATOR_HOST": endpoints["gcs_emulator"],
            # Every test's media lives under pytest's base temp dir: the storage root of every
            # tenant. The state dir (and /etc, ~) stay outside it, for the attack tests.
            "MMRAG_STORAGE_ROOTS": json.dumps({"*": [tmp_path_factory.getbasetemp().as_uri()]}),
            # Each login with its password in the URL, as compose passes them (the stack's
            # own endpoints name 0600 pgpass files instead): the owner's for this process
            # (migrations, direct reads), a worker role's own login for its workers.
            **{
                f"MMRAG_{key.upper()}": url_with_password(url, db_passwords[login])
                for key, (url, login) in db_logins(endpoints).items()
            },
        }
        for inherited in ("TEMPORAL_PROFILE", "OPENAI_API_KEY", "OPENAI_BASE_URL"):
            env.pop(inherited, None)
        # This process (the test client, direct registry/Milvus reads) uses the same settings.
        os.environ.update(
            {k: v for k, v in env.items() if k.startswith(("MMRAG_", "TEMPORAL_", "STORAGE_"))}
        )
        from settings import get_settings

        get_settings.cache_clear()
        ts = ServerStack(stack, state_dir, endpoints, env, db_passwords=db_passwords)
        yield ts
    finally:
        for worker in getattr(locals().get("ts"), "workers", []):
            worker.stop(timeout=10)
        stack.down()
        shutil.rmtree(state_dir, ignore_errors=True)  # Milvus unpacks ~250 MB per state dir


LLM_API_KEY = "sk-test-canary-0123456789abcdef"  # must never appear in logs or payloads
LLM_ENV = {
    "OPENAI_API_KEY": LLM_API_KEY,
    "MMRAG_LLM_MODEL": "test-llm",
    "MMRAG_LLM_TIMEOUT_S": "2",
    "MMRAG_BREAKER_FAIL_MAX": "3",
    "MMRAG_BREAKER_RESET_S": "4",
}


@dataclass
class Workers:
    """The shared worker processes, one per role; fault tests may replace one."""

    cpu: WorkerProcess
    encode: WorkerProcess
    generate: WorkerProcess
    query: WorkerProcess

    def alive(self) -> bool:
        return all(w.alive() for w in (self.cpu, self.encode, self.generate, self.query))


@pytest.fixture(scope="session")
def llm(test_stack: ServerStack) -> Iterator[LlmTestServer]:
    """A real HTTP OpenAI-compatible server the generate worker talks to."""
    with LlmTestServer(api_key=LLM_API_KEY) as server:
        yield server


def shared_worker_env(llm: LlmTestServer) -> dict[str, dict[str, str]]:
    """Each shared worker's own environment, by role (tests that restart one reuse it)."""
    return {
        # Every worker logs in to Postgres as its role's own least-privilege login
        # (ServerStack.start_worker): the cpu worker as mmrag_ingest, the query worker (Asks
        # on the query queue) as the read-only mmrag_query, proving each is enough.
        "cpu": {},
        "encode": {},
        "generate": {"OPENAI_BASE_URL": llm.base_url, **LLM_ENV},
        "query": {},
    }


def start_shared_workers(test_stack: ServerStack, llm: LlmTestServer) -> Workers:
    """The shared worker processes, one per role, started in parallel."""
    env = shared_worker_env(llm)
    with ThreadPoolExecutor(len(env)) as pool:
        started = list(pool.map(lambda role: test_stack.start_worker(role, **env[role]), env))
    return Workers(**dict(zip(env, started, strict=True)))


@pytest.fixture(scope="session")
def worker(test_stack: ServerStack, llm: LlmTestServer) -> Workers:
    return start_shared_workers(test_stack, llm)


@pytest_asyncio.fixture(scope="session")
async def client(test_stack: ServerStack) -> Client:
    """A plain client that attaches an operator credential (``mmrag_auth``) minted from the
    test stack's signing key (``state_dir/auth``, created by ``Stack.up``) to every start."""
    from settings import get_settings
    from workers.temporal_client import credential_interceptors

    return await Client.connect(
        test_stack.endpoints["temporal_address"],
        namespace="default",
        interceptors=credential_interceptors(get_settings()),
    )


@pytest.fixture
def tenant(request: pytest.FixtureRequest) -> str:
    """A fresh tenant per test: tests share the servers, never each other's data."""
    return f"t-{request.node.name[:20].replace('[', '-').replace(']', '')}-{uuid.uuid4().hex[:6]}"


# -- the web app (`mmrag serve`): tests/test_web_api.py, tests/test_web_browser.py ------------
# Small limits, so the tests can cross them with small files; a short key cache, so a revoked
# key is refused within the test; a short request deadline, for the slow-client tests.
WEB_ENV = {
    "MMRAG_WEB_MAX_BODY_BYTES": str(512 * 1024),
    "MMRAG_WEB_MAX_UPLOAD_BYTES": str(3_000_000),
    "MMRAG_WEB_MAX_FILE_BYTES": str(1_000_000),
    "MMRAG_WEB_REQUEST_TIMEOUT_S": "3",
    "MMRAG_WEB_KEY_CACHE_S": "0.5",
}


@dataclass
class WebServer:
    """A `mmrag serve` process on a free loopback port, stopped by its pid."""

    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    @classmethod
    def start(cls, test_stack: ServerStack, timeout: float = 60, **extra_env: str) -> WebServer:
        import time
        import urllib.request

        port = free_port()
        log_path = test_stack.state_dir / "logs" / f"web-{uuid.uuid4().hex[:6]}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "starters.cli", "serve", "--port", str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**test_stack.env, **WEB_ENV, **extra_env},
                start_new_session=True,
            )
        server = cls(proc, f"http://127.0.0.1:{port}", log_path)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(server.url + "/v1/openapi.json", timeout=2):
                    return server
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    server.stop()
                    raise RuntimeError(f"mmrag serve did not start:\n{server.log()}") from None
                time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, kill: bool = False) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def web(test_stack: ServerStack, worker: Workers) -> Iterator[WebServer]:
    server = WebServer.start(test_stack)
    try:
        yield server
    finally:
        server.stop()


def make_api_key(tenant: str, role: str = "writer") -> str:
    """A new API key of ``tenant`` (as `mmrag apikey create` makes one, with the owner's URL)."""
    from activities.store.registry import get_engine
    from settings import get_settings
    from starters.web.keys import create_key

    return create_key(get_engine(get_settings().database_endpoint()), tenant, role)[1]
