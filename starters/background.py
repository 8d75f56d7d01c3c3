"""A worker process in the background for the demo, tracked by a pid file under state_dir."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

READY_LINE = "mmrag worker ready"


def _pid_file(state_dir: Path) -> Path:
    return state_dir / "run" / "worker.pid"


def start_background_worker(state_dir: Path, env: dict[str, str], timeout: float = 120) -> int:
    """Start ``mmrag worker --role all`` detached; return its pid once it polls."""
    stop_background_worker(state_dir)
    (state_dir / "logs").mkdir(parents=True, exist_ok=True)
    (state_dir / "run").mkdir(parents=True, exist_ok=True)
    log_path = state_dir / "logs" / "worker.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "starters.cli", "worker", "--role", "all"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            start_new_session=True,
        )
    _pid_file(state_dir).write_text(str(proc.pid))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if READY_LINE in log_path.read_text(errors="replace"):
            return proc.pid
        if proc.poll() is not None:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(f"the worker exited with status {proc.returncode}:\n{tail}")
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(f"the worker did not become ready in {timeout:.0f}s; see {log_path}")


def stop_background_worker(state_dir: Path, timeout: float = 30) -> None:
    pid_file = _pid_file(state_dir)
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    pid_file.unlink(missing_ok=True)
