"""``mmrag serve`` in the background, for ``make demo``: started detached, tracked by a pid
file in the stack's state directory, stopped by ``mmrag stack down`` (by that pid only).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from settings import REPO_ROOT
from starters.background import stop_by_pid_file


def _pid_file(state_dir: Path) -> Path:
    return state_dir / "run" / "web.pid"


def start_background_server(
    state_dir: Path, env: dict[str, str], host: str, port: int, timeout: float = 60
) -> str:
    """Start the web app (replacing one this state directory ran before); its URL."""
    stop_background_server(state_dir)
    log_path = state_dir / "logs" / "web.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "starters.cli", "serve", "--host", host, "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            cwd=REPO_ROOT,
            start_new_session=True,
        )
    _pid_file(state_dir).parent.mkdir(parents=True, exist_ok=True)
    _pid_file(state_dir).write_text(str(proc.pid))
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/v1/openapi.json", timeout=2):
                return url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_background_server(state_dir)
                tail = log_path.read_text(errors="replace").splitlines()[-5:]
                raise RuntimeError(
                    "mmrag serve did not start (" + " / ".join(tail) + f"); log: {log_path}"
                ) from None
            time.sleep(0.2)


def stop_background_server(state_dir: Path, timeout: float = 15) -> bool:
    """Stop the server the pid file names (SIGTERM, then SIGKILL); False when none ran."""
    return stop_by_pid_file(_pid_file(state_dir), timeout)
