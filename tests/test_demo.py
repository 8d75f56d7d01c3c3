"""`make demo` is the main job: it must answer with sources the first time and every time
after. Runs the real `mmrag demo` (its own embedded stack and worker, on free ports in a
temporary state directory, never the developer's), twice, then `mmrag stack down`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import pytest

from settings import REPO_ROOT
from stack.ports import ENV_PREFIX, StackPorts

MMRAG = str(REPO_ROOT / ".venv" / "bin" / "mmrag")


@pytest.fixture
def demo_env() -> Iterator[dict[str, str]]:
    # Not under pytest's tmp dir: the embedded Postgres (non-root) must reach it.
    state = Path(tempfile.mkdtemp(prefix="mmrag-demo-"))
    ports = StackPorts.free()
    # Nothing of the session stack's settings leaks in: the demo brings its own.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MMRAG_", "TEMPORAL_"))}
    env.update({ENV_PREFIX + f.name.upper(): str(getattr(ports, f.name)) for f in fields(ports)})
    env.update(MMRAG_STATE_DIR=str(state), COLUMNS="200")
    try:
        yield env
    finally:
        subprocess.run([MMRAG, "stack", "down"], env=env, capture_output=True, timeout=180)
        shutil.rmtree(state, ignore_errors=True)


def run_demo(env: dict[str, str]) -> str:
    done = subprocess.run([MMRAG, "demo"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_demo_answers_with_sources_and_runs_again(demo_env: dict[str, str]) -> None:
    first = run_demo(demo_env)
    ports = {k: v for k, v in demo_env.items() if k.startswith(ENV_PREFIX)}
    assert f"127.0.0.1:{ports[ENV_PREFIX + 'TEMPORAL']}" in first  # its own stack
    assert re.search(r"\d+ ingested, 0 unchanged, 1 failed", first), first[-2000:]
    assert "corrupt or truncated image" in first  # the deliberately broken PNG, with why
    # The red-circle question cites red-circle images; the PDF page and the video frame
    # come back with their locators; every answer names its sources.
    text_answer = first.split("Which pictures show a red circle", 1)[1].split("Q (", 1)[0]
    assert "red circle" in text_answer and "[S1]" in text_answer
    assert "(page:" in first and "(frame:" in first
    assert first.count("extractive answer in") >= 4
    # Answers from inside documents, each with why: a fact in paragraph 5 of page 3 of a
    # PDF, found by its own words, and a memo that exists only as a scanned picture (OCR).
    deep = first.split("Q (a paragraph deep inside a PDF)", 1)[1].split("Q (", 1)[0]
    why = re.search(r"why: \[S1\] site-handbook\.pdf, page 3, passage \d+: \"(.*)\"", deep)
    assert why and "07:30" in why.group(1), deep
    scan = first.split("Q (a scanned page)", 1)[1].split("7. watch it", 1)[0]
    why = re.search(r"why: \[S1\] scanned-memo\.pdf, page 1(, passage \d+)?: \"(.*)\"", scan)
    assert why and "19:00" in why.group(2), scan
    assert f"http://127.0.0.1:{ports[ENV_PREFIX + 'TEMPORAL_UI']}" in first
    worker_pid = int(re.search(r"worker pid (\d+)", first).group(1))  # type: ignore[union-attr]

    again = run_demo(demo_env)  # a second `make demo`: nothing to re-encode, same answers
    assert re.search(r"0 ingested, \d+ unchanged, 1 failed", again), again[-2000:]
    assert "red circle" in again.split("Which pictures show a red circle", 1)[1]

    down = subprocess.run(
        [MMRAG, "stack", "down"], env=demo_env, capture_output=True, text=True, timeout=180
    )
    assert down.returncode == 0, down.stderr
    new_pid = int(re.search(r"worker pid (\d+)", again).group(1))  # type: ignore[union-attr]
    for pid in (worker_pid, new_pid):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
