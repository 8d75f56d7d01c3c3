"""Session fixtures: the real servers on free loopback ports, and real worker processes.

Everything started here is stopped here, by pid, even when tests fail.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio.client import Client

from stack.services import Stack, StackPorts
from starters.background import WorkerProcess
from workers.settings import TINY_MODEL_DIR

TEST_MAX_OBJECT_BYTES = 2_000_000
TEST_MAX_IMAGE_PIXELS = 4_000_000


@dataclass
class ServerStack:
    stack: Stack
    state_dir: Path
    endpoints: dict[str, str]
    env: dict[str, str]
    workers: list[WorkerProcess] = field(default_factory=list)

    def start_worker(self, role: str = "all", **extra_env: str) -> WorkerProcess:
        worker = WorkerProcess.start(self.state_dir, role, {**self.env, **extra_env})
        self.workers.append(worker)
        return worker


@pytest.fixture(scope="session")
def test_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerStack]:
    state_dir = tmp_path_factory.mktemp("mmrag-state")
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
        }
        env.pop("TEMPORAL_PROFILE", None)
        # This process (the test client, direct registry/Milvus reads) uses the same settings.
        os.environ.update({k: v for k, v in env.items() if k.startswith(("MMRAG_", "TEMPORAL_", "STORAGE_"))})
        from workers.settings import get_settings

        get_settings.cache_clear()
        ts = ServerStack(stack, state_dir, endpoints, env)
        yield ts
    finally:
        for worker in getattr(locals().get("ts"), "workers", []):
            worker.stop(timeout=10)
        stack.down()


@dataclass
class Workers:
    """The shared cpu and encode worker processes; fault tests may replace the encoder."""

    cpu: WorkerProcess
    encode: WorkerProcess

    def alive(self) -> bool:
        return self.cpu.proc.poll() is None and self.encode.proc.poll() is None


@pytest.fixture(scope="session")
def worker(test_stack: ServerStack) -> Workers:
    return Workers(cpu=test_stack.start_worker("cpu"), encode=test_stack.start_worker("encode"))


@pytest_asyncio.fixture(scope="session")
async def client(test_stack: ServerStack) -> Client:
    return await Client.connect(test_stack.endpoints["temporal_address"], namespace="default")


@pytest.fixture
def tenant(request: pytest.FixtureRequest) -> str:
    """A fresh tenant per test: tests share the servers, never each other's data."""
    return f"t-{request.node.name[:20].replace('[', '-').replace(']', '')}-{uuid.uuid4().hex[:6]}"
