"""The ``mmrag`` command line: stack, workers, ingest, search and the demo.

Errors a user can fix (a server down, a bad path) print one line that says what to do
and exit non-zero; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from settings import get_settings
from workers.temporal_client import run_client_command

console = Console(stderr=False)
err = Console(stderr=True)


class UserError(Exception):
    """Printed as one line, exit status 2."""


def _parse_tags(values: Sequence[str]) -> dict[str, str]:
    tags = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise UserError(f"--tag {value!r}: write tags as KEY=VALUE")
        tags[key] = val
    return tags


# -- stack ----------------------------------------------------------------------------
def cmd_stack(args: argparse.Namespace) -> int:
    from stack.services import Stack, StackError, StackPorts

    settings = get_settings()
    flags = {
        "temporal": args.temporal_port,
        "temporal_ui": args.ui_port,
        "milvus": args.milvus_port,
        "milvus_extra_base": args.milvus_extra_base,
        "postgres": args.postgres_port,
    }
    try:
        ports = replace(StackPorts.from_env(), **{k: v for k, v in flags.items() if v})
    except StackError as e:
        raise UserError(str(e)) from e
    stack = Stack(settings.state_dir, ports)
    try:
        if args.action == "up":
            endpoints = stack.up()
            _print_endpoints(endpoints)
        elif args.action == "down":
            from starters.background import stop_background_worker

            stop_background_worker(settings.state_dir)
            stack.down()
            console.print("stack stopped")
        else:
            status = stack.status()
            for name, info in status.items():
                state = "[green]running[/green]" if info.get("running") else "[red]stopped[/red]"
                console.print(
                    f"{name:10} {state}  pid={info.get('pid') or '-'}  {info.get('endpoint', '')}"
                )
            return 0 if all(i.get("running") for i in status.values()) else 1
    except StackError as e:
        raise UserError(str(e)) from e
    return 0


def _print_endpoints(endpoints: dict[str, str]) -> None:
    for key, value in endpoints.items():
        console.print(f"{key:20} {value}")


# -- worker ---------------------------------------------------------------------------
def cmd_worker(args: argparse.Namespace) -> int:
    from workers.run import run_workers

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    run_client_command(run_workers(args.role))
    return 0


# -- ingest ---------------------------------------------------------------------------
def cmd_ingest(args: argparse.Namespace) -> int:
    return run_client_command(_ingest(args))


async def _ingest(args: argparse.Namespace) -> int:
    from activities.store.objects import normalize_uri
    from starters.ingest import follow, print_summary, result_json, start_ingest
    from workers.temporal_client import connect

    try:
        for source in args.sources:
            normalize_uri(source)
    except ValueError as e:
        raise UserError(str(e)) from e

    from settings import get_settings
    from starters.ingest import register_local_roots

    for root in register_local_roots(
        get_settings().state_dir, args.tenant, [normalize_uri(s) for s in args.sources]
    ):
        console.print(f"storage root of tenant {args.tenant} on this stack: {root}")
    client = await connect()
    options = {}
    if args.batch_size:
        options["batch_size"] = args.batch_size
    try:
        handle = await start_ingest(
            client,
            args.tenant,
            args.sources,
            _parse_tags(args.tag),
            force=args.force,
            allow_forgotten=args.allow_forgotten,
            **options,
        )
    except ValueError as e:  # an unsupported URI scheme
        raise UserError(str(e)) from e
    console.print(f"started IngestBatch [bold]{handle.id}[/bold]")
    if not args.wait:
        return 0
    result = await follow(handle, console)
    if args.json:
        print(result_json(result))
    else:
        print_summary(result, console)
    return 1 if result.failed else 0


# -- search ---------------------------------------------------------------------------
def cmd_search(args: argparse.Namespace) -> int:
    from starters.search import nearest

    hits = nearest(args.text, args.tenant, args.top_k)
    if not hits:
        console.print("no results")
    for rank, hit in enumerate(hits, 1):
        console.print(f"{rank}. {hit['score']:.3f}  {hit['uri']}  ({hit['chunk']})")
    return 0


# -- ask ------------------------------------------------------------------------------
def cmd_ask(args: argparse.Namespace) -> int:
    return run_client_command(_ask(args))


async def _ask(args: argparse.Namespace) -> int:
    from starters.ask import (
        ask,
        ask_task_queue,
        image_fields,
        parse_filters,
        print_answer,
        result_json,
    )
    from workers.temporal_client import connect
    from workflows.contracts import AskInput

    try:
        filters = parse_filters(args.filter)
        image = image_fields(args.image)
    except ValueError as e:
        raise UserError(str(e)) from e
    if not args.question and not image:
        raise UserError("ask needs a question, --image, or both")
    client = await connect()
    result = await ask(
        client,
        AskInput(
            tenant=args.tenant,
            text=args.question,
            top_k=args.top_k,
            filters=filters,
            rerank=not args.no_rerank,
            generate=not args.no_generate,
            max_answer_tokens=args.max_tokens,
            **image,
        ),
        task_queue=await ask_task_queue(client, args.queue),
    )
    if args.json:
        print(result_json(result))
    else:
        print_answer(result, console)
    return 0


# -- lifecycle ------------------------------------------------------------------------
def cmd_reindex(args: argparse.Namespace) -> int:
    return run_client_command(_reindex(args))


async def _reindex(args: argparse.Namespace) -> int:
    from starters.lifecycle import start_reindex
    from workers.temporal_client import connect
    from workflows.contracts import ReindexInput, ReindexProgress

    client = await connect()
    handle = await start_reindex(
        client,
        ReindexInput(
            mode=args.mode,
            tenant=args.tenant,
            model=args.model,
            pretrained=args.pretrained,
            checkpoint=args.checkpoint,
            grace_period_hours=args.grace_hours,
        ),
    )
    console.print(f"started Reindex [bold]{handle.id}[/bold]")
    if not args.wait:
        return 0
    result_task = asyncio.ensure_future(handle.result())
    while not result_task.done():
        await asyncio.wait([result_task], timeout=2)
        try:
            p = await handle.query("progress", result_type=ReindexProgress)
            eta = f", eta {p.eta_s:.0f}s" if p.eta_s >= 0 else ""
            console.print(
                f"  {p.phase}: {p.done}/{p.total} ({p.failed} failed, {p.rate_per_s}/s{eta})"
            )
        except Exception:  # between continue-as-new runs
            pass
    r = result_task.result()
    console.print(
        f"{r.mode}: active index v{r.index_version} (was v{r.previous_version}); "
        f"{r.embedded} re-embedded, {r.failed} failed"
        + (f", verified {r.verified_assets} assets, alias swapped" if r.swapped else "")
    )
    return 1 if r.failed else 0


def cmd_schedule(args: argparse.Namespace) -> int:
    return run_client_command(_schedule(args))


async def _schedule(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from starters.lifecycle import create_schedule, list_schedules, schedule_id
    from workers.temporal_client import connect

    client = await connect()
    if args.action == "list":
        for row in await list_schedules(client):
            state = "paused" if row.paused else "active"
            console.print(f"{row.id:40} {state:7} {row.cron:20} {row.note}", highlight=False)
        return 0
    if args.action == "create":
        try:
            handle = await create_schedule(
                client,
                args.kind,
                args.tenant,
                args.cron,
                args.model,
                args.pretrained,
                args.checkpoint,
                timedelta(hours=args.catchup_hours),
                args.paused,
            )
        except ValueError as e:
            raise UserError(str(e)) from e
        console.print(f"created schedule [bold]{handle.id}[/bold]")
        return 0
    handle = client.get_schedule_handle(args.id or schedule_id(args.kind, args.tenant))
    if args.action == "pause":
        await handle.pause(note="paused with mmrag schedule pause")
    elif args.action == "unpause":
        await handle.unpause(note="unpaused with mmrag schedule unpause")
    elif args.action == "trigger":
        await handle.trigger()
    elif args.action == "delete":
        await handle.delete()
    console.print(f"{args.action}: {handle.id}")
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    return run_client_command(_forget(args))


async def _forget(args: argparse.Namespace) -> int:
    from starters.lifecycle import start_forget
    from workers.temporal_client import connect
    from workflows.contracts import ForgetInput

    tags = _parse_tags(args.tag)
    if not (args.asset_id or args.uri_prefix or tags):
        raise UserError("say what to forget: --asset-id, --uri-prefix or --tag K=V")
    client = await connect()
    handle = await start_forget(
        client,
        ForgetInput(
            tenant=args.tenant,
            asset_id=args.asset_id,
            uri_prefix=args.uri_prefix,
            tags=tags,
            reason=args.reason,
            delete_object=args.delete_object,
            allow_reingest=args.allow_reingest,
        ),
    )
    result = await handle.result()
    console.print(
        f"forgot {result.forgotten} asset(s) of tenant {result.tenant} in index versions "
        f"{result.index_versions}; {result.objects_deleted} object(s) deleted"
    )
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    from starters.events import main as serve

    return serve(args)


def cmd_watch(args: argparse.Namespace) -> int:
    return run_client_command(_watch(args))


async def _watch(args: argparse.Namespace) -> int:
    from activities.store.objects import normalize_uri
    from settings import get_settings
    from starters.ingest import register_local_roots
    from starters.lifecycle import start_watch
    from workers.temporal_client import connect
    from workflows.contracts import WatchPrefixInput

    prefix = normalize_uri(args.prefix)
    for root in register_local_roots(get_settings().state_dir, args.tenant, [prefix]):
        console.print(f"storage root of tenant {args.tenant} on this stack: {root}")
    client = await connect()
    handle = await start_watch(
        client,
        WatchPrefixInput(args.tenant, prefix, _parse_tags(args.tag), args.interval),
    )
    console.print(f"started WatchPrefix [bold]{handle.id}[/bold]")
    return 0


# -- credentials ----------------------------------------------------------------------
def cmd_token(args: argparse.Namespace) -> int:
    """``issue``: print a credential for the ``mmrag_auth`` header (stdout, nothing else, so
    ``export MMRAG_AUTH_TOKEN=$(mmrag token issue ...)`` works). ``keygen``: a new signing
    key whose public key joins the verification keys file (rotation)."""
    import getpass

    from workers.auth import (
        CredentialError,
        generate_signing_key,
        issue_token,
        parse_ttl,
        signing_key_from_settings,
    )

    settings = get_settings()
    if args.action == "keygen":
        directory = args.dir or str(settings.state_dir / "auth")
        kid = generate_signing_key(Path(directory))
        console.print(
            f"new signing key {kid} in {directory}/signing_key.pem (0600); its public key is in "
            f"{directory}/verify_keys.json: give that file to the workers "
            "(MMRAG_AUTH_VERIFY_KEYS_FILE) before issuing tokens with it",
            highlight=False,
        )
        return 0
    if not args.tenant or not args.role:
        raise UserError("token issue needs --tenant (repeatable, '*' for operators) and --role")
    try:
        ttl = parse_ttl(args.ttl)
        key = signing_key_from_settings(settings)
        if key is None:
            raise UserError(
                "no signing key: set MMRAG_AUTH_SIGNING_KEY_FILE (or MMRAG_AUTH_SIGNING_KEY), or "
                "run `mmrag stack up` for the local stack's key"
            )
        subject = args.subject or f"{getpass.getuser()} via mmrag token issue"
        print(issue_token(key[0], key[1], args.tenant, args.role, ttl, subject=subject))
    except (CredentialError, ValueError) as e:
        raise UserError(str(e)) from None
    return 0


# -- db -------------------------------------------------------------------------------
def cmd_db(args: argparse.Namespace) -> int:
    """Migrations as the owner, then each worker login's password from the environment
    (MMRAG_DB_INGEST_PASSWORD / MMRAG_DB_QUERY_PASSWORD; compose's migrate job sets them)."""
    from workers.db_logins import passwords_from_env, set_passwords
    from workers.migrate import upgrade

    owner = get_settings().database_endpoint()
    upgrade(owner)
    passwords = passwords_from_env()
    set_passwords(owner, passwords)
    logins = f"; logins with a password set: {', '.join(sorted(passwords))}" if passwords else ""
    console.print("database schema is up to date" + logins)
    return 0


# -- Milvus RBAC ----------------------------------------------------------------------
def cmd_milvus(args: argparse.Namespace) -> int:
    from workers.milvus_rbac import RbacError, passwords_from_env, provision

    s = get_settings()
    try:
        report = provision(
            s.milvus_endpoint(),
            s.milvus_token.get_secret_value(),
            passwords_from_env(),
            reset_passwords=args.reset_passwords,
        )
    except RbacError as e:
        raise UserError(str(e)) from None
    for line in report.changes:
        console.print(f"changed: {line}", highlight=False)
    for line in report.warnings:
        err.print(f"[yellow]warning:[/yellow] {line}", highlight=False, soft_wrap=True)
    if not report.changes:
        console.print("Milvus RBAC is up to date: " + "; ".join(report.unchanged), highlight=False)
    return 0


# -- Temporal operations ------------------------------------------------------------
def cmd_codec_server(args: argparse.Namespace) -> int:
    from starters.codec_server import main as serve

    return serve(args)


def cmd_temporal(args: argparse.Namespace) -> int:
    from starters.temporal_setup import main as setup

    return setup(args)


# -- demo -----------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from starters.demo import run_demo

    return run_demo(console)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmrag", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stack", help="start, stop or inspect the embedded services")
    p.add_argument("action", choices=["up", "down", "status"])
    ports_help = "(default: MMRAG_STACK_{} or {})"
    p.add_argument("--temporal-port", type=int, help=ports_help.format("TEMPORAL", 7233))
    p.add_argument("--ui-port", type=int, help=ports_help.format("TEMPORAL_UI", 8233))
    p.add_argument("--milvus-port", type=int, help=ports_help.format("MILVUS", 19530))
    p.add_argument(
        "--milvus-extra-base",
        type=int,
        help="first of 11 consecutive internal Milvus ports "
        + ports_help.format("MILVUS_EXTRA_BASE", 19600),
    )
    p.add_argument("--postgres-port", type=int, help=ports_help.format("POSTGRES", 5432))
    p.set_defaults(func=cmd_stack)

    p = sub.add_parser("worker", help="run workers for one role or all")
    p.add_argument("--role", choices=["all", "cpu", "encode", "generate", "query"], default="all")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("ingest", help="ingest files, folders, file:// or gs:// URIs")
    p.add_argument("sources", nargs="+", metavar="PATH_OR_URI")
    p.add_argument("--tenant", default="default")
    p.add_argument("--tag", action="append", default=[], metavar="K=V")
    p.add_argument("--force", action="store_true", help="re-encode unchanged objects")
    p.add_argument("--allow-forgotten", action="store_true", help="re-ingest forgotten objects")
    p.add_argument("--batch-size", type=int, default=0)
    p.add_argument("--wait", action="store_true", help="show progress and a summary")
    p.add_argument("--json", action="store_true", help="with --wait: print the result as JSON")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("search", help="nearest-neighbour search by text")
    p.add_argument("text")
    p.add_argument("--tenant", default="default")
    p.add_argument("--top-k", type=int, default=5)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("ask", help="ask a question; answer with cited sources")
    p.add_argument("question", nargs="?", default="")
    p.add_argument(
        "--image", default="", metavar="PATH|URI", help="query image (image or hybrid search)"
    )
    p.add_argument("--tenant", default="default")
    p.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="media_type=, created_after=, created_before=, tag.KEY=, asset_id= (repeatable)",
    )
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--no-rerank", action="store_true")
    p.add_argument("--no-generate", action="store_true", help="retrieval only (extractive answer)")
    p.add_argument("--max-tokens", type=int, default=300)
    p.add_argument("--json", action="store_true", help="print the Ask result contract as JSON")
    p.add_argument(
        "--queue",
        choices=["auto", "mmrag", "mmrag-query"],
        default="auto",
        help="task queue to start the Ask on; auto: mmrag-query when a query worker polls it",
    )
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("reindex", help="re-embed from the registry; swap or roll back the index")
    p.add_argument("mode", choices=["incremental", "full", "rollback"])
    p.add_argument("--tenant", default="", help="incremental only; empty = every tenant")
    p.add_argument("--model", default="", help="full: the new CLIP model (default: the active one)")
    p.add_argument("--pretrained", default="")
    p.add_argument("--checkpoint", default="", help="a local checkpoint file for --model")
    p.add_argument("--grace-hours", type=float, default=24.0, help="keep the old version this long")
    p.add_argument("--wait", action="store_true", help="show progress until it finishes")
    p.set_defaults(func=cmd_reindex)

    p = sub.add_parser("schedule", help="Temporal Schedules for re-indexes")
    p.add_argument("action", choices=["create", "list", "pause", "unpause", "trigger", "delete"])
    p.add_argument("--kind", choices=["incremental", "full"], default="incremental")
    p.add_argument("--tenant", default="")
    p.add_argument("--id", default="", help="schedule id (default: derived from kind and tenant)")
    p.add_argument(
        "--cron", default="", help="default: nightly 03:00 (incremental), Sunday 04:00 (full)"
    )
    p.add_argument("--model", default="")
    p.add_argument("--pretrained", default="")
    p.add_argument("--checkpoint", default="")
    p.add_argument("--catchup-hours", type=float, default=1.0, help="run missed actions this late")
    p.add_argument("--paused", action="store_true")
    p.set_defaults(func=cmd_schedule)

    p = sub.add_parser("forget", help="right to be forgotten: remove assets everywhere")
    p.add_argument("--tenant", required=True)
    p.add_argument("--asset-id", default="")
    p.add_argument("--uri-prefix", default="")
    p.add_argument("--tag", action="append", default=[], metavar="K=V")
    p.add_argument("--reason", default="", help="a ticket reference, not personal data")
    p.add_argument("--delete-object", action="store_true", help="also delete the stored object")
    p.add_argument("--allow-reingest", action="store_true")
    p.set_defaults(func=cmd_forget)

    p = sub.add_parser("events", help="GCS notifications (Pub/Sub push) -> ingest / forget")
    from starters.events import add_arguments as events_arguments

    events_arguments(p)  # credentials only from MMRAG_EVENTS_* settings, never flags
    p.set_defaults(func=cmd_events)

    p = sub.add_parser("watch", help="ingest what is new or changed under a prefix")
    p.add_argument("prefix")
    p.add_argument("--tenant", default="default")
    p.add_argument("--tag", action="append", default=[], metavar="K=V")
    p.add_argument("--interval", type=int, default=300, help="seconds between passes (0: once)")
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser(
        "token",
        help="workflow credentials: `issue` prints a token, `keygen` makes a signing key",
        description="A token goes in the `mmrag_auth` workflow header (mmrag clients read "
        "MMRAG_AUTH_TOKEN). Roles: reader (Ask), writer (+ ingest, watch, forget), operator "
        "(everything, every tenant). The signing key: MMRAG_AUTH_SIGNING_KEY_FILE, "
        "MMRAG_AUTH_SIGNING_KEY, or the local stack's.",
    )
    p.add_argument("action", choices=["issue", "keygen"])
    p.add_argument(
        "--tenant", action="append", default=[], help="repeatable; '*' (every tenant): operators"
    )
    p.add_argument("--role", choices=["reader", "writer", "operator"], default="")
    p.add_argument("--ttl", default="15m", help="lifetime: 30s, 15m, 2h, 7d (default 15m)")
    p.add_argument("--subject", default="", help="who it is for; audit rows of refusals name it")
    p.add_argument("--dir", default="", help="keygen: key directory (default: state_dir/auth)")
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("db", help="apply the Postgres migrations (Alembic) to MMRAG_DATABASE_URL")
    p.add_argument("action", choices=["upgrade"])
    p.set_defaults(func=cmd_db)

    p = sub.add_parser(
        "milvus",
        help="Milvus production setup: `provision-rbac` creates mmrag's users and roles",
        description="Run as root (MMRAG_MILVUS_TOKEN=root:<password>) against a Milvus with "
        "authorization enabled. Passwords: MMRAG_MILVUS_INGEST_PASSWORD, "
        "MMRAG_MILVUS_ENCODE_PASSWORD, MMRAG_MILVUS_QUERY_PASSWORD (a user whose variable is "
        "unset is not created). Idempotent; README, Milvus RBAC.",
    )
    p.add_argument("action", choices=["provision-rbac"])
    p.add_argument(
        "--reset-passwords",
        action="store_true",
        help="drop and re-create a user whose password differs from its variable",
    )
    p.set_defaults(func=cmd_milvus)

    p = sub.add_parser(
        "codec-server", help="/encode and /decode for the Web UI and `temporal --codec-endpoint`"
    )
    p.add_argument("--host", default=None, help="(default MMRAG_CODEC_SERVER_HOST, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="(default MMRAG_CODEC_SERVER_PORT, 8234)")
    p.add_argument(
        "--origin",
        action="append",
        default=None,
        metavar="URL",
        help="a Web UI origin allowed by CORS, repeatable (default MMRAG_CODEC_SERVER_ORIGINS)",
    )
    p.set_defaults(func=cmd_codec_server)

    p = sub.add_parser("temporal", help="Temporal cluster setup for production")
    p.add_argument("action", choices=["setup"], help="register mmrag's search attributes")
    p.add_argument("--namespace", default="", help="(default: TEMPORAL_NAMESPACE / profile)")
    p.add_argument("--dry-run", action="store_true", help="only report what is missing")
    p.set_defaults(func=cmd_temporal)

    p = sub.add_parser("demo", help="stack, workers, demo corpus, answers and the Web UI link")
    p.set_defaults(func=cmd_demo)
    return parser


def outage_message(error: BaseException) -> str | None:
    """One line naming the server that is down and what to do, or None for a bug."""
    from pymilvus.exceptions import MilvusException
    from sqlalchemy.exc import OperationalError

    from activities.store.vectors import VectorStoreAccessError, VectorStoreError

    if isinstance(error, VectorStoreAccessError):  # up, but refused these credentials
        return f"Milvus refused the request: {error.reason}; check MMRAG_MILVUS_TOKEN"
    if isinstance(error, OperationalError):
        return (
            "Postgres is unreachable (MMRAG_DATABASE_URL or the embedded stack): start it with "
            "`mmrag stack up` or check the database server"
        )
    if isinstance(error, MilvusException | VectorStoreError):
        detail = error.message if isinstance(error, MilvusException) else str(error)
        return (
            f"Milvus is unreachable or refused the request ({detail}): start it with "
            "`mmrag stack up` or check MMRAG_MILVUS_URI"
        )
    text = str(error)
    if isinstance(error, RuntimeError) and ("mmrag stack up" in text or "MMRAG_" in text):
        return text
    if isinstance(error, RuntimeError) and "Connection refused" in text:
        return f"a server refused the connection ({text}): is the stack up? `mmrag stack status`"
    return None


def workflow_failure_message(error: BaseException) -> str | None:
    """One line: the step that failed and its root cause (the Web UI keeps the history);
    None when ``error`` is not a failed workflow."""
    from temporalio.client import WorkflowFailureError
    from temporalio.exceptions import ActivityError, TimeoutError, TimeoutType

    if not isinstance(error, WorkflowFailureError):
        return None
    step, cause = "", error.cause
    while cause is not None:
        if isinstance(cause, ActivityError):
            step = cause.activity_type
        if cause.__cause__ is None:
            break
        cause = cause.__cause__
    where = f" at {step}" if step else ""
    if isinstance(cause, TimeoutError) and cause.type == TimeoutType.SCHEDULE_TO_START:
        return (
            f"the workflow failed{where}: no worker picked the task up in time; start a worker "
            "for its task queue (`mmrag worker --role ...`) and ask again"
        )
    if isinstance(cause, TimeoutError):
        return (
            f"the workflow failed{where}: {cause.type.name.lower() if cause.type else 'a'} timeout"
        )
    return f"the workflow failed{where}: {cause}"


def main(argv: Sequence[str] | None = None) -> int:
    from workers.auth import CredentialError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, ConnectionError, CredentialError) as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        failed = workflow_failure_message(e)
        message = failed or outage_message(e)
        if message is None:
            raise
        err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
        return 1 if failed else 2


if __name__ == "__main__":
    sys.exit(main())
