"""The embedded stack: Temporal dev server, Milvus, PostgreSQL (and a GCS emulator) as local
processes that outlive the Python process that started them.

``Stack(state_dir).up()`` is what ``mmrag stack up``, the demo and the test fixtures call. All
state lives under ``state_dir``::

    endpoints.json        what clients connect to (read by settings and read_endpoints)
    ports.json            the ports of the last up(), reused when no ports are given
    run/<name>.pid        the server's own pid (not a wrapper's)
    logs/<name>.log       the server's stdout and stderr, appended across restarts
    secrets/postgres/     <login>.pgpass (0600): each Postgres login's random password
    auth/                 signing_key.pem (0600) and verify_keys.json: the local credentials
    temporal/ milvus/ postgres/ gcs/   each server's data directory and cwd

Servers are started together and waited for together, so ``up()`` takes as long as the
slowest server (Milvus), not the sum. Nothing is started unless every port it needs is free;
a port held by another program is reported at once with the setting that moves it.

One module of ~500 lines: the bookkeeping of ``Stack`` (state files, ports, start, wait,
stop) is one procedure.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

from stack.errors import StackError
from stack.ports import StackPorts, listeners, port_bindable, tcp_answers
from stack.procs import (
    Launched,
    StopTarget,
    describe,
    launch,
    note,
    pid_alive,
    read_pid_file,
    stop_processes,
    tail,
    works_in,
    write_pid_file,
)
from stack.servers import HOW_TO_CHANGE, SERVERS, Context, Server

__all__ = [
    "DEFAULT_SERVICES",
    "Stack",
    "StackError",
    "StackPorts",
    "read_endpoints",
]

log = logging.getLogger("stack")

DEFAULT_SERVICES: tuple[str, ...] = ("temporal", "milvus", "postgres")
ENDPOINTS_FILE = "endpoints.json"
PORTS_FILE = "ports.json"
LOG_TAIL_LINES = 20


def read_endpoints(state_dir: Path) -> dict[str, str] | None:
    """The endpoints the last ``up()`` wrote to ``state_dir/endpoints.json``; None if none.

    ``down()`` removes the file, so None also means "the embedded stack is not up".
    """
    path = Path(state_dir) / ENDPOINTS_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable %s: %s", path, e)
        return None
    if not isinstance(data, dict):
        return None
    return {str(k): str(v) for k, v in data.items()}


def _write_json(path: Path, data: object) -> None:
    """Write atomically: readers see the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


class Stack:
    """Starts, checks and stops the embedded servers that keep their state in ``state_dir``.

    ``ports`` defaults to the ports of the last ``up()`` in this ``state_dir`` (ports.json),
    else ``StackPorts()``. ``temporal_db_file=False`` runs Temporal in memory.
    ``milvus_config`` sets keys of the milvus wheel's config template, e.g.
    ``{"authorization_enabled": True}`` for RBAC tests (readiness is then probed on
    Milvus's /healthz, since no credentials are known); the default stack sets none.
    """

    def __init__(
        self,
        state_dir: Path,
        ports: StackPorts | None = None,
        services: tuple[str, ...] = DEFAULT_SERVICES,
        temporal_db_file: bool = True,
        milvus_config: Mapping[str, str | int | bool] | None = None,
    ) -> None:
        unknown = [s for s in services if s not in SERVERS]
        if unknown:
            raise StackError(f"unknown services {unknown}; known: {sorted(SERVERS)}")
        self.state_dir = Path(state_dir).expanduser().resolve()
        self.services = tuple(dict.fromkeys(services))
        self.temporal_db_file = temporal_db_file
        self.milvus_config = tuple(sorted((milvus_config or {}).items()))
        self.ports = ports or self._recorded_ports() or StackPorts()
        self._launched: dict[str, Launched] = {}

    # -- paths and helpers -------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return self.state_dir / "run"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def endpoints_path(self) -> Path:
        return self.state_dir / ENDPOINTS_FILE

    def server(self, name: str, ports: StackPorts | None = None) -> Server:
        """The definition of one server (command, probe, paths) with these ports."""
        ctx = Context(
            self.state_dir, ports or self.ports, self.temporal_db_file, self.milvus_config
        )
        return SERVERS[name](ctx)

    def endpoints(self) -> dict[str, str]:
        """What ``up()`` writes to endpoints.json, computed without starting anything."""
        result: dict[str, str] = {}
        for name in self.services:
            result.update(self.server(name).endpoints())
        return result

    def _recorded_ports(self) -> StackPorts | None:
        try:
            return StackPorts.from_dict(json.loads((self.state_dir / PORTS_FILE).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _popen(self, name: str, pid: int) -> Launched | None:
        launched = self._launched.get(name)
        return launched if launched is not None and launched.pid == pid else None

    def _live_pid(self, srv: Server) -> int | None:
        """The pid in the server's pid file if that process is alive and is this server."""
        pid = read_pid_file(srv.pid_path)
        if pid is None:
            return None
        launched = self._popen(srv.name, pid)
        if not pid_alive(pid, launched.popen if launched else None):
            return None
        return pid if works_in(pid, srv.home) else None

    @contextlib.contextmanager
    def _locked(self, timeout: float) -> Iterator[None]:
        """One stack command at a time per state_dir (two terminals, a test and the CLI)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout
        with (self.run_dir / "stack.lock").open("w") as f:
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StackError(
                            f"another stack command holds {self.run_dir / 'stack.lock'}; "
                            "wait for it to finish"
                        ) from None
                    time.sleep(0.1)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # -- public API ----------------------------------------------------------------------
    def up(self, timeout: float = 90) -> dict[str, str]:
        """Start every service that is not running, wait until each answers, write endpoints.

        Idempotent: a service whose pid is alive and whose port answers is left alone (its
        search attributes, database and migrations are still checked). Raises StackError,
        before starting anything, when a port is taken by another program; and when a
        service exits or is not ready within ``timeout`` s, after stopping what this call
        started.
        """
        with self._locked(timeout):
            self._ensure(self.services, timeout)
            self.ensure_auth_keys()
            endpoints = self.endpoints()
            _write_json(self.endpoints_path, endpoints)
            return endpoints

    def ensure_auth_keys(self) -> str:
        """The local stack's credential signing key (``auth/signing_key.pem``, 0600) and its
        workers' verification keys (``auth/verify_keys.json``), created once: the CLI and the
        demo mint their tokens from it, so the README's commands need no extra step.
        Returns the key id."""
        from workers.auth import ensure_signing_key

        return ensure_signing_key(self.state_dir / "auth")

    def down(self, timeout: float = 60) -> list[StopTarget]:
        """Stop every server with a pid file in this state_dir and remove the pid files.

        All get their stop signal at once (SIGTERM; SIGINT, PostgreSQL's fast shutdown, for
        PostgreSQL), then SIGKILL to the process group after the server's grace time
        (Milvus 15 s; it stops in ~2 s, see ``Milvus.query_node_stop_s``) or ``timeout``.
        Also stops services outside ``self.services`` (a GCS emulator started by another
        Stack on this state_dir): nothing may outlive down().
        Returns how each running server stopped (its signal, ``killed``, ``took``).
        """
        with self._locked(timeout):
            stopped = self._stop(list(SERVERS), timeout)
            self.endpoints_path.unlink(missing_ok=True)
        return stopped

    def status(self) -> dict[str, dict[str, object]]:
        """Per service: running (pid alive and port answers), pid, endpoint, port, log."""
        recorded = self._recorded_ports()
        result: dict[str, dict[str, object]] = {}
        for name in self.services:
            srv = self.server(name)
            pid = self._live_pid(srv)
            if pid is not None and recorded is not None:
                srv = self.server(name, recorded)  # report the ports it really runs on
            result[name] = {
                "running": pid is not None and tcp_answers(srv.port),
                "pid": pid,
                "endpoint": srv.endpoint(),
                "port": srv.port,
                "log": str(srv.log_path),
            }
        return result

    def stop_service(self, name: str, timeout: float = 60) -> None:
        """Stop one server (for fault tests); its data stays for ``start_service``."""
        self._check_name(name)
        with self._locked(timeout):
            self._stop([name], timeout)

    def start_service(self, name: str, timeout: float = 90) -> dict[str, str]:
        """Start one server again with the same ports and data; returns all endpoints."""
        self._check_name(name)
        with self._locked(timeout):
            self._ensure((name,), timeout)
            endpoints = self.endpoints()
            _write_json(self.endpoints_path, endpoints)
            return endpoints

    def __enter__(self) -> Stack:
        self.up()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    # -- starting ------------------------------------------------------------------------
    def _check_name(self, name: str) -> None:
        if name not in SERVERS:
            raise StackError(f"unknown service {name!r}; known: {sorted(SERVERS)}")

    def _ensure(self, names: Sequence[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        recorded = self._recorded_ports()
        running: dict[str, int] = {}
        to_start: list[str] = []
        for name in names:
            srv = self.server(name)
            pid = self._inspect(srv)
            if pid is None:
                to_start.append(name)
                continue
            before = self.server(name, recorded) if recorded else srv
            if before.port_signature() != srv.port_signature():
                raise StackError(
                    f"{name} is already running ({describe(pid)}) on ports "
                    f"{list(before.port_signature())}, but ports {list(srv.port_signature())} "
                    "were asked for. Stop the stack first (`mmrag stack down`) or ask for "
                    "the ports it runs on."
                )
            running[name] = pid
        self._check_port_clashes(to_start)
        for name in list(to_start):
            adopted = self._adopt_or_check_ports(self.server(name))
            if adopted is not None:
                to_start.remove(name)
                running[name] = adopted
        _write_json(self.state_dir / PORTS_FILE, self.ports.as_dict())

        started: list[str] = []
        started_lock = threading.Lock()

        def bring_up(name: str) -> None:
            srv = self.server(name)
            if name in running:
                self._wait_ready(srv, running[name], None, deadline, timeout)
            else:
                t_prepare = time.monotonic()
                srv.prepare()
                log.info("%s prepared in %.1f s", name, time.monotonic() - t_prepare)
                launched = launch(
                    srv.command(),
                    cwd=srv.home,
                    env=srv.env(),
                    log_path=srv.log_path,
                    user=srv.run_as(),
                )
                self._launched[name] = launched
                write_pid_file(srv.pid_path, launched.pid)
                with started_lock:
                    started.append(name)
                self._wait_ready(srv, launched.pid, launched, deadline, timeout)
            srv.after_ready(deadline)

        errors: list[str] = []
        order = [n for n in names if n in running or n in to_start]
        with ThreadPoolExecutor(max_workers=max(1, len(order))) as pool:
            futures = {name: pool.submit(bring_up, name) for name in order}
            for name, future in futures.items():
                exc = future.exception()
                if isinstance(exc, StackError):
                    errors.append(str(exc))
                elif exc is not None:
                    errors.append(f"{name}: {type(exc).__name__}: {exc}")
                    log.error("%s failed to start", name, exc_info=exc)
        if errors:
            if started:
                log.warning("stopping %s, started by this call, after the error", started)
                self._stop(started, 30)
            raise StackError("\n\n".join(errors))

    def _inspect(self, srv: Server) -> int | None:
        """The pid of the running server, or None after removing a stale pid file."""
        path = srv.pid_path
        if not path.exists():
            return None
        pid = read_pid_file(path)
        launched = self._popen(srv.name, pid) if pid is not None else None
        if pid is None:
            note(srv.log_path, f"{srv.name}: pid file {path} is unreadable; removing it")
        elif not pid_alive(pid, launched.popen if launched else None):
            note(
                srv.log_path,
                f"{srv.name}: pid file {path} names pid {pid}, which is no longer running; "
                f"removing it and starting {srv.name} again",
            )
        elif not works_in(pid, srv.home):
            note(
                srv.log_path,
                f"{srv.name}: pid file {path} names {describe(pid)}, which is not this "
                f"stack's {srv.name} (the pid was reused); removing it",
            )
        else:
            return pid
        path.unlink(missing_ok=True)
        return None

    def _check_port_clashes(self, names: Sequence[str]) -> None:
        """Two settings that give one port to two uses would fail late; refuse them early."""
        seen: dict[int, str] = {}
        for name in dict.fromkeys([*self.services, *names]):
            for use in self.server(name).port_uses():
                what = f"{use.purpose} ({HOW_TO_CHANGE[use.setting]})"
                if use.port in seen and seen[use.port] != what:
                    raise StackError(
                        f"port {use.port} is given twice: to {seen[use.port]} and to {what}"
                    )
                if not 0 < use.port < 65536:
                    raise StackError(f"{what}: {use.port} is not a valid port")
                seen[use.port] = what

    def _adopt_or_check_ports(self, srv: Server) -> int | None:
        """Raise StackError for a port held by another program; adopt our own server.

        A server of this stack can be running without a pid file (the file was removed by
        hand, or the state_dir was half cleaned): it holds its client port and works in its
        own directory. It is adopted (pid file rewritten) rather than reported as a clash.
        """
        for i, use in enumerate(srv.port_uses()):
            if port_bindable(use.host, use.port):
                continue
            holders = listeners(use.port)
            if not holders and _freed_soon(use.host, use.port):
                continue  # held by a process that was still exiting (a SIGKILLed server)
            if i == 0:
                ours = [p for p in holders if works_in(p, srv.home)]
                if ours:
                    note(
                        srv.log_path,
                        f"{srv.name}: found this stack's {srv.name} running as "
                        f"{describe(ours[0])} without a pid file; adopting it",
                    )
                    write_pid_file(srv.pid_path, ours[0])
                    return ours[0]
            held_by = ", ".join(describe(p) for p in holders) or "another program"
            raise StackError(
                f"{srv.name}: port {use.port} ({use.purpose}) on {use.host} is already in use "
                f"by {held_by}. Stop that program or give {srv.name} another port: "
                f"{HOW_TO_CHANGE[use.setting]}."
            )
        return None

    def _wait_ready(
        self,
        srv: Server,
        pid: int,
        launched: Launched | None,
        deadline: float,
        timeout: float,
    ) -> None:
        started = time.monotonic()
        offset = launched.log_offset if launched else max(0, _size(srv.log_path) - 20_000)
        while True:
            if not pid_alive(pid, launched.popen if launched else None):
                code = launched.popen.returncode if launched else None
                raise StackError(
                    f"{srv.name} exited during start"
                    + (f" (exit code {code})" if code is not None else "")
                    + f"; last lines of {srv.log_path}:\n"
                    + tail(srv.log_path, LOG_TAIL_LINES, offset)
                )
            if srv.probe():
                if launched is not None:
                    took = time.monotonic() - started
                    log.info("%s ready %.1f s after start (pid %d)", srv.name, took, pid)
                else:
                    log.info("%s already running (pid %d)", srv.name, pid)
                return
            if time.monotonic() > deadline:
                raise StackError(
                    f"{srv.name} (pid {pid}) did not become ready within {timeout:.0f} s; "
                    f"last lines of {srv.log_path}:\n" + tail(srv.log_path, LOG_TAIL_LINES, offset)
                )
            time.sleep(0.2)

    # -- stopping ------------------------------------------------------------------------
    def _stop(self, names: Sequence[str], timeout: float) -> list[StopTarget]:
        targets: list[StopTarget] = []
        servers: dict[str, Server] = {}
        for name in names:
            srv = self.server(name)
            servers[name] = srv
            pid = self._inspect(srv)  # removes stale pid files, keeps live ones
            if pid is None:
                continue
            launched = self._popen(name, pid)
            targets.append(
                StopTarget(
                    name=name,
                    pid=pid,
                    sig=srv.stop_signal,
                    group=srv.signal_group,
                    grace=srv.stop_grace,
                    popen=launched.popen if launched else None,
                )
            )
        survivors = stop_processes(targets, timeout)
        for t in targets:
            if t.name not in survivors:
                servers[t.name].pid_path.unlink(missing_ok=True)
                self._launched.pop(t.name, None)
                how = "SIGKILL" if t.killed else t.sig.name
                log.info("%s stopped (pid %d, %s) in %.1f s", t.name, t.pid, how, t.took)
        if survivors:
            raise StackError(
                "still running after SIGKILL: "
                + ", ".join(f"{t.name} {describe(t.pid)}" for t in targets if t.name in survivors)
            )
        return targets


def _freed_soon(host: str, port: int, wait: float = 3.0) -> bool:
    """Whether a port whose holder cannot be seen becomes free within ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        time.sleep(0.1)
        if port_bindable(host, port):
            return True
    return False


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
