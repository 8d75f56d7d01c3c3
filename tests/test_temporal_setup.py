"""``mmrag temporal setup`` registers the search attributes on a namespace that lacks them.

A fresh namespace on the test stack's Temporal server stands in for a production cluster:
the command runs as a subprocess with the same TEMPORAL_* configuration a user would set.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

from google.protobuf.duration_pb2 import Duration
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.api.workflowservice.v1 import RegisterNamespaceRequest
from temporalio.client import Client

from settings import REPO_ROOT
from starters.ingest import start_ingest
from starters.synthetic_corpus import write_corpus
from starters.temporal_setup import tcld_command
from tests.conftest import ServerStack, Workers
from workers.search_attributes import indexed_value_type, register_search_attributes, type_name
from workflows.contracts import SEARCH_ATTRIBUTES


def setup_cli(
    test_stack: ServerStack, namespace: str, *extra: str
) -> subprocess.CompletedProcess[str]:  # noqa: E501
    env = {**test_stack.env, "TEMPORAL_NAMESPACE": namespace}
    return subprocess.run(
        [sys.executable, "-m", "starters.temporal_setup", "setup", *extra],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_setup_registers_missing_attributes_idempotently(
    test_stack: ServerStack, client: Client
) -> None:
    namespace = f"prod-like-{uuid.uuid4().hex[:6]}"
    await client.workflow_service.register_namespace(
        RegisterNamespaceRequest(
            namespace=namespace, workflow_execution_retention_period=Duration(seconds=86400)
        )
    )
    dry = setup_cli(test_stack, namespace, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count("missing") == len(SEARCH_ATTRIBUTES)

    first = setup_cli(test_stack, namespace)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("added") == len(SEARCH_ATTRIBUTES)
    listed = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=namespace)
    )
    for name, kind in SEARCH_ATTRIBUTES.items():
        assert listed.custom_attributes[name] == indexed_value_type(kind)

    again = setup_cli(test_stack, namespace)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("present") == len(SEARCH_ATTRIBUTES)
    assert "added" not in again.stdout

    # An attribute of the same name but another type is reported, not "fixed".
    clash = await register_search_attributes(client, namespace, {"MmragTenant": "Int"})
    assert not clash.ok and "exists as Keyword, mmrag needs Int" in clash.conflicts["MmragTenant"]


def test_type_names_round_trip_and_the_cloud_hint() -> None:
    for kind in ("Keyword", "Int", "KeywordList", "Datetime", "Text", "Bool", "Double"):
        assert type_name(indexed_value_type(kind)) == kind
    command = tcld_command("acme.a1b2c")
    assert command.startswith("tcld namespace search-attributes add --namespace acme.a1b2c")
    assert all(f"{n}={k}" in command for n, k in SEARCH_ATTRIBUTES.items())


def documented_queries() -> list[str]:
    """The ``temporal workflow list|count --query "…"`` lines of the operator docs."""
    for doc in (REPO_ROOT / "docs" / "operations.md",):
        if doc.exists() and "workflow list --query" in doc.read_text():
            text = doc.read_text()
            return re.findall(r'^temporal workflow (?:list|count) --query "(.+)"$', text, re.M)
    raise AssertionError("no documented operator queries found")


def temporal_cli(test_stack: ServerStack, *args: str) -> subprocess.CompletedProcess[str]:
    address = test_stack.endpoints["temporal_address"]
    return subprocess.run(
        [str(REPO_ROOT / ".venv" / "bin" / "temporal"), *args, "--address", address]
        + ["--namespace", "default", "--disable-config-env", "--disable-config-file"],
        capture_output=True,
        text=True,
        timeout=30,
    )


async def test_documented_operator_queries_find_the_runs(
    test_stack: ServerStack, worker: Workers, client: Client, tenant: str, tmp_path: Path
) -> None:
    """Every query the docs give operators runs on the server; "failed ingests of tenant X
    today" finds an ingest in which an object failed."""
    write_corpus(tmp_path / "c", per_class=1, seed=3)
    (tmp_path / "c" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    handle = await start_ingest(client, tenant, [str(tmp_path / "c")], batch_size=18)
    assert (await asyncio.wait_for(handle.result(), timeout=120)).failed == 1
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    queries = [
        q.replace("'acme'", f"'{tenant}'").replace("$(date -u +%F)", today)
        for q in documented_queries()
    ]
    assert len(queries) >= 5
    for query in queries:
        out = temporal_cli(test_stack, "workflow", "list", "--query", query, "--limit", "5")
        assert out.returncode == 0, f"{query}: {out.stderr}"
    failed_ingests = next(q for q in queries if "IN ('IngestBatch'" in q and tenant in q)
    for _ in range(40):  # visibility is eventually consistent
        out = temporal_cli(test_stack, "workflow", "list", "--query", failed_ingests)
        if handle.id in out.stdout:
            break
        await asyncio.sleep(0.25)
    assert handle.id in out.stdout, f"{failed_ingests!r} missed {handle.id}: {out.stderr}"
