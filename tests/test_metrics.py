"""Metrics and traces from real worker processes.

Every worker the test stack starts serves Prometheus on its own loopback port
(``MMRAG_METRICS_PORT``, see conftest). After an ingest and an Ask the endpoints must
serve the Temporal SDK's series and every mmrag series the operator dashboards use.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import urllib.request
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client, WorkflowHandle

from activities.runtime import metrics
from settings import REPO_ROOT, Settings
from starters.ask import ask
from starters.ingest import start_ingest
from starters.synthetic_corpus import write_corpus
from tests.conftest import TEST_MAX_OBJECT_BYTES, ServerStack, Workers, free_port
from tests.helpers import milvus_pks, wait_searchable, write_bad_corpus
from tests.llm_server import LlmTestServer
from workers.telemetry import record_activity_result, tracing_exporter, worker_runtime
from workflows.activities.ingest import ENCODE_BATCH, EncodeBatchInput
from workflows.contracts import AskInput, AssetOutcome, IndexTarget, ObjectRef

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def parse(text: str) -> Samples:
    samples: Samples = defaultdict(list)
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and not line.startswith("#"):
            labels = dict(_LABEL.findall(m.group(2) or ""))
            samples[m.group(1)].append((labels, float(m.group(3))))
    return samples


def scrape_workers(test_stack: ServerStack) -> Samples:
    """All live workers' samples together (the shared queues spread work over them)."""
    merged: Samples = defaultdict(list)
    for w in test_stack.workers:
        port = test_stack.metrics_ports.get(w.proc.pid)
        if port and w.alive():
            for name, values in parse(scrape(port)).items():
                merged[name].extend(values)
    return merged


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for lab, v in samples.get(name, []) if labels.items() <= lab.items())


async def test_metrics_endpoint_serves_sdk_and_mmrag_series_after_ingest_and_ask(
    test_stack: ServerStack,
    worker: Workers,
    client: Client,
    llm: LlmTestServer,
    tenant: str,
    tmp_path: Path,
) -> None:
    llm.set_mode("ok")
    before = scrape_workers(test_stack)
    write_corpus(tmp_path / "c", per_class=1, seed=12)
    write_bad_corpus(tmp_path / "c", oversized_bytes=TEST_MAX_OBJECT_BYTES)
    handle = await start_ingest(client, tenant, [str(tmp_path / "c")], batch_size=8)
    result = await asyncio.wait_for(handle.result(), timeout=180)
    assert result.ingested == 18 and result.failed >= 5, result.failures
    wait_searchable(tenant, len(milvus_pks(tenant)))
    answer = await asyncio.wait_for(
        ask(client, AskInput(tenant=tenant, text=f"a red circle {uuid.uuid4().hex[:6]}")), 60
    )
    assert answer.answer_kind == "generated"
    after = scrape_workers(test_stack)

    def grew(name: str, by: float = 1, **labels: str) -> float:
        delta = total(after, name, **labels) - total(before, name, **labels)
        assert delta >= by, f"{name}{labels or ''} grew by {delta}, expected >= {by}"
        return delta

    # The Temporal SDK runtime's own series (names keep the SDK's temporal_ prefix).
    for sdk_series in (
        "temporal_activity_execution_latency_count",
        "temporal_workflow_completed",
        "temporal_request",
    ):
        assert sdk_series in after, f"SDK series {sdk_series} missing"
    assert {lab.get("mmrag_role") for lab, _ in after["temporal_request"]} >= {
        "cpu",
        "encode",
        "generate",
    }
    # mmrag's own series: exactly what this ingest and this Ask did.
    encodes = await encode_batches(handle)
    assert encodes >= 3  # 18 good objects in batches of 8, the bad ones among them
    assert grew("mmrag_images_encoded_total", 18) == 18
    assert grew("mmrag_assets_total", 18, status="ingested") == 18
    assert grew("mmrag_assets_total", result.failed, status="failed") == result.failed
    assert grew("mmrag_encode_batch_size_count", encodes) == encodes
    assert grew("mmrag_encode_seconds_count", encodes) == encodes
    grew("mmrag_clip_seconds_count", encodes)  # at least one forward pass per batch
    assert grew("mmrag_encode_batch_size_sum", 18) >= 18
    assert grew("mmrag_assets_failed_total", result.failed) == result.failed
    for category in ("empty", "corrupt", "bomb", "too_large"):
        grew("mmrag_assets_failed_total", 1, reason=category)
    other = total(after, "mmrag_assets_failed_total", reason=metrics.OTHER)
    assert other == total(before, "mmrag_assets_failed_total", reason=metrics.OTHER), (
        f"a failure reason has no category: {[f.reason for f in result.failures]}"
    )
    for lab, _ in after["mmrag_assets_failed_total"]:
        assert lab["reason"] in {c for c, _ in metrics.FAILURE_CATEGORIES} | {metrics.OTHER}
    # One Ask: one retrieval, one LLM call, one generated answer, nothing degraded.
    assert grew("mmrag_retrieval_seconds_count") == 1
    assert grew("mmrag_llm_seconds_count") == 1
    assert grew("mmrag_answers_total", kind="generated") == 1
    assert grew("mmrag_answers_total", by=0, kind="extractive") == 0
    assert grew("mmrag_degraded_answers_total", by=0) == 0
    assert [v for _, v in after["mmrag_llm_breaker_state"]] == [0.0]  # closed
    assert grew("temporal_workflow_completed", 2) >= 2  # the ingest and the Ask


async def encode_batches(handle: WorkflowHandle[Any, Any]) -> int:
    """How many encode_batch activities an ingest ran (each ran once: no faults here)."""
    history = await handle.fetch_history()
    scheduled = [
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in history.events
        if e.HasField("activity_task_scheduled_event_attributes")
    ]
    return scheduled.count(ENCODE_BATCH)


def test_failure_reasons_map_to_fixed_categories(tmp_path: Path) -> None:
    expected = {
        "empty file (0 bytes)": "empty",
        "file too large: 3 bytes exceeds the 2-byte limit (MMRAG_MAX_OBJECT_BYTES)": "too_large",
        "image dimensions 60000x60000 exceed the 4-pixel limit (decompression bomb guard)": "bomb",
        "unrecognised content: the bytes are not a JPEG, PNG": "unrecognised",
        "unsupported media type application/zip": "unsupported_type",
        "corrupt or truncated image: OSError: image file is truncated": "corrupt",
        "file:///x/a.png: no such file": "missing",
        "empty PDF: it has no pages": "empty",
        "too many pages: the PDF has 900 pages (page-bomb guard, MMRAG_PDF_MAX_PAGES)": "bomb",
        "video too long: it lasts 7200 s, the limit is 3600 s": "too_large",
        "decoding took longer than 600 s (MMRAG_DECODE_TIME_LIMIT_S)": "resource_limit",
        "video/mp4 needs more than 2048 MB to decode (MMRAG_DECODE_MEMORY_MB)": "resource_limit",
        "not an image: the bytes are unrecognised": "unrecognised",
        "no video stream: this video/mp4 file holds only audio": "unsupported_type",
        "corrupt PDF: page 3 cannot be loaded": "corrupt",
        "broken video stream at 1.200 s (EOF)": "corrupt",
        "malformed image/png: structure nested too deeply": "corrupt",
        "something nobody planned for at file:///secret/path.png": "other",
    }
    for reason, category in expected.items():
        assert metrics.failure_category(reason) == category, reason


def record_one_of_each() -> None:
    """One call of every recording entry point, as the workers make them."""
    metrics.images_encoded(3)
    metrics.asset_outcome("failed", "empty file (0 bytes)")
    metrics.observe("llm_seconds", 0.5)
    metrics.observe("no_such_histogram", 1.0)  # logged once, never raised
    metrics.breaker_state("open")
    metrics.answer("generated", degraded=True)
    objects = [ObjectRef(f"file:///x/{i}.png", "1", 10) for i in range(2)]
    outcomes = [AssetOutcome(o.uri, "a", "ingested") for o in objects]
    record_activity_result(ENCODE_BATCH, [EncodeBatchInput("t", TARGET, objects)], outcomes, 0.2)


TARGET = IndexTarget(1, "c", "m", "", 8)


def test_metric_calls_record_when_on_and_nothing_when_off() -> None:
    """Each call lands in its series with its value through a worker's metrics Runtime;
    once metrics are off (the CLI, benches, activities called directly) the same calls
    record nothing and never raise."""
    port = free_port()
    runtime = worker_runtime(Settings(metrics_port=port, metrics_host="127.0.0.1"), "test")
    assert runtime is not None and metrics.enabled()
    try:
        start = parse(scrape(port))
        assert total(start, "mmrag_images_encoded_total") == 0  # exported at zero from start
        record_one_of_each()
        on = parse(scrape(port))
        assert total(on, "mmrag_images_encoded_total", mmrag_role="test") == 3 + 2
        assert total(on, "mmrag_assets_total", status="failed") == 1
        assert total(on, "mmrag_assets_total", status="ingested") == 2
        assert total(on, "mmrag_assets_failed_total", reason="empty") == 1
        assert total(on, "mmrag_llm_seconds_count") == 1
        assert total(on, "mmrag_llm_seconds_sum") == 0.5
        assert total(on, "mmrag_llm_seconds_bucket", le="0.5") == 1
        assert total(on, "mmrag_llm_seconds_bucket", le="0.25") == 0
        assert total(on, "mmrag_encode_batch_size_sum") == 2
        assert total(on, "mmrag_encode_seconds_count") == 1
        assert total(on, "mmrag_llm_breaker_state") == 2  # open
        assert total(on, "mmrag_answers_total", kind="generated") == 1
        assert total(on, "mmrag_degraded_answers_total") == 1
        assert "no_such_histogram" not in scrape(port)

        metrics.configure(None)
        assert not metrics.enabled()
        record_one_of_each()
        assert parse(scrape(port)) == on  # nothing recorded
    finally:
        metrics.configure(None)


def test_tracing_exporter_setting_is_checked() -> None:
    assert tracing_exporter(Settings(tracing_exporter="")) == "none"
    assert tracing_exporter(Settings(tracing_exporter="Console")) == "console"
    with pytest.raises(RuntimeError, match="MMRAG_TRACING_EXPORTER"):
        tracing_exporter(Settings(tracing_exporter="jaeger"))


ASK_WITH_CONNECT = """
import sys
from starters.ask import ask
from workers.temporal_client import connect, run_client_command
from workflows.contracts import AskInput

async def main() -> None:
    client = await connect()
    result = await ask(client, AskInput(tenant=sys.argv[1], text="a red circle", generate=False))
    print(result.answer_kind)

run_client_command(main())
"""


def test_console_tracing_exports_client_spans(
    test_stack: ServerStack, worker: Workers, tenant: str
) -> None:
    """A client built by connect() with MMRAG_TRACING_EXPORTER=console prints its spans."""
    env = {**test_stack.env, "MMRAG_TRACING_EXPORTER": "console"}
    out = subprocess.run(
        [sys.executable, "-c", ASK_WITH_CONNECT, tenant],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert '"name": "StartWorkflow:Ask"' in out.stderr
    assert '"service.name": "mmrag"' in out.stderr
    assert "StartWorkflow" not in out.stdout  # spans go to stderr; stdout stays the output
