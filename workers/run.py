"""Worker entry point: one role per task queue, or all of them in one process for development.

Roles (docs/architecture.md): ``cpu`` runs the workflows and the storage / Milvus / Postgres
activities on ``mmrag``; ``encode`` runs CLIP on ``mmrag-gpu-encode`` with the model
loaded before polling starts; ``generate`` runs LLM generation on ``mmrag-gpu-generate``;
``query`` runs ``Ask`` on ``mmrag-query`` with its own warm model (optional fast path).
SIGTERM and SIGINT shut down gracefully: running activities get
``MMRAG_GRACEFUL_SHUTDOWN_SECONDS`` to finish before they are handed back. A worker killed
outright (SIGKILL, OOM, a lost node) hands back nothing: its activities are retried once
their heartbeat timeout passes, so activities that cannot heartbeat mid-call get a liveness
heartbeat from the worker (``LivenessHeartbeat``) and a short heartbeat timeout from their
workflow, instead of a retry only after a start-to-close of minutes.

Concurrency is bounded per role (``max_concurrent_activities``: ``MMRAG_MAX_CONCURRENT_
ACTIVITIES`` for cpu and generate, ``MMRAG_MAX_CONCURRENT_ENCODE_ACTIVITIES`` for encode);
work beyond it waits in Temporal's task queue, where ``schedule_to_start_timeout`` turns
a saturated queue into a clear, retryable failure rather than an unbounded wait.

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
from pathlib import Path

from temporalio import activity
from temporalio.client import Client
from temporalio.worker import (
    ActivityInboundInterceptor,
    ActivityOutboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
    Worker,
)

from activities.media.sandbox import harden_worker
from settings import WORKER_ROLES, Settings, get_settings
from workers.auth import AuthAudit, AuthInterceptor, policy_from_settings
from workers.roles import ROLE_ACTIVITIES, ROLE_BUILDERS
from workers.telemetry import (
    configure_tracing,
    metrics_address,
    worker_interceptors,
    worker_runtime,
)
from workers.temporal_client import connect
from workflows.activities import home_of

ROLES = ("all", *WORKER_ROLES)
log = logging.getLogger("mmrag.worker")

# Activities that spend their time in one blocking call (a Milvus delete, a registry page,
# a model load, an LLM request) and report no progress of their own: those whose home
# (workflows/activities/) sets liveness_heartbeat. Not encode_batch: it heartbeats its resume
# cursor itself, which an empty liveness heartbeat would overwrite.
LIVENESS_HEARTBEAT = frozenset(
    home_of(stub).name
    for stubs in ROLE_ACTIVITIES.values()
    for stub in stubs
    if home_of(stub).liveness_heartbeat
)


class LivenessHeartbeat(Interceptor):
    """Heartbeats from the worker's event loop while a ``LIVENESS_HEARTBEAT`` activity that
    was given a heartbeat timeout runs: the beats stop when the process dies, so Temporal
    retries the activity elsewhere after that timeout. A hung call is still bounded by its
    start-to-close timeout."""

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _LivenessInbound(next)


class _LivenessInbound(ActivityInboundInterceptor):
    _outbound: ActivityOutboundInterceptor | None = None

    def init(self, outbound: ActivityOutboundInterceptor) -> None:
        self._outbound = outbound  # its heartbeat() is safe to call from the event loop
        super().init(outbound)

    async def execute_activity(self, input: ExecuteActivityInput) -> object:
        info = activity.info()
        timeout = info.heartbeat_timeout
        outbound = self._outbound
        if info.activity_type not in LIVENESS_HEARTBEAT or not timeout or outbound is None:
            return await super().execute_activity(input)

        async def beat() -> None:
            while True:
                outbound.heartbeat()
                await asyncio.sleep(timeout.total_seconds() / 3)

        beating = asyncio.create_task(beat())
        try:
            return await super().execute_activity(input)
        finally:
            beating.cancel()


def compile_workflow_bytecode() -> None:
    """Write the workflow modules' bytecode where it is missing. The sandbox imports a
    workflow's module afresh for every run; with no ``.pyc`` (PYTHONDONTWRITEBYTECODE, a
    fresh image) each run compiled the source first, ~1 ms of every Ask. A read-only tree
    keeps the old behaviour."""
    import compileall

    import workflows

    if not compileall.compile_dir(Path(workflows.__file__).parent, maxlevels=0, quiet=2):
        log.info("workflow bytecode not written (read-only tree?): each run compiles them")


def build_workers(role: str, client: Client, settings: Settings) -> list[Worker]:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: choose one of {', '.join(ROLES)}")
    compile_workflow_bytecode()
    names = list(ROLE_BUILDERS) if role == "all" else [role]
    # Every run proves its caller (workers/auth.py): read the verification keys before
    # polling, so a worker without them stops at start, saying which setting to fix.
    auth = AuthInterceptor(policy_from_settings(settings))
    workers = []
    for name in names:
        content = ROLE_BUILDERS[name](settings)
        activities = list(content.activities)
        if content.workflows:  # a refused run's audit row: a local activity of its worker
            activities.append(AuthAudit(settings.for_database_role(name)).audit_refusal)
        workers.append(
            Worker(
                client,
                task_queue=content.task_queue,
                workflows=list(content.workflows),
                activities=activities,
                activity_executor=ThreadPoolExecutor(content.max_concurrent_activities),
                max_concurrent_activities=content.max_concurrent_activities,
                graceful_shutdown_timeout=timedelta(seconds=settings.graceful_shutdown_seconds),
                # The credential check first: nothing else sees a refused run's workflow code.
                interceptors=[auth, *worker_interceptors(), LivenessHeartbeat()],
            )
        )
    return workers


async def run_workers(role: str, settings: Settings | None = None) -> None:
    settings = settings or get_settings()
    # Every role holds secrets (LLM key, database logins, codec keys): no core dumps, and
    # no same-user process reads this one's /proc/<pid>/environ or memory.
    harden_worker()
    runtime = worker_runtime(settings, role)
    configure_tracing(settings, role)
    client = await connect(settings, runtime=runtime, token="")  # workers start nothing
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
