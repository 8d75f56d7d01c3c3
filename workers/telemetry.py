"""Metrics and traces for worker processes: the SDK Runtime's Prometheus endpoint and
OpenTelemetry tracing through the SDK's ``TracingInterceptor``.

Why here and not in each activity:

- **One /metrics port per worker process.** A Temporal ``Runtime`` owns the Prometheus
  endpoint; the worker creates one when ``MMRAG_METRICS_PORT`` is set, hands it to
  ``Client.connect(runtime=...)`` and gives its meter to :mod:`activities.runtime.metrics`, so the
  SDK's ``temporal_*`` series and mmrag's ``mmrag_*`` series share one scrape target. CLI
  clients never bind a port.
- **Asset outcomes are counted where they all pass.** Every asset outcome of an ingest is
  the result of ``scan_page`` (rejected, unchanged) or ``encode_batch`` (ingested, failed);
  :class:`OutcomeMetricsInterceptor` counts them from those results, once, with the batch
  size and wall time, so the activities need no metric code and no outcome is counted twice.
- **Tracing is off unless asked for.** ``MMRAG_TRACING_EXPORTER=console|otlp`` installs one
  process-wide tracer provider and the ``TracingInterceptor`` on the client, which workers
  built on that client inherit; spans follow a request from the starter through workflows
  and activities on every queue (the interceptor propagates context in headers).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

from temporalio import activity
from temporalio.client import Interceptor as ClientInterceptor
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)

from activities.runtime import metrics
from settings import Settings
from workflows.activities.ingest import ENCODE_BATCH, SCAN_PAGE

log = logging.getLogger("mmrag.telemetry")

TRACING_EXPORTERS = ("none", "console", "otlp")
_tracing_lock = threading.Lock()
_tracing_configured = False


# -- metrics ------------------------------------------------------------------------------
def metrics_address(settings: Settings) -> str:
    host = settings.metrics_host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    return f"{host}:{settings.metrics_port}"


def worker_runtime(settings: Settings, role: str) -> Runtime | None:
    """A Runtime serving Prometheus on MMRAG_METRICS_HOST:PORT, or None when the port is 0.

    Also points :mod:`activities.runtime.metrics` at the runtime's meter. SDK latencies stay in
    milliseconds (the SDK default that Temporal's published dashboards expect); mmrag's own
    durations are ``*_seconds`` histograms with their own buckets.
    """
    if settings.metrics_port <= 0:
        metrics.configure(None)
        return None
    address = metrics_address(settings)
    try:
        runtime = Runtime(
            telemetry=TelemetryConfig(
                metrics=PrometheusConfig(
                    bind_address=address,
                    histogram_bucket_overrides=metrics.histogram_buckets(),
                ),
                global_tags={"mmrag_role": role},
            )
        )
    except Exception as e:
        raise RuntimeError(
            f"cannot serve metrics on {address} (MMRAG_METRICS_HOST / MMRAG_METRICS_PORT): {e}"
        ) from e
    metrics.configure(runtime.metric_meter)
    return runtime


class _OutcomeMetricsInbound(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        started = time.perf_counter()
        result = await self.next.execute_activity(input)
        try:
            record_activity_result(
                activity.info().activity_type, input.args, result, time.perf_counter() - started
            )
        except Exception as e:  # metrics must never fail an activity that succeeded
            log.warning("outcome metrics not recorded: %s", e)
        return result


def record_activity_result(name: str, args: Any, result: Any, seconds: float) -> None:
    """Count what an ingest activity produced: batch size and time, images, outcomes."""
    if name == ENCODE_BATCH:
        objects = getattr(args[0], "objects", []) if args else []
        metrics.encode_batch(len(objects), seconds)
        outcomes = list(result or [])
        metrics.images_encoded(sum(1 for o in outcomes if getattr(o, "status", "") == "ingested"))
    elif name == SCAN_PAGE:
        outcomes = [*getattr(result, "rejected", []), *getattr(result, "unchanged", [])]
    else:
        return
    for outcome in outcomes:
        metrics.asset_outcome(getattr(outcome, "status", ""), getattr(outcome, "reason", ""))


class OutcomeMetricsInterceptor(Interceptor):
    """Worker interceptor that feeds :mod:`activities.runtime.metrics` from ingest activity
    results."""

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _OutcomeMetricsInbound(next)


def worker_interceptors() -> list[Interceptor]:
    return [OutcomeMetricsInterceptor()] if metrics.enabled() else []


# -- tracing ------------------------------------------------------------------------------
def tracing_exporter(settings: Settings) -> str:
    name = settings.tracing_exporter.strip().lower() or "none"
    if name in ("off", "false", "0"):
        name = "none"
    if name not in TRACING_EXPORTERS:
        raise RuntimeError(
            f"MMRAG_TRACING_EXPORTER={settings.tracing_exporter!r}: choose one of "
            f"{', '.join(TRACING_EXPORTERS)}"
        )
    return name


def _span_exporter(settings: Settings, name: str) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(out=sys.stderr)  # stdout belongs to the CLI's output
    endpoint = settings.tracing_endpoint or None
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=endpoint)
    except ImportError:
        pass
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        return HttpExporter(endpoint=endpoint)
    except ImportError:
        raise RuntimeError(
            "MMRAG_TRACING_EXPORTER=otlp needs an OTLP exporter: pip install "
            "opentelemetry-exporter-otlp-proto-grpc (or -proto-http)"
        ) from None


def configure_tracing(settings: Settings, role: str = "client") -> bool:
    """Install the process-wide tracer provider once; False when tracing is off."""
    global _tracing_configured
    name = tracing_exporter(settings)
    if name == "none":
        return False
    with _tracing_lock:
        if _tracing_configured:
            return True
        try:
            from opentelemetry import trace
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError:
            raise RuntimeError(
                f"MMRAG_TRACING_EXPORTER={name} needs the OpenTelemetry SDK: "
                "pip install opentelemetry-sdk"
            ) from None
        provider = TracerProvider(
            resource=Resource.create(
                {"service.name": settings.tracing_service_name, "mmrag.role": role}
            )
        )
        provider.add_span_processor(BatchSpanProcessor(_span_exporter(settings, name)))
        trace.set_tracer_provider(provider)
        _tracing_configured = True
        log.info("tracing on: %s exporter, service %s", name, settings.tracing_service_name)
        return True


def tracing_interceptors(settings: Settings, role: str = "client") -> list[ClientInterceptor]:
    """``[TracingInterceptor()]`` when tracing is configured, else nothing."""
    if not configure_tracing(settings, role):
        return []
    from temporalio.contrib.opentelemetry import TracingInterceptor

    return [TracingInterceptor()]
