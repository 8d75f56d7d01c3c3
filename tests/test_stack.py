"""The embedded stack against the real servers: Temporal dev server, Milvus, PostgreSQL, GCS.

One stack on free ports serves the whole module (starting Milvus costs seconds); the tests
run in file order and the last one takes it down and checks that no process is left. The
fixture stops everything in ``finally`` as well, so a failing test leaves nothing running.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import psutil
import psycopg
import pytest
from pymilvus import MilvusClient
from temporalio.api.workflowservice.v1 import GetSystemInfoRequest
from temporalio.client import Client

from stack.ports import StackPorts, port_bindable
from stack.procs import read_pid_file, write_pid_file
from stack.servers import Gcs, postgres_passfile, venv_executable
from stack.services import Stack, StackError, read_endpoints
from workflows.contracts import SEARCH_ATTRIBUTES

ALL = ("temporal", "milvus", "postgres", "gcs")


@dataclass
class Running:
    stack: Stack
    endpoints: dict[str, str]
    up_seconds: float
    seen_pids: set[int] = field(default_factory=set)

    def pids(self) -> dict[str, int]:
        """Current pids by service; every pid ever seen is remembered for the final check."""
        pids = {name: info["pid"] for name, info in self.stack.status().items()}
        current = {n: p for n, p in pids.items() if isinstance(p, int)}
        self.seen_pids.update(current.values())
        return current


@pytest.fixture(scope="module")
def running() -> Iterator[Running]:
    # Not under pytest's tmp_path: as root PostgreSQL runs as another user, and every pytest
    # session that starts resets /tmp/pytest-of-root to 0700, locking that user out of a
    # data directory below it.
    state_dir = Path(tempfile.mkdtemp(prefix="mmrag-test-stack-"))
    stack = Stack(state_dir, StackPorts.free(), services=ALL)
    try:
        t0 = time.monotonic()
        endpoints = stack.up()
        r = Running(stack, endpoints, time.monotonic() - t0)
        r.pids()
        yield r
    finally:
        try:
            stack.down()
        finally:
            shutil.rmtree(state_dir, ignore_errors=True)


def gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not gone(pid):
        assert time.monotonic() < deadline, f"pid {pid} still alive"
        time.sleep(0.05)


def pg_conninfo(database_url: str) -> str:
    """SQLAlchemy's ``postgresql+psycopg://`` URL as a libpq URI."""
    assert database_url.startswith("postgresql+psycopg://")
    return "postgresql://" + database_url.removeprefix("postgresql+psycopg://")


def temporal_cli(address: str, *args: str) -> str:
    out = subprocess.run(
        [venv_executable("temporal"), *args, "--address", address, "--disable-config-env"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return out.stdout


def test_up_starts_every_service(running: Running) -> None:
    status = running.stack.status()
    assert set(status) == set(ALL)
    for name, info in status.items():
        assert info["running"], f"{name} not running: {info}"
    assert len(set(running.pids().values())) == len(ALL)
    assert read_endpoints(running.stack.state_dir) == running.endpoints
    ports = running.stack.ports

    def db(login: str) -> str:  # each login's own URL; its password in a 0600 pgpass file
        passfile = postgres_passfile(running.stack.state_dir, login)
        return f"postgresql+psycopg://{login}@127.0.0.1:{ports.postgres}/mmrag?passfile={passfile}"

    assert running.endpoints == {
        "temporal_address": f"127.0.0.1:{ports.temporal}",
        "temporal_ui_url": f"http://127.0.0.1:{ports.temporal_ui}",
        "temporal_namespace": "default",
        "milvus_uri": f"http://127.0.0.1:{ports.milvus}",
        "database_url": db("postgres"),
        "database_url_cpu": db("mmrag_ingest"),
        "database_url_query": db("mmrag_query"),
        "gcs_emulator": f"http://127.0.0.1:{ports.gcs}",
    }
    for name in ALL:
        assert (running.stack.state_dir / "logs" / f"{name}.log").exists()
        assert read_pid_file(running.stack.state_dir / "run" / f"{name}.pid") == status[name]["pid"]


def test_postgres_answers_on_tcp_with_the_mmrag_database(running: Running) -> None:
    with psycopg.connect(pg_conninfo(running.endpoints["database_url"])) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        assert conn.execute("select current_database()").fetchone() == ("mmrag",)


def test_milvus_answers(running: Running) -> None:
    client = MilvusClient(uri=running.endpoints["milvus_uri"], timeout=10)
    try:
        assert isinstance(client.list_collections(), list)
    finally:
        client.close()


def test_milvus_uses_only_its_own_ports(running: Running) -> None:
    """Milvus's 2379/2380 etcd and 9091 metrics defaults are moved to the stack's ports."""
    pid = running.pids()["milvus"]
    listening = {
        c.laddr.port for c in psutil.Process(pid).net_connections() if c.status == "LISTEN"
    }
    ports = running.stack.ports
    allowed = {ports.milvus, *ports.milvus_extra().values()}
    assert listening <= allowed, f"unexpected Milvus ports: {sorted(listening - allowed)}"
    assert ports.milvus_extra()["metrics_port"] in listening
    assert not listening & {2379, 2380, 9091}
    health = f"http://127.0.0.1:{ports.milvus_extra()['metrics_port']}/healthz"
    with urllib.request.urlopen(health, timeout=5) as resp:
        assert b"OK" in resp.read()


async def test_temporal_client_connects(running: Running) -> None:
    client = await Client.connect(running.endpoints["temporal_address"], namespace="default")
    info = await client.workflow_service.get_system_info(GetSystemInfoRequest())
    assert info.server_version


def test_search_attributes_registered(running: Running) -> None:
    listed = json.loads(
        temporal_cli(
            running.endpoints["temporal_address"],
            "operator",
            "search-attribute",
            "list",
            "-o",
            "json",
        )
    )
    custom = listed.get("customAttributes", {})
    for name in SEARCH_ATTRIBUTES:
        assert name in custom, f"{name} missing from {sorted(custom)}"


def test_gcs_emulator_answers(running: Running) -> None:
    with urllib.request.urlopen(
        running.endpoints["gcs_emulator"] + "/storage/v1/b", timeout=5
    ) as r:
        assert r.status == 200


def test_second_up_is_a_noop(running: Running) -> None:
    before = running.pids()
    t0 = time.monotonic()
    endpoints = running.stack.up()
    took = time.monotonic() - t0
    assert endpoints == running.endpoints
    assert running.pids() == before
    assert took < 10, f"second up() took {took:.1f} s"


@pytest.mark.parametrize("field_name", ["temporal", "milvus", "milvus_extra_base", "postgres"])
def test_port_taken_by_another_program_fails_fast(
    running: Running, tmp_path: Path, field_name: str
) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        ports = replace(StackPorts.free(), **{field_name: port})
        if field_name == "milvus_extra_base":  # block the etcd port, the first of the range
            assert ports.milvus_extra()["etcd_port"] == port
        other = Stack(tmp_path / "state", ports, services=ALL)
        t0 = time.monotonic()
        with pytest.raises(StackError) as err:
            other.up(timeout=30)
        took = time.monotonic() - t0
    assert took < 5, f"took {took:.1f} s"
    message = str(err.value)
    assert f"port {port}" in message
    assert "already in use" in message
    assert field_name.replace("_", "-") in message  # the flag to change, e.g. --milvus-port
    run_dir = tmp_path / "state" / "run"
    assert not list(run_dir.glob("*.pid")), "nothing may start when a port is taken"
    assert all(info["running"] for info in running.stack.status().values())


def test_service_exiting_during_start_reports_its_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = "import sys; print('bad flag --frobnicate', flush=True); sys.exit(3)"
    monkeypatch.setattr(Gcs, "command", lambda self: [sys.executable, "-c", script])
    stack = Stack(tmp_path / "state", StackPorts.free(), services=("gcs",))
    with pytest.raises(StackError) as err:
        stack.up(timeout=20)
    assert "gcs exited during start (exit code 3)" in str(err.value)
    assert "bad flag --frobnicate" in str(err.value)
    assert not (tmp_path / "state" / "run" / "gcs.pid").exists()


def test_interrupted_initdb_is_redone() -> None:
    """A data directory left by a cut-short initdb (no marker, no pg_control) is replaced."""
    state_dir = Path(tempfile.mkdtemp(prefix="mmrag-test-initdb-"))
    stack = Stack(state_dir, StackPorts.free(), services=("postgres",))
    try:
        pgdata = state_dir / "postgres" / "data"
        pgdata.mkdir(parents=True)
        (pgdata / "PG_VERSION").write_text("18\n")
        endpoints = stack.up(timeout=60)
        with psycopg.connect(pg_conninfo(endpoints["database_url"])) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        assert "interrupted initdb" in (state_dir / "logs" / "postgres.log").read_text()
    finally:
        try:
            stack.down()
        finally:
            shutil.rmtree(state_dir, ignore_errors=True)


def test_temporal_restart_on_existing_db_adds_new_search_attributes(
    running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """start-dev ignores --search-attribute on an existing database; the stack adds them."""
    stack, address = running.stack, running.endpoints["temporal_address"]
    old = running.pids()["temporal"]
    stack.stop_service("temporal")
    assert not stack.status()["temporal"]["running"]
    wait_gone(old)
    extra = {**SEARCH_ATTRIBUTES, "MmragStackTestExtra": "Keyword"}
    monkeypatch.setattr("stack.servers.search_attributes", lambda: dict(extra))
    stack.start_service("temporal")
    assert running.pids()["temporal"] != old
    custom = json.loads(
        temporal_cli(address, "operator", "search-attribute", "list", "-o", "json")
    )["customAttributes"]
    assert set(extra) <= set(custom)


def test_postgres_stop_and_start_keeps_data(running: Running) -> None:
    url = pg_conninfo(running.endpoints["database_url"])
    with psycopg.connect(url) as conn:
        conn.execute("create table stack_probe (v text)")
        conn.execute("insert into stack_probe values ('kept')")
    stack = running.stack
    old = running.pids()["postgres"]
    stack.stop_service("postgres")
    wait_gone(old)
    assert stack.status()["postgres"]["running"] is False
    assert not (stack.state_dir / "run" / "postgres.pid").exists()
    stack.start_service("postgres")
    assert running.pids()["postgres"] != old
    with psycopg.connect(url) as conn:
        assert conn.execute("select v from stack_probe").fetchall() == [("kept",)]


def test_stale_pid_file_is_replaced(running: Running, caplog: pytest.LogCaptureFixture) -> None:
    """A server that died (SIGKILL) leaves its pid file: up() says so and starts it again."""
    stack = running.stack
    old = running.pids()["temporal"]
    os.kill(old, signal.SIGKILL)
    wait_gone(old)
    assert read_pid_file(stack.state_dir / "run" / "temporal.pid") == old
    assert stack.status()["temporal"]["running"] is False
    with caplog.at_level(logging.WARNING, logger="stack"):
        stack.up()
    assert any("no longer running" in r.getMessage() for r in caplog.records)
    assert "no longer running" in (stack.state_dir / "logs" / "temporal.log").read_text()
    new = running.pids()["temporal"]
    assert new != old
    assert stack.status()["temporal"]["running"]


def test_pid_file_naming_an_unrelated_process_is_not_trusted(running: Running) -> None:
    """A reused pid (here: this test process) is neither killed nor taken for the server."""
    stack = running.stack
    old = running.pids()["gcs"]
    stack.stop_service("gcs")
    wait_gone(old)
    write_pid_file(stack.state_dir / "run" / "gcs.pid", os.getpid())
    assert stack.status()["gcs"]["running"] is False
    stack.up()
    new = running.pids()["gcs"]
    assert new not in (old, os.getpid())


def test_server_without_pid_file_is_adopted(running: Running) -> None:
    stack = running.stack
    pid = running.pids()["postgres"]
    (stack.state_dir / "run" / "postgres.pid").unlink()
    stack.up()
    assert running.pids()["postgres"] == pid


def test_up_after_every_server_was_killed(running: Running) -> None:
    """An unclean stop (power loss, OOM killer: every server process SIGKILLed) that also
    left half-written files: ``up()`` recovers without anything removed by hand, and keeps
    the data."""
    url = pg_conninfo(running.endpoints["database_url"])
    with psycopg.connect(url) as conn:
        conn.execute("create table crash_probe (v text)")
        conn.execute("insert into crash_probe values ('kept')")
    stack = running.stack
    pids = running.pids()
    assert set(pids) == set(ALL)
    for pid in pids.values():  # the whole group: helpers die too, as in a crash
        os.killpg(os.getpgid(pid), signal.SIGKILL)
    for pid in pids.values():
        wait_gone(pid)
    (stack.run_dir / "postgres.pid").write_text("")  # cut short mid-write
    stack.endpoints_path.write_text('{"temporal_address": "127.0')
    (stack.state_dir / "endpoints.json.tmp").write_text("{")
    assert not any(info["running"] for info in stack.status().values())
    assert stack.up() == running.endpoints
    assert read_endpoints(stack.state_dir) == running.endpoints
    status = stack.status()
    assert all(info["running"] for info in status.values()), status
    assert set(running.pids().values()).isdisjoint(pids.values())
    with psycopg.connect(url) as conn:
        assert conn.execute("select v from crash_probe").fetchall() == [("kept",)]
    client = MilvusClient(uri=running.endpoints["milvus_uri"], timeout=10)
    try:
        assert isinstance(client.list_collections(), list)
    finally:
        client.close()


def test_down_leaves_no_process(running: Running) -> None:
    stack = running.stack
    running.pids()
    t0 = time.monotonic()
    stack.down()
    took = time.monotonic() - t0
    assert took < 30, f"down() took {took:.1f} s"
    alive = [pid for pid in running.seen_pids if not gone(pid)]
    assert not alive, f"still running after down(): {alive}"
    assert not list((stack.state_dir / "run").glob("*.pid"))
    assert read_endpoints(stack.state_dir) is None
    assert not any(info["running"] for info in stack.status().values())
    ports = stack.ports
    for port in (ports.temporal, ports.temporal_ui, ports.milvus, ports.postgres, ports.gcs):
        assert port_bindable("127.0.0.1", port), f"port {port} still taken"
    assert running.up_seconds < 60, f"up() took {running.up_seconds:.1f} s"
