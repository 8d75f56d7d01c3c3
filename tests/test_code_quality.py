"""The code stays as the README promises: ruff-clean, ruff-formatted and mypy-clean (the
modules mypy checks are listed in pyproject.toml). CI runs only `make test`, so this is
where a regression shows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from workers.settings import REPO_ROOT

BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "command",
    [["ruff", "check", "."], ["ruff", "format", "--check", "."], ["mypy"]],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_static_checks_pass(command: list[str]) -> None:
    done = subprocess.run(
        [str(BIN / command[0]), *command[1:]],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
