"""Session fixtures: the real servers on free loopback ports, and real worker processes.

Everything started here is stopped here, by pid, even when tests fail.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio.client import Client

from stack.ports import LOOPBACK, _pick_range, port_bindable
from stack.services import Stack, StackPorts
from starters.background import WorkerProcess
from tests.llm_server import LlmTestServer
from workers.settings import TINY_MODEL_DIR

TEST_MAX_OBJECT_BYTES = 2_000_000
DB_PASSWORD = "pg-canary-5b4a3c2d1e0f9a8b"  # must never appear in logs, payloads or errors
TEST_MAX_IMAGE_PIXELS = 4_000_000


@dataclass
class ServerStack:
    stack: Stack
    state_dir: Path
    endpoints: dict[str, str]
    env: dict[str, str]
    workers: list[WorkerProcess] = field(default_factory=list)
    metrics_ports: dict[int, int] = field(default_factory=dict)  # worker pid -> /metrics port

    def start_worker(self, role: str = "all", **extra_env: str) -> WorkerProcess:
        """A worker process; each serves Prometheus /metrics on its own loopback port."""
        env = {**self.env, **extra_env}
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


@pytest.fixture(scope="session")
def test_stack() -> Iterator[ServerStack]:
    # Not under pytest's tmp dir: pytest resets it to 0700 at each session start, which
    # locks the (non-root) embedded Postgres out of its data directory.
    state_dir = Path(tempfile.mkdtemp(prefix="mmrag-test-"))
    stack = Stack(state_dir, StackPorts.free(), services=("temporal", "milvus", "postgres", "gcs"))
    try:
        endpoints = stack.up()
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
            # A canary password (the embedded server trusts loopback and never asks for it):
            # tests/test_secrets.py proves it appears in no log, history or audit row.
            "MMRAG_DATABASE_URL": endpoints["database_url"].replace(
                "://postgres@", f"://postgres:{DB_PASSWORD}@", 1
            ),
        }
        for inherited in ("TEMPORAL_PROFILE", "OPENAI_API_KEY", "OPENAI_BASE_URL"):
            env.pop(inherited, None)
        # This process (the test client, direct registry/Milvus reads) uses the same settings.
        os.environ.update(
            {k: v for k, v in env.items() if k.startswith(("MMRAG_", "TEMPORAL_", "STORAGE_"))}
        )
        from workers.settings import get_settings

        get_settings.cache_clear()
        ts = ServerStack(stack, state_dir, endpoints, env)
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
        # The cpu worker runs with the least-privilege role, proving it is enough.
        "cpu": {"MMRAG_DATABASE_ROLE": "mmrag_ingest"},
        "encode": {},
        "generate": {"OPENAI_BASE_URL": llm.base_url, **LLM_ENV},
        # Asks on the query queue, as the read-only query role.
        "query": {"MMRAG_DATABASE_ROLE": "mmrag_query"},
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
    return await Client.connect(test_stack.endpoints["temporal_address"], namespace="default")


@pytest.fixture
def tenant(request: pytest.FixtureRequest) -> str:
    """A fresh tenant per test: tests share the servers, never each other's data."""
    return f"t-{request.node.name[:20].replace('[', '-').replace(']', '')}-{uuid.uuid4().hex[:6]}"
