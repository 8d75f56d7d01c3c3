"""Process bookkeeping for the embedded stack: pid files, liveness, ownership, stopping.

Every server runs in its own session (``start_new_session=True``), so it is the leader of
its own process group: Ctrl+C in the terminal that ran ``mmrag stack up`` does not reach it,
and stopping the group also stops any helper process it forked. A pid is only trusted when
the process behind it still works in the service's own directory (its cwd), because pids
are reused: after a reboot the pid in a stale pid file can belong to anything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import psutil

log = logging.getLogger("stack")


def pid_alive(pid: int, popen: subprocess.Popen[bytes] | None = None) -> bool:
    """Whether ``pid`` is a live process; a zombie, or a process on its way out, is not.

    A multi-threaded server killed with SIGKILL shows as a zombie while its other threads
    are still exiting (and still hold its sockets): it is not running, but see
    ``pid_exited`` for "completely gone".
    """
    try:
        if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            pid_exited(pid, popen)  # reap it if it is our child and done
            return False
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True
    return not pid_exited(pid, popen)


def pid_exited(pid: int, popen: subprocess.Popen[bytes] | None = None) -> bool:
    """Whether ``pid`` has completely exited (a child of ours: reaped, its files closed)."""
    if popen is not None and popen.pid == pid:
        return popen.poll() is not None
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == pid
    except ChildProcessError:
        pass  # not a child of this process: its parent reaps it
    except OSError:
        return False
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def process_cwd(pid: int) -> Path | None:
    try:
        return Path(psutil.Process(pid).cwd())
    except (psutil.Error, OSError):
        return None


def works_in(pid: int, home: Path) -> bool:
    """Whether process ``pid`` has its cwd in ``home`` (how a service process is recognised)."""
    cwd = process_cwd(pid)
    return cwd is not None and (cwd == home or home in cwd.parents)


def describe(pid: int) -> str:
    """``pid 123 (temporal server start-dev ...)`` for messages."""
    try:
        cmd = " ".join(psutil.Process(pid).cmdline())
    except (psutil.Error, OSError):
        return f"pid {pid}"
    if len(cmd) > 100:
        cmd = cmd[:97] + "..."
    return f"pid {pid} ({cmd})"


def read_pid_file(path: Path) -> int | None:
    """The pid in ``path``; None when the file is missing, empty or not a number."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    try:
        pid = int(text.split()[0])
    except (ValueError, IndexError):
        return None
    return pid if pid > 0 else None


def write_pid_file(path: Path, pid: int) -> None:
    """Write atomically, so a crash never leaves a half-written pid file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{pid}\n")
    os.replace(tmp, path)


def tail(path: Path, lines: int = 20, offset: int = 0) -> str:
    """The last ``lines`` lines of ``path`` written after byte ``offset``."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return "(no log)"
    text = data.decode("utf-8", errors="replace").rstrip()
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


@dataclass
class Launched:
    """A process started by ``launch``, and where its output for this start begins."""

    popen: subprocess.Popen[bytes]
    log_path: Path
    log_offset: int

    @property
    def pid(self) -> int:
        return self.popen.pid


def identity(user: str | None) -> tuple[int | None, int | None, list[int] | None]:
    """uid, gid and supplementary groups for subprocess to switch to (all None: stay)."""
    if user is None:
        return None, None, None
    import pwd

    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid, []


def launch(
    cmd: Sequence[str],
    *,
    cwd: Path,
    env: dict[str, str],
    log_path: Path,
    user: str | None = None,
) -> Launched:
    """Start ``cmd`` in a new session with stdout and stderr appended to ``log_path``.

    ``user`` (only possible as root) runs it as that system user, for servers such as
    PostgreSQL that refuse to run as root.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    uid, gid, groups = identity(user)
    with log_path.open("ab") as out:
        offset = out.tell()
        stamp = datetime.now().isoformat(timespec="seconds")
        out.write(f"=== {stamp} mmrag stack: starting {' '.join(cmd)}\n".encode())
        out.flush()
        popen = subprocess.Popen(
            list(cmd),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            user=uid,
            group=gid,
            extra_groups=groups,
        )
    return Launched(popen, log_path, offset)


def note(log_path: Path, message: str) -> None:
    """Append one line from the stack manager to a service's log, and log it here too."""
    log.warning(message)
    with contextlib.suppress(OSError), log_path.open("a") as out:
        out.write(f"=== {datetime.now().isoformat(timespec='seconds')} mmrag stack: {message}\n")


@dataclass
class StopTarget:
    """One server to stop: how to ask it to stop, and how long to wait before SIGKILL."""

    name: str
    pid: int
    sig: signal.Signals = signal.SIGTERM
    group: bool = True  # send ``sig`` to the whole process group, not only to ``pid``
    grace: float = 10.0
    popen: subprocess.Popen[bytes] | None = None
    killed: bool = field(default=False, init=False)
    took: float = field(default=0.0, init=False)  # seconds from the stop signal to its exit


def _signal(pid: int, sig: signal.Signals, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group and _leads_group(pid):
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _leads_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except OSError:
        return False


def _sweep_group(pgid: int) -> None:
    """SIGKILL whatever is left in the group of a leader that has just exited.

    A process group id cannot be handed out again while any member is alive, so right
    after the leader exits this reaches only processes the server itself left behind.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def stop_processes(targets: Sequence[StopTarget], timeout: float) -> list[str]:
    """Stop all targets at once: their stop signal, then SIGKILL after each one's grace.

    Signalling all first and then waiting makes a full ``down()`` take as long as the
    slowest server rather than the sum. Returns the names of processes still alive after
    SIGKILL and 5 more seconds (a process stuck in the kernel); normally empty.
    """
    start = time.monotonic()
    deadlines: dict[str, float] = {}
    leaders: dict[str, bool] = {}
    for t in targets:
        leaders[t.name] = _leads_group(t.pid)
        _signal(t.pid, t.sig, t.group)
        deadlines[t.name] = start + max(0.0, min(t.grace, timeout))
    pending = list(targets)
    while pending:
        now = time.monotonic()
        still: list[StopTarget] = []
        for t in pending:
            if pid_exited(t.pid, t.popen):
                t.took = now - start
                if leaders[t.name]:
                    _sweep_group(t.pid)
                continue
            if now >= deadlines[t.name]:
                if t.killed:
                    log.error("%s: %s survived SIGKILL", t.name, describe(t.pid))
                    continue
                log.warning(
                    "%s: pid %d still running %.1f s after %s; sending SIGKILL",
                    t.name,
                    t.pid,
                    now - start,
                    t.sig.name,
                )
                if leaders[t.name]:
                    _sweep_group(t.pid)
                else:
                    _signal(t.pid, signal.SIGKILL, False)
                t.killed = True
                deadlines[t.name] = now + 5.0
            still.append(t)
        pending = still
        if pending:
            time.sleep(0.05)
    return [t.name for t in targets if not pid_exited(t.pid, t.popen)]
