"""Outages behind `mmrag serve` (docs/web.md "When Temporal or Postgres is down").

The real Temporal dev server and the real Postgres are stopped under a running server (by
pid, with the stack helpers tests/test_faults.py uses) and started again. What a caller
relies on: every call that needs the missing server is a 503 with one line saying what is
down and what to do, answered well within the caller's timeout; calls that do not need it
are served meanwhile (the server's event loop is not held by the wait); an API key is never
accepted unchecked; and once the server is back, everything is served again without
restarting `mmrag serve`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ServerStack, WebServer, Workers, make_api_key
from tests.helpers import png_bytes

# The server's own bound on a Temporal call, and a key cache long enough that a key checked
# before an outage is still remembered during it (the default is 5 s; docs/web.md).
OUTAGE_ENV = {"MMRAG_WEB_TEMPORAL_TIMEOUT_S": "4", "MMRAG_WEB_KEY_CACHE_S": "600"}
# Far past the server's bound: a request the server held would fail here, not pass.
CLIENT_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def server(test_stack: ServerStack, worker: Workers) -> Iterator[WebServer]:
    """A server of this module's own (its settings above), beside the shared stack."""
    started = WebServer.start(test_stack, 60, **OUTAGE_ENV)
    try:
        yield started
    finally:
        started.stop()
    assert started.proc.returncode in (0, -15), started.log()[-3000:]


def request(server: WebServer, key: str, method: str, path: str, **kw: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.request(method, server.url + path, headers=headers, timeout=CLIENT_TIMEOUT_S, **kw)


def assert_unavailable(r: httpx.Response, says: str) -> None:
    """A 503 whose body is one JSON line naming what is down and what to do."""
    assert r.status_code == 503, (r.request.url, r.status_code, r.text[:300])
    body = r.json()
    assert list(body) == ["error"], body
    error = body["error"]
    assert says in error and "retry" in error and "\n" not in error, error
    assert int(r.headers["retry-after"]) > 0


def test_temporal_down_is_a_503_and_the_server_serves_again_when_it_is_back(
    server: WebServer, test_stack: ServerStack, tenant: str, tmp_path: Path
) -> None:
    key = make_api_key(tenant, "writer")
    for name in ("red.png", "blue.png"):
        (tmp_path / name).write_bytes(png_bytes((48, 48), (200, 20, 20)))
    ask = {"json": {"text": "a red square", "generate": False}}
    ingest = {"json": {"sources": [tmp_path.as_uri()]}}
    # An Ask first, so the server knows its queue: in the outage its start is what waits.
    warm = request(server, key, "POST", "/v1/ask", **ask)
    assert warm.status_code == 200, warm.text
    test_stack.stack.stop_service("temporal")
    try:
        with ThreadPoolExecutor(3) as pool:
            waiting = {
                "ask": pool.submit(request, server, key, "POST", "/v1/ask", **ask),
                "ingest": pool.submit(request, server, key, "POST", "/v1/ingest", **ingest),
                # A well-formed id: during the outage it is not "not found", it is unknown.
                "status": pool.submit(request, server, key, "GET", "/v1/ingest/" + "0" * 16),
            }
            # While those wait on Temporal, a call that needs no Temporal is served.
            assert request(server, key, "GET", "/v1/me").json()["tenant"] == tenant
            answers = {name: future.result() for name, future in waiting.items()}
    finally:
        test_stack.stack.start_service("temporal")
    for answer in answers.values():
        assert_unavailable(answer, "Temporal did not answer")
    assert "Temporal" in server.log()  # the operator's side of it

    # Back: the same server (never restarted) asks and ingests again.
    answered = request(server, key, "POST", "/v1/ask", **ask)
    assert answered.status_code == 200, answered.text
    assert answered.json()["answer_kind"] == "none"  # nothing ingested yet: answered
    started = request(server, key, "POST", "/v1/ingest", **ingest)
    assert started.status_code == 202, started.text
    status = f"/v1/ingest/{started.json()['id']}"
    deadline = time.monotonic() + 120
    while (seen := request(server, key, "GET", status).json())["status"] == "running":
        assert time.monotonic() < deadline, seen
        time.sleep(0.3)
    assert seen["status"] == "done" and seen["result"]["ingested"] == 2, seen
    assert server.proc.poll() is None


def test_postgres_down_refuses_unchecked_keys_and_the_registry_until_it_is_back(
    server: WebServer, test_stack: ServerStack, tenant: str
) -> None:
    checked = make_api_key(tenant, "reader")  # presented before the outage: remembered
    unchecked = make_api_key(tenant, "reader")  # a valid key, first presented during it
    forged = "mmrag_" + "ab" * 6 + "_" + "A" * 43  # shaped like a key, in no table
    assert request(server, checked, "GET", "/v1/me").status_code == 200
    assert request(server, checked, "GET", "/v1/assets").status_code == 200
    test_stack.stack.stop_service("postgres")
    try:
        # A key verified within MMRAG_WEB_KEY_CACHE_S is served from memory ...
        assert request(server, checked, "GET", "/v1/me").json()["tenant"] == tenant
        # ... but what needs the database is a 503, and so is every key not yet checked:
        # never accepted unchecked, never called unknown (401) without asking the table.
        assert_unavailable(request(server, checked, "GET", "/v1/assets"), "Postgres")
        for key in (unchecked, forged):
            assert_unavailable(request(server, key, "GET", "/v1/me"), "API key cannot be checked")
        # A key that is malformed needs no database to be refused.
        assert request(server, "not-a-key", "GET", "/v1/me").status_code == 401
    finally:
        test_stack.stack.start_service("postgres")
    # Back, without restarting the server: its pool reconnects.
    assert request(server, unchecked, "GET", "/v1/me").json()["tenant"] == tenant
    assert request(server, forged, "GET", "/v1/me").status_code == 401
    listed = request(server, checked, "GET", "/v1/assets")
    assert listed.status_code == 200 and listed.json()["assets"] == []
    assert server.proc.poll() is None
