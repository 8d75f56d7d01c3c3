"""Worker processes in the background: for the demo, the tests and the benchmarks.

One class serves all three so the way a worker is started, waited for and stopped is
the same everywhere: started in its own session, ready when it prints ``READY_LINE``,
stopped by its own pid (SIGTERM for a graceful shutdown, SIGKILL after a timeout).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from settings import REPO_ROOT

READY_LINE = "mmrag worker ready"


@dataclass
class WorkerProcess:
    proc: subprocess.Popen[bytes]
    log_path: Path
    role: str

    @classmethod
    def start(
        cls,
        state_dir: Path,
        role: str,
        env: dict[str, str],
        timeout: float = 120,
        log_name: str = "",
    ) -> WorkerProcess:
        """Start ``mmrag worker --role ROLE`` and return once it polls its queues."""
        log_path = state_dir / "logs" / (log_name or f"worker-{role}-{uuid.uuid4().hex[:6]}.log")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "starters.cli", "worker", "--role", role],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO_ROOT,
                start_new_session=True,
            )
        worker = cls(proc, log_path, role)
        deadline = time.monotonic() + timeout
        while READY_LINE not in worker.log():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"the {role} worker exited with status {proc.returncode}:\n{worker.tail()}"
                )
            if time.monotonic() > deadline:
                worker.kill()
                raise RuntimeError(
                    f"the {role} worker was not ready in {timeout:.0f}s:\n{worker.tail()}"
                )
            time.sleep(0.1)
        return worker

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (graceful shutdown), then SIGKILL if it has not exited in ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode


def _pid_file(state_dir: Path) -> Path:
    return state_dir / "run" / "worker.pid"


def start_background_worker(state_dir: Path, env: dict[str, str], timeout: float = 120) -> int:
    """The demo's worker: outlives this process, tracked by a pid file for `stack down`."""
    stop_background_worker(state_dir)
    worker = WorkerProcess.start(state_dir, "all", {**os.environ, **env}, timeout, "worker.log")
    _pid_file(state_dir).parent.mkdir(parents=True, exist_ok=True)
    _pid_file(state_dir).write_text(str(worker.proc.pid))
    return worker.proc.pid


def stop_by_pid_file(pid_file: Path, timeout: float) -> bool:
    """Stop the process a pid file names (SIGTERM, then SIGKILL after ``timeout``) and
    remove the file; False when the file named none. The demo's worker and web app share it."""
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return False
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
    return True


def stop_background_worker(state_dir: Path, timeout: float = 30) -> None:
    stop_by_pid_file(_pid_file(state_dir), timeout)
