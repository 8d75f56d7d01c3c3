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

import pytest
from temporalio.client import Client

from activities.runtime import metrics
from settings import REPO_ROOT, Settings
from starters.ask import ask
from starters.ingest import start_ingest
from starters.synthetic_corpus import write_corpus
from tests.conftest import TEST_MAX_OBJECT_BYTES, ServerStack, Workers
from tests.helpers import milvus_pks, wait_searchable, write_bad_corpus
from tests.llm_server import LlmTestServer
from workers.telemetry import record_activity_result, tracing_exporter
from workflows.contracts import AskInput

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
    # mmrag's own series.
    assert grew("mmrag_images_encoded_total", 18) == 18
    grew("mmrag_assets_total", 18, status="ingested")
    grew("mmrag_assets_total", result.failed, status="failed")
    grew("mmrag_encode_batch_size_count")
    assert grew("mmrag_encode_batch_size_sum", 18) >= 18
    grew("mmrag_encode_seconds_count")
    assert grew("mmrag_assets_failed_total", result.failed) == result.failed
    for category in ("empty", "corrupt", "bomb", "too_large"):
        grew("mmrag_assets_failed_total", 1, reason=category)
    other = total(after, "mmrag_assets_failed_total", reason=metrics.OTHER)
    assert other == total(before, "mmrag_assets_failed_total", reason=metrics.OTHER), (
        f"a failure reason has no category: {[f.reason for f in result.failures]}"
    )
    for lab, _ in after["mmrag_assets_failed_total"]:
        assert lab["reason"] in {c for c, _ in metrics.FAILURE_CATEGORIES} | {metrics.OTHER}
    grew("mmrag_retrieval_seconds_count")
    grew("mmrag_llm_seconds_count")
    grew("mmrag_answers_total", kind="generated")
    assert "mmrag_degraded_answers_total" in after  # exported from the start, at zero
    assert [v for _, v in after["mmrag_llm_breaker_state"]] == [0.0]  # closed


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


def test_metric_calls_are_no_ops_when_metrics_are_off() -> None:
    metrics.configure(None)
    assert not metrics.enabled()
    metrics.images_encoded(3)
    metrics.observe("llm_seconds", 0.5)
    metrics.observe("no_such_histogram", 1.0)  # logged once, never raised
    metrics.breaker_state("open")
    metrics.answer("generated", degraded=True)
    record_activity_result("encode_batch", [], [], 0.1)


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
