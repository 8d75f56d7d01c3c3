"""Starters from other backends: the TypeScript program and the shell scripts, run for real.

The TypeScript starter is installed (`npm ci`) and compiled (`tsc`) here, then runs against
the test stack's Temporal server and worker processes, as a Node service would; the shell
starters run the `temporal` CLI the same way. Neither imports anything from this project:
workflow names, the task queue and JSON field names are all they share with it.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from activities.store.objects import normalize_uri
from settings import REPO_ROOT, Settings
from starters.ingest import batch_workflow_id
from starters.synthetic_corpus import write_corpus
from tests.conftest import ServerStack, Workers
from tests.helpers import issued_token, wait_searchable
from workflows import contracts
from workflows.contracts import IngestBatchInput

TS_DIR = REPO_ROOT / "starters" / "typescript"
SHELL_DIR = REPO_ROOT / "starters" / "shell"
VENV_BIN = Path(sys.executable).parent
CORPUS_IMAGES = 18  # write_corpus(per_class=1): one image of each of the 18 classes

# Dataclasses that never cross the public API (activity payloads, continuation state).
INTERNAL = {"ObjectRef", "IndexTarget", "IngestTotals"}
# Continuation state the workflows set for themselves; callers leave it out.
CONTINUATION = {
    "IngestBatchInput": {"cursor_source", "cursor_page_token", "totals"},
    "ReindexInput": {
        "target_version",
        "cursor",
        "done",
        "failed",
        "total",
        "phase",
        "embedded",
        "failures",
        "still_failing",
    },
    "WatchPrefixInput": {"passes"},
}


def _run(cmd: list[str], timeout: float, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def ts_starter() -> Path:
    """`npm ci` + `tsc`: the compiled starter. Fails (never skips) without Node.js."""
    npm, node = shutil.which("npm"), shutil.which("node")
    if not (npm and node):
        pytest.fail(
            "the TypeScript starter test needs Node.js >= 18 and npm on PATH "
            f"(node: {node}, npm: {npm}); install them, the test does not skip"
        )
    install = ["ci"] if (TS_DIR / "package-lock.json").exists() else ["install"]
    _run([npm, *install, "--no-audit", "--no-fund", "--loglevel=error"], 300, cwd=TS_DIR)
    _run([npm, "run", "--silent", "build"], 120, cwd=TS_DIR)
    main = TS_DIR / "build" / "main.js"
    assert main.exists(), "tsc wrote no build/main.js"
    return main


def _temporal_env(test_stack: ServerStack, tenant: str) -> dict[str, str]:
    """A caller's environment, as another backend has it: the Temporal connection and a
    writer credential for its tenant (MMRAG_AUTH_TOKEN, as `mmrag token issue` prints it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TEMPORAL_", "MMRAG_"))}
    env["TEMPORAL_ADDRESS"] = test_stack.endpoints["temporal_address"]
    env["TEMPORAL_NAMESPACE"] = "default"
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # the `temporal` CLI
    env["MMRAG_AUTH_TOKEN"] = issued_token([tenant], "writer")
    return env


def _payload_text(history_json: str) -> str:
    """A history as `temporal workflow show -o json` prints it, with every base64 field
    (payload data and metadata) decoded, so plaintext is found however it is wrapped."""
    decoded = []
    for value in re.findall(r'"([A-Za-z0-9+/]{8,}={0,2})"', history_json):
        try:
            decoded.append(base64.b64decode(value, validate=True).decode("utf-8", "replace"))
        except ValueError:
            continue
    return history_json + "\n" + "\n".join(decoded)


def _top_file(ask_result: dict[str, Any]) -> str:
    sources = ask_result["sources"]
    assert sources, f"no sources: {ask_result}"
    return Path(sources[0]["uri"]).name


# -- the TypeScript contract mirror ---------------------------------------------------------
def _ts_interfaces() -> tuple[dict[str, dict[str, tuple[bool, str]]], dict[str, str]]:
    """interface -> field -> (optional, type) and exported constants, from contracts.ts."""
    text = (TS_DIR / "src" / "contracts.ts").read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    string_aliases = {
        name
        for name, body in re.findall(r"export type (\w+) =([^;]+);", text)
        if all(re.fullmatch(r"\s*'[^']*'\s*", part) for part in body.split("|"))
    }

    def norm(ts_type: str) -> str:
        ts_type = re.sub(r"\s+", "", ts_type)
        if ts_type in string_aliases or re.fullmatch(r"'[^']*'(\|'[^']*')*", ts_type):
            return "string"
        return ts_type

    interfaces = {
        name: {f: (bool(opt), norm(t)) for f, opt, t in re.findall(r"(\w+)(\?)?:([^;]+);", body)}
        for name, body in re.findall(r"export interface (\w+) \{(.*?)\}\n", text, flags=re.S)
    }
    consts = dict(re.findall(r"export const (\w+) = '?([^';]*)'?;", text))
    return interfaces, consts


def _annotation(py_type: object) -> str:
    """A dataclass field's type as written (``list[Source]``), whether it is a string or,
    as in ``workflows.contracts``, the evaluated type."""
    if isinstance(py_type, str):
        return py_type
    if isinstance(py_type, type) and not getattr(py_type, "__args__", None):
        return py_type.__name__
    return re.sub(r"\b[\w.]+\.(\w+)", r"\1", str(py_type))


def _ts_type(py_type: str) -> str:
    py_type = py_type.replace(" ", "")
    if m := re.fullmatch(r"list\[(.+)\]", py_type):
        return _ts_type(m[1]) + "[]"
    if m := re.fullmatch(r"dict\[str,(.+)\]", py_type):
        return f"Record<string,{_ts_type(m[1])}>"
    return {"str": "string", "int": "number", "float": "number", "bool": "boolean"}.get(
        py_type, py_type
    )


def test_typescript_types_mirror_the_python_contracts() -> None:
    interfaces, consts = _ts_interfaces()
    public = {
        name: cls
        for name, cls in vars(contracts).items()
        if dataclasses.is_dataclass(cls) and cls.__module__ == contracts.__name__
    }
    assert set(public) - INTERNAL == set(interfaces), "contracts.ts: one interface per contract"
    for name, ts_fields in interfaces.items():
        py_fields = {
            f.name: f
            for f in dataclasses.fields(public[name])
            if f.name not in CONTINUATION.get(name, set())
        }
        assert set(ts_fields) == set(py_fields), f"{name}: fields differ"
        is_input = name.endswith(("Input", "Filters"))
        for field_name, (optional, ts_type) in ts_fields.items():
            f = py_fields[field_name]
            has_default = (
                f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            )
            # Inputs: what has a default may be left out. Outputs: the worker sends it all.
            assert optional == (is_input and has_default), f"{name}.{field_name} optionality"
            assert ts_type == _ts_type(_annotation(f.type)), f"{name}.{field_name}: {ts_type}"
    for const, value in vars(contracts).items():
        if const.endswith(("_WORKFLOW", "TASK_QUEUE")) or const == "CONTRACT_VERSION":
            assert consts.get(const) == str(value), f"contracts.ts {const}"


def test_typescript_workflow_ids_match_the_python_starter(ts_starter: Path, tmp_path: Path) -> None:
    """The same ingest started from TypeScript and from Python gets one id (and one run)."""
    tags = {"team": "ops", "quote": 'say "hi"', "accent": "café ☕", "zz": "", "a": "b=c"}
    argv = ["node", str(ts_starter), "--tenant", "acme", "--dry-run", "--force"]
    argv += ["--source", str(tmp_path), "--source", "gs://bucket/pre fix/"]
    argv += [arg for k, v in tags.items() for arg in ("--tag", f"{k}={v}")]
    plan = json.loads(_run(argv, 30).stdout)
    expected = IngestBatchInput(
        tenant="acme",
        sources=[normalize_uri(str(tmp_path)), "gs://bucket/pre fix/"],
        tags=tags,
        force=True,
    )
    assert plan["ingest"]["input"]["sources"] == expected.sources
    assert plan["ingest"]["workflow_id"] == batch_workflow_id(expected)
    assert plan["ask"] is None


# -- against the real servers -----------------------------------------------------------------
def test_typescript_starter_ingests_then_asks(
    ts_starter: Path, worker: Workers, test_stack: ServerStack, tenant: str, tmp_path: Path
) -> None:
    write_corpus(tmp_path / "corpus", per_class=1, seed=21)
    env = _temporal_env(test_stack, tenant)
    node = ["node", str(ts_starter), "--tenant", tenant, "--timeout-s", "120"]

    first = json.loads(_run([*node, "--source", str(tmp_path / "corpus")], 150, env=env).stdout)
    result = first["ingest"]["result"]
    assert first["ingest"]["workflow_id"].startswith(f"ingest-batch/{tenant}/")
    assert (result["tenant"], result["seen"], result["ingested"]) == (tenant, 18, 18)
    assert (result["failed"], result["vectors"], result["failures"]) == (0, 18, [])
    assert first["ask"] is None

    wait_searchable(tenant, CORPUS_IMAGES)
    question = "a red circle on a white background"
    asked = _run([*node, "--question", question, "--no-generate", "--top-k", "3"], 60, env=env)
    answer = json.loads(asked.stdout)["ask"]["result"]
    assert _top_file(answer).startswith("red-circle-"), answer["sources"]
    assert answer["answer_kind"] == "extractive" and len(answer["sources"]) == 3
    assert answer["latency_ms"] > 0 and not answer["degraded"]

    # Both at once, again: same id, nothing new to encode.
    again = json.loads(
        _run(
            [*node, "--source", str(tmp_path / "corpus"), "--question", question, "--no-generate"],
            150,
            env=env,
        ).stdout
    )
    assert again["ingest"]["workflow_id"] == first["ingest"]["workflow_id"]
    assert (again["ingest"]["result"]["unchanged"], again["ingest"]["result"]["ingested"]) == (
        18,
        0,
    )
    assert _top_file(again["ask"]["result"]).startswith("red-circle-")


def test_typescript_starter_encrypts_through_the_codec_server(
    ts_starter: Path, test_stack: ServerStack, tenant: str, tmp_path: Path
) -> None:
    """Payload encryption on: the starter's inputs and results pass `mmrag codec-server`
    (TEMPORAL_CODEC_ENDPOINT / TEMPORAL_CODEC_AUTH, as for the CLI); the server's history
    holds no plaintext. Own namespace and worker, so the shared plaintext workers never
    see a payload they cannot read."""
    from starters.codec_server import CodecServerConfig, make_server
    from tests.test_compose import run_setup_job

    namespace = f"enc-{uuid.uuid4().hex[:8]}"
    run_setup_job(test_stack.endpoints["temporal_address"], namespace)
    key = base64.b64encode(os.urandom(32)).decode()
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        codec_key=key,
        codec_key_id="ts-test",
        codec_server_token="codec-token",
        codec_server_namespaces=namespace,  # X-Namespace is always checked
    )
    server = make_server(CodecServerConfig.from_settings(settings), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    worker = test_stack.start_worker(
        "all", TEMPORAL_NAMESPACE=namespace, MMRAG_CODEC_KEY=key, MMRAG_CODEC_KEY_ID="ts-test"
    )
    try:
        write_corpus(tmp_path / "secret-corpus", per_class=1, seed=23)
        env = _temporal_env(test_stack, tenant) | {"TEMPORAL_NAMESPACE": namespace}
        env["TEMPORAL_CODEC_ENDPOINT"] = f"http://127.0.0.1:{server.server_address[1]}"
        env["TEMPORAL_CODEC_AUTH"] = "Bearer codec-token"
        node = ["node", str(ts_starter), "--tenant", tenant, "--timeout-s", "120"]
        out = json.loads(
            _run([*node, "--source", str(tmp_path / "secret-corpus")], 150, env=env).stdout
        )
        assert (out["ingest"]["result"]["ingested"], out["ingest"]["result"]["failed"]) == (18, 0)
        wait_searchable(tenant, CORPUS_IMAGES)
        question = "a green triangle on a white background"
        asked = json.loads(
            _run([*node, "--question", question, "--no-generate"], 60, env=env).stdout
        )
        assert _top_file(asked["ask"]["result"]).startswith("green-triangle-")

        # The Ask's history: its question and answer are payloads only (no search attribute).
        show = [str(VENV_BIN / "temporal"), "workflow", "show", "--output", "json"]
        show += ["--workflow-id", asked["ask"]["workflow_id"]]
        plain_env = {k: v for k, v in env.items() if not k.startswith("TEMPORAL_CODEC")}
        stored = _payload_text(_run(show, 30, env=plain_env).stdout)
        assert "green triangle" not in stored and "green-triangle-" not in stored
        assert "binary/encrypted" in stored  # the encoding, in each payload's metadata
        decoded = _payload_text(_run(show, 30, env=env).stdout)  # the CLI via the codec server
        assert "green triangle" in decoded and "green-triangle-" in decoded

        # The shell starter, through the same codec server (the CLI's --codec-endpoint).
        ask_sh = [str(SHELL_DIR / "ask.sh"), "--tenant", tenant, "--no-generate", question]
        assert _top_file(json.loads(_run(ask_sh, 60, env=env).stdout)).startswith("green-triangle-")
        refused_sh = subprocess.run(
            ask_sh, capture_output=True, text=True, timeout=60, env=plain_env
        )
        assert refused_sh.returncode != 0 and "TEMPORAL_CODEC_ENDPOINT" in refused_sh.stderr

        env["TEMPORAL_CODEC_AUTH"] = "Bearer wrong"
        refused = subprocess.run(
            [*node, "--question", question], capture_output=True, text=True, timeout=60, env=env
        )
        assert refused.returncode != 0 and "HTTP 401" in refused.stderr, refused.stderr
    finally:
        worker.stop(timeout=10)
        server.shutdown()
        server.server_close()


def test_typescript_starter_says_why_it_cannot_connect(ts_starter: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TEMPORAL_", "MMRAG_"))}
    env["TEMPORAL_ADDRESS"] = "127.0.0.1:9"  # discard port: nothing listens
    argv = ["node", str(ts_starter), "--tenant", "t", "--question", "q", "--connect-timeout-s", "1"]
    # No credential: said before connecting, naming the variable and how to get one.
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2, done.stderr
    assert "set MMRAG_AUTH_TOKEN" in done.stderr and "mmrag token issue" in done.stderr
    env["MMRAG_AUTH_TOKEN"] = "any-token"  # checked by the workers, never reached here
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2, done.stderr
    assert "cannot reach Temporal at 127.0.0.1:9" in done.stderr


def test_shell_starters_ingest_then_ask(
    worker: Workers, test_stack: ServerStack, tenant: str, tmp_path: Path
) -> None:
    write_corpus(tmp_path / "corpus", per_class=1, seed=22)
    env = _temporal_env(test_stack, tenant)
    ingest = [str(SHELL_DIR / "ingest.sh"), "--tenant", tenant, "--tag", "via=shell"]
    # A relative path: the script makes it absolute, as the workers need.
    out = _run([*ingest, "corpus"], 150, env=env, cwd=tmp_path)
    result = json.loads(out.stdout)
    assert (result["tenant"], result["ingested"], result["failed"], result["vectors"]) == (
        tenant,
        18,
        0,
        18,
    )

    wait_searchable(tenant, CORPUS_IMAGES)
    ask = [str(SHELL_DIR / "ask.sh"), "--tenant", tenant, "--no-generate", "--top-k", "2"]
    answer = json.loads(
        _run(
            [*ask, "--filter-tag", "via=shell", "a blue square on a white background"], 60, env=env
        ).stdout
    )
    assert _top_file(answer).startswith("blue-square-"), answer["sources"]
    assert answer["answer_kind"] == "extractive" and len(answer["sources"]) == 2

    # A filter that matches nothing: structured, so no sources (and no error).
    none = json.loads(
        _run([*ask, "--filter-tag", "via=elsewhere", "a blue square"], 60, env=env).stdout
    )
    assert none["sources"] == [] and none["answer_kind"] == "none"


def test_shell_starters_refuse_bad_usage(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MMRAG_AUTH_TOKEN"}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    cases = [
        ([str(SHELL_DIR / "ingest.sh"), "corpus"], "--tenant is required"),
        ([str(SHELL_DIR / "ingest.sh"), "--tenant", "t"], "at least one SOURCE"),
        ([str(SHELL_DIR / "ingest.sh"), "--tenant", "t", "--tag", "x", "d"], "KEY=VALUE"),
        ([str(SHELL_DIR / "ingest.sh"), "--tenant", "t", "s3://b/k"], "unsupported URI"),
        ([str(SHELL_DIR / "ask.sh"), "--tenant", "t"], "QUESTION"),
        ([str(SHELL_DIR / "ask.sh"), "--tenant", "t", "--top-k", "x", "q"], "whole number"),
        ([str(SHELL_DIR / "ask.sh"), "--tenant", "t", "q"], "set MMRAG_AUTH_TOKEN"),
        ([str(SHELL_DIR / "ingest.sh"), "--tenant", "t", "d"], "set MMRAG_AUTH_TOKEN"),
    ]
    for argv, message in cases:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, env=env)
        assert done.returncode == 2 and message in done.stderr, (argv, done.stderr)
