"""What a new user (or another backend) meets when an input is wrong: the run fails at once,
non-retryably, with one line naming what to fix; it never stays Running, failing its
workflow task or retrying a step for ever (issue 18).

Through the `temporal` CLI and the `mmrag` CLI against the real stack and shared workers.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError

from starters.synthetic_corpus import write_corpus
from tests.conftest import ServerStack, Workers
from tests.helpers import (
    collection,
    grant_root,
    operator_token,
    png_bytes,
    registry_rows,
    store,
    temporal_cli_execute,
    wait_searchable,
)
from tests.test_cli import mmrag


async def failed_with(client: Client, workflow_id: str) -> str:
    """The message a finished run failed with (it must have failed, not be running)."""
    handle = client.get_workflow_handle(workflow_id)
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()
    assert (await handle.describe()).status == WorkflowExecutionStatus.FAILED
    cause = failure.value.cause
    return f"{getattr(cause, 'type', '')}: {cause}"


@pytest.mark.parametrize(
    ("workflow_type", "payload", "names"),
    [
        ("Ask", {"text": "a red circle", "top_k": "five"}, "field AskInput.top_k"),
        (
            "Ask",
            {"text": "x", "filters": {"created_after": "yesterday"}},
            "field AskInput.filters.created_after",
        ),
        ("IngestBatch", {"sources": "gs://bucket/prefix/"}, "field IngestBatchInput.sources"),
        ("Reindex", {"mode": "incremental", "batch_size": "big"}, "ReindexInput.batch_size"),
    ],
)
async def test_a_mistyped_input_fails_the_run_at_once_naming_the_field(
    worker: Workers,
    test_stack: ServerStack,
    client: Client,
    tenant: str,
    workflow_type: str,
    payload: dict[str, object],
    names: str,
) -> None:
    """`temporal workflow execute --input '{"top_k": "five"}'` returns (the run does not hang
    in a workflow-task retry loop); the run is Failed with a BadInput naming the field."""
    workflow_id = f"mistyped-{uuid.uuid4().hex[:8]}"
    out = temporal_cli_execute(
        test_stack.endpoints["temporal_address"],
        workflow_type,
        {"tenant": tenant, **payload} if workflow_type != "Reindex" else payload,
        workflow_id,
        operator_token(),
    )
    assert out.returncode != 0, out.stdout
    message = await failed_with(client, workflow_id)
    assert message.startswith("BadInput: ") and names in message, message
    assert "fix it and start the run again" in message


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        ({"top_k": 0}, "top_k=0: ask for 1 or more sources"),
        ({"top_k": -3}, "top_k=-3: ask for 1 or more sources"),
        (
            {"filters": {"media_types": ["image/jpg"]}},
            "'image/jpg' is not a type mmrag indexes; use one of image/jpeg, image/png",
        ),
    ],
)
async def test_an_ask_the_workers_would_change_is_refused(
    worker: Workers,
    test_stack: ServerStack,
    client: Client,
    tenant: str,
    payload: dict[str, object],
    says: str,
) -> None:
    """``top_k`` 0 is not quietly raised to 1, and ``image/jpg`` (the sniffer says
    ``image/jpeg``) does not quietly match nothing: both are refused, naming the fix."""
    workflow_id = f"refused-{uuid.uuid4().hex[:8]}"
    out = temporal_cli_execute(
        test_stack.endpoints["temporal_address"],
        "Ask",
        {"tenant": tenant, "text": "a red circle", **payload},
        workflow_id,
        operator_token(),
    )
    assert out.returncode != 0, out.stdout
    message = await failed_with(client, workflow_id)
    assert message.startswith("BadQuery: ") and says in message, message


def test_the_workflow_media_types_are_the_sniffers_types() -> None:
    """workflows/contracts.py MEDIA_TYPES (what an Ask may filter on) is every type the
    ingest can give an asset, AVIF included whether or not this Pillow decodes it."""
    from activities.media import formats
    from workflows.contracts import MEDIA_TYPES

    assert set(MEDIA_TYPES) == set(formats.SUPPORTED_TYPES) | {formats.AVIF}


# -- through the mmrag CLI -----------------------------------------------------------------
def test_a_tag_change_on_reingest_is_searchable(
    test_stack: ServerStack, worker: Workers, tmp_path: Path
) -> None:
    """Ingested with team=ops, then again, unchanged, with team=sales: the objects are
    retagged without encoding (registry and vectors), and ``--filter tag.team=sales`` finds
    them while ``tag.team=ops`` no longer does."""
    folder = tmp_path / "tagged"
    write_corpus(folder, per_class=1, seed=23)
    tenant = f"retag-{uuid.uuid4().hex[:6]}"
    env = test_stack.env
    first = mmrag(env, "ingest", str(folder), "--tenant", tenant, "--tag", "team=ops", "--wait")
    assert first.returncode == 0, first.stderr
    wait_searchable(tenant, 18)
    again = mmrag(
        env, "ingest", str(folder), "--tenant", tenant, "--tag", "team=sales", "--wait", "--json"
    )
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    assert (result["retagged"], result["ingested"], result["unchanged"]) == (18, 0, 0)
    assert result["vectors"] == 0  # nothing encoded
    assert {tuple(r.tags.items()) for r in registry_rows(tenant)} == {(("team", "sales"),)}
    rows = store().client.query(
        collection(),
        filter=f"tenant == {json.dumps(tenant)}",
        output_fields=["pk", "tags"],
        consistency_level="Strong",
        limit=100,
    )
    assert len(rows) == 18 and {tuple(r["tags"]) for r in rows} == {("team=sales",)}, rows
    human = mmrag(env, "ingest", str(folder), "--tenant", tenant, "--tag", "team=sales", "--wait")
    assert "18 unchanged" in human.stdout and "retagged" not in human.stdout

    def found(tag: str) -> list[str]:
        out = mmrag(env, "ask", "a red circle", "--tenant", tenant, "--filter", f"tag.{tag}",
                    "--no-generate", "--json")  # fmt: skip
        assert out.returncode == 0, out.stderr
        return [s["uri"] for s in json.loads(out.stdout)["sources"]]

    for _ in range(30):  # Asks read with Bounded consistency: a few seconds behind
        if found("team=sales") and not found("team=ops"):
            break
        time.sleep(1)
    assert found("team=sales") and found("team=ops") == []


def test_an_unsupported_file_fails_a_reindex_once_per_change(
    test_stack: ServerStack, worker: Workers, tmp_path: Path
) -> None:
    """A file that failed on its bytes is retried by the next incremental re-index only
    when it changed: then it is a new failure (exit 1, listed with its reason); the run
    after lists it as still failing and succeeds."""
    folder = tmp_path / "with-broken"
    write_corpus(folder, per_class=1, seed=29)
    broken = folder / "notes.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot a picture")
    tenant = f"broken-{uuid.uuid4().hex[:6]}"
    env = test_stack.env
    assert mmrag(env, "ingest", str(folder), "--tenant", tenant, "--wait").returncode == 1
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot a picture either")  # a new generation

    def reindex() -> subprocess.CompletedProcess[str]:
        return mmrag(env, "reindex", "incremental", "--tenant", tenant, "--wait")

    changed = reindex()
    assert changed.returncode == 1, (changed.stdout, changed.stderr)
    assert "1 failed" in changed.stdout and f"{broken}" in changed.stdout
    assert "corrupt or truncated" in changed.stdout
    same = reindex()
    assert same.returncode == 0, (same.stdout, same.stderr)
    assert "0 failed" in same.stdout and "1 still failing" in same.stdout
    assert f"{broken}" in same.stdout and "corrupt or truncated" in same.stdout


def verbs_with(option: str) -> set[str]:
    """The `mmrag` verbs whose parser has ``option``."""
    import argparse

    from starters.cli import build_parser

    (verbs,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return {name for name, p in verbs.choices.items() if option in p._option_string_actions}


def test_json_prints_only_json_on_every_command_that_has_it(
    test_stack: ServerStack, worker: Workers, tmp_path: Path
) -> None:
    """Every verb with ``--json`` (a new one must be added here) prints one JSON document
    on stdout and nothing else (status lines go to stderr), so ``| jq`` works."""
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "red.png").write_bytes(png_bytes(colour=(255, 0, 0)))
    tenant = f"json-{uuid.uuid4().hex[:6]}"
    runs = {
        "ingest": [str(folder), "--tenant", tenant, "--wait", "--json"],
        "ask": ["a red square", "--tenant", tenant, "--no-generate", "--json"],
    }
    assert verbs_with("--json") == set(runs)
    for verb, args in runs.items():
        out = mmrag(test_stack.env, verb, *args)
        assert out.returncode == 0, (verb, out.stdout, out.stderr)
        assert isinstance(json.loads(out.stdout), dict), verb  # nothing else on stdout


def test_reindex_flags_that_need_another_mode_say_so(test_stack: ServerStack) -> None:
    """A flag the chosen mode would ignore is one line naming what it needs, exit 2."""
    env = test_stack.env
    cases = {
        ("reindex", "incremental", "--model", "ViT-B-32"): "need `full`",
        ("reindex", "full", "--tenant", "acme"): "drop --tenant",
        ("reindex", "full", "--pretrained", "laion2b_s34b_b79k"): "add --model",
        ("schedule", "create", "--kind", "full", "--tenant", "acme"): "drop --tenant",
    }
    for args, says in cases.items():
        out = mmrag(env, *args)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1, (args, out.stderr)
        assert lines[0].startswith("error: ") and says in lines[0], (args, lines)


def test_a_missing_bucket_fails_its_source_in_one_line(
    test_stack: ServerStack, worker: Workers
) -> None:
    """A bucket that does not exist (the GCS emulator answers 404): no retries, the source
    fails alone with the reason, and the command exits 1."""
    tenant = f"nobucket-{uuid.uuid4().hex[:6]}"
    uri = f"gs://mmrag-missing-{uuid.uuid4().hex[:8]}/photos/"
    grant_root(test_stack.state_dir, tenant, uri)  # the tenant may read it; it is not there
    out = mmrag(test_stack.env, "ingest", uri, "--tenant", tenant, "--wait")
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    assert f"{uri}: no such bucket" in out.stdout


def test_storage_errors_no_retry_fixes_are_named() -> None:
    """What scan_page raises non-retryably (or fails the source with) for each Google error
    no retry can fix, one line naming what to set; an outage stays retryable (None)."""
    from google.api_core import exceptions as api
    from google.auth import exceptions as auth

    from activities.ingest import storage_refusal

    source = "gs://bucket/prefix/"
    cases = {
        auth.DefaultCredentialsError("Your default credentials were not found.\nTo set up"): (
            "MissingCredentials",
            "GOOGLE_APPLICATION_CREDENTIALS",
        ),
        api.Forbidden("caller does not have storage.objects.list access"): (
            "PermissionRefused",
            "storage.objects.list",
        ),
        api.NotFound("The specified bucket does not exist."): ("NoSuchBucket", "no such bucket"),
        api.BadRequest("Invalid bucket name"): ("BadSource", "not a valid bucket"),
    }
    for error, (kind, says) in cases.items():
        refusal = storage_refusal(source, error)
        assert refusal is not None and refusal.kind == kind, error
        assert says in refusal.say and "\n" not in refusal.say and refusal.say.startswith(source)
    assert storage_refusal(source, api.ServiceUnavailable("try again")) is None
    assert storage_refusal(source, ConnectionError("reset")) is None
