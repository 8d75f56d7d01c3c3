"""Worker entry point: one role per task queue, or all of them in one process for development.

Roles (see DESIGN.md): ``cpu`` runs the workflows and the storage / Milvus / Postgres
activities on ``mmrag``; ``encode`` runs CLIP on ``mmrag-gpu-encode`` with the model
loaded before polling starts; ``generate`` runs LLM generation on ``mmrag-gpu-generate``.
SIGTERM and SIGINT shut down gracefully: running activities get
``MMRAG_GRACEFUL_SHUTDOWN_SECONDS`` to finish before they are handed back.

Operability comes from settings, the same for every role: the client's data converter
encrypts payloads when a codec key is set (``workers/temporal_client.py``), a Prometheus
``/metrics`` endpoint is served when ``MMRAG_METRICS_PORT`` is set, and spans are exported
when ``MMRAG_TRACING_EXPORTER`` is set (``workers/telemetry.py``).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from temporalio.client import Client
from temporalio.worker import Worker

from workers.roles import ROLE_BUILDERS
from workers.settings import Settings, get_settings
from workers.telemetry import (
    configure_tracing,
    metrics_address,
    worker_interceptors,
    worker_runtime,
)
from workers.temporal_client import connect

ROLES = ("all", "cpu", "encode", "generate")
log = logging.getLogger("mmrag.worker")


def build_workers(role: str, client: Client, settings: Settings) -> list[Worker]:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: choose one of {', '.join(ROLES)}")
    names = list(ROLE_BUILDERS) if role == "all" else [role]
    workers = []
    for name in names:
        content = ROLE_BUILDERS[name](settings)
        workers.append(
            Worker(
                client,
                task_queue=content.task_queue,
                workflows=list(content.workflows),
                activities=list(content.activities),
                activity_executor=ThreadPoolExecutor(content.max_concurrent_activities),
                max_concurrent_activities=content.max_concurrent_activities,
                graceful_shutdown_timeout=timedelta(seconds=settings.graceful_shutdown_seconds),
                interceptors=worker_interceptors(),
            )
        )
    return workers


async def run_workers(role: str, settings: Settings | None = None) -> None:
    settings = settings or get_settings()
    runtime = worker_runtime(settings, role)
    configure_tracing(settings, role)
    client = await connect(settings, runtime=runtime)
    codec = client.data_converter.payload_codec
    log.info("payload encryption: %s", getattr(codec, "keyring", None) or "off")
    if runtime is not None:
        log.info("metrics on http://%s/metrics", metrics_address(settings))
    workers = build_workers(role, client, settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(w.run()) for w in workers]
    queues = ", ".join(w.task_queue for w in workers)
    log.info("worker running (role %s) on %s", role, queues)
    print(f"mmrag worker ready: role={role} queues={queues}", flush=True)
    done_or_stop = asyncio.create_task(stop.wait())
    finished, _ = await asyncio.wait([done_or_stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for task in finished:
        if task is not done_or_stop and task.exception():
            log.error("worker stopped: %s", task.exception())
    log.info("shutting down (graceful timeout %ss)", settings.graceful_shutdown_seconds)
    await asyncio.gather(*(w.shutdown() for w in workers), return_exceptions=True)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception():
            raise task.exception()  # type: ignore[misc]
