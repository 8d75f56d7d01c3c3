"""The ``mmrag`` command line: stack, workers, ingest, search and the demo.

Errors a user can fix (a server down, a bad path) print one line that says what to do
and exit non-zero; anything else is a bug and shows its traceback. A command that waits
on a workflow says what the workflow waits for (``starters/waiting.py``) instead of
sitting silent. Status lines go to stderr, results to stdout, so ``--json`` output parses.

One module of ~1,200 lines: the argument parser and one thin handler per verb; every
handler calls into starters/ (ask, ingest, lifecycle, runs, web, waiting, display), so
the parser, the one-line error rule and ``--json`` handling are defined once. Splitting it
per verb is the next step when it grows.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from rich.console import Console
from rich.markup import escape

from settings import WORKER_ROLES, get_settings
from starters.waiting import Notices, result_with_notices
from workers.temporal_client import run_client_command

if TYPE_CHECKING:
    from settings import Settings
    from workflows.contracts import AskInput, AskResult

console = Console(stderr=False)
err = Console(stderr=True)


class UserError(Exception):
    """Printed as one line, exit status 2."""


def say(text: str) -> None:
    """A status line for the person at the terminal (stderr: stdout holds results)."""
    err.print(f"[yellow]{escape(text)}[/yellow]", highlight=False, soft_wrap=True)


def status(text: str) -> None:
    err.print(text, highlight=False, soft_wrap=True)


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
            from starters.web.service import stop_background_server

            if stop_background_server(settings.state_dir):
                console.print("web app (mmrag serve) stopped")
            for line in _workers_still_polling(settings):
                say(line)
            for t in stack.down():
                how = "SIGKILL after its grace time" if t.killed else t.sig.name
                console.print(f"{t.name} stopped ({how}) in {t.took:.1f} s", highlight=False)
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


def _workers_still_polling(settings: Settings) -> list[str]:
    """Warnings for ``stack down``: workers that poll this stack's Temporal now. They
    outlive the stack, retrying its servers until it is back; nothing stops them but their
    owner. Empty when Temporal cannot be asked (it is down already)."""
    try:
        address = settings.stack_endpoint("temporal_address")
    except RuntimeError:
        return []

    async def pollers() -> list[str]:
        from temporalio.client import Client

        from starters.waiting import ROLE_OF_QUEUE, live_pollers

        client = await Client.connect(address, namespace=connect_namespace())
        seen: dict[str, set[str]] = {}
        for queue in ROLE_OF_QUEUE:
            for activities in (False, True):
                for p in await live_pollers(client, queue, activities):
                    seen.setdefault(p.identity, set()).add(queue)
        return [
            f"worker {identity} (task queues {', '.join(sorted(queues))}) still runs: it will "
            "retry until the stack is back; stop it with Ctrl+C (or SIGTERM) where it runs"
            for identity, queues in sorted(seen.items())
        ]

    try:
        return run_client_command(asyncio.wait_for(pollers(), timeout=10))
    except Exception:  # Temporal down or slow: stopping the stack matters more
        return []


def connect_namespace() -> str:
    from workers.temporal_client import connect_config

    return str(connect_config().get("namespace") or "default")


# -- worker ---------------------------------------------------------------------------
def cmd_worker(args: argparse.Namespace) -> int:
    from starters.weights import missing_weights

    problem = missing_weights(get_settings(), args.role)
    if problem:
        raise UserError(problem)
    from workers.run import run_workers

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        run_client_command(run_workers(args.role))
    except ValueError as e:  # a setting the worker cannot start with (model, device, keys)
        raise UserError(str(e).strip().splitlines()[0]) from None
    return 0


# -- ingest ---------------------------------------------------------------------------
def cmd_ingest(args: argparse.Namespace) -> int:
    return run_client_command(_ingest(args))


async def _ingest(args: argparse.Namespace) -> int:
    from activities.store.objects import normalize_uri
    from starters.ingest import follow, print_summary, result_json, start_ingest
    from workers.temporal_client import connect

    if args.json and not args.wait:
        raise UserError(
            "--json prints the ingest's result, which exists only when it ends: add --wait"
        )
    try:
        for source in args.sources:
            normalize_uri(source)
    except ValueError as e:
        raise UserError(str(e)) from e

    from starters.display import display_uri
    from starters.ingest import register_local_roots

    for root in register_local_roots(
        get_settings().state_dir, args.tenant, [normalize_uri(s) for s in args.sources]
    ):
        status(f"storage root of tenant {args.tenant} on this stack: {display_uri(root)}")
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
    status(f"started IngestBatch {handle.id}")
    if not args.wait:
        return 0
    try:
        result = await follow(handle, err, client)
    except asyncio.CancelledError:
        status(
            f"stopped following; IngestBatch {handle.id} keeps running (the same command "
            "attaches to it again)"
        )
        raise
    if args.json:
        print(result_json(result))
    else:
        print_summary(result, console)
    return 1 if result.failed else 0


# -- search ---------------------------------------------------------------------------
def cmd_search(args: argparse.Namespace) -> int:
    return run_client_command(_search(args))


async def _search(args: argparse.Namespace) -> int:
    """An Ask without generation or re-ranking: the nearest chunks, encoded by the workers
    with the model the index was built with (one query path; the CLI loads no model)."""
    from starters.display import display_uri
    from workflows.contracts import AskInput

    inp = AskInput(
        tenant=args.tenant,
        text=args.text,
        top_k=_top_k(args.top_k),
        rerank=False,
        generate=False,
    )
    result = await _run_ask(inp, args.queue, args.tenant_given)
    if not result.sources:
        console.print("no results")
    for rank, s in enumerate(result.sources, 1):
        console.print(
            f"{rank}. {s.score:.3f}  {display_uri(s.uri)}  ({s.chunk})",
            highlight=False,
            markup=False,
        )
    console.print(
        f"[dim]index v{result.index_version}, encoder {escape(result.encoder_model)}[/dim]",
        highlight=False,
    )
    return 0


def _top_k(value: int) -> int:
    from starters.ask import check_top_k

    try:
        return check_top_k(value)
    except ValueError as e:
        raise UserError(str(e)) from None


async def _run_ask(inp: AskInput, queue: str, tenant_given: bool) -> AskResult:
    """Run an Ask for the CLI: on the queue ``--queue`` picks (auto: moved to the main
    queue when no query worker takes it), saying what it waits for; when it finds nothing,
    say where the data lives."""
    from starters.ask import ask, ask_task_queue
    from workers.temporal_client import connect
    from workflows.contracts import TASK_QUEUE

    client = await connect()
    task_queue = await ask_task_queue(client, queue)
    result = await ask(
        client,
        inp,
        task_queue,
        say=say,
        fallback_queue=TASK_QUEUE if queue == "auto" else "",
    )
    if not result.sources:
        hint = _where_data_lives(inp.tenant, tenant_given)
        if hint:
            say(hint)
    return result


def _where_data_lives(tenant: str, tenant_given: bool) -> str:
    """Why an Ask found nothing, when the registry can tell: the tenant holds no indexed
    content. Other tenants are named only to an operator (the CLI minting operator tokens
    from the signing key, with the database owner's URL); otherwise nothing is said."""
    from starters.ask import tenants_with_content

    settings = get_settings()
    operator = not settings.auth_token.get_secret_value()
    try:
        counts = tenants_with_content(settings) if operator else None
    except Exception:  # no database here (a remote cluster): the hint is optional
        return ""
    if counts is None or counts.get(tenant):
        return ""  # the tenant has content: the question or the filters matched nothing
    default = "" if tenant_given else " (--tenant defaults to 'default')"
    if not counts:
        return "nothing is indexed yet: `mmrag ingest PATH --tenant NAME --wait` first"
    where = ", ".join(f"{name} ({n})" for name, n in list(counts.items())[:10])
    return (
        f"tenant {tenant!r} has no indexed content{default}; tenants with indexed assets: "
        f"{where}: pass --tenant NAME"
    )


# -- ask ------------------------------------------------------------------------------
def cmd_ask(args: argparse.Namespace) -> int:
    return run_client_command(_ask(args))


async def _ask(args: argparse.Namespace) -> int:
    from starters.ask import image_fields, parse_filters, print_answer, result_json
    from workflows.contracts import AskInput

    top_k = _top_k(args.top_k)
    if args.max_tokens < 1:
        raise UserError(f"--max-tokens {args.max_tokens}: give 1 or more (default 300)")
    try:
        filters = parse_filters(args.filter)
        image = image_fields(args.image)
    except ValueError as e:
        raise UserError(str(e)) from e
    if not args.question and not image:
        raise UserError("ask needs a question, --image, or both")
    inp = AskInput(
        tenant=args.tenant,
        text=args.question,
        top_k=top_k,
        filters=filters,
        rerank=not args.no_rerank,
        generate=not args.no_generate,
        max_answer_tokens=args.max_tokens,
        **image,
    )
    result = await _run_ask(inp, args.queue, args.tenant_given)
    if args.json:
        print(result_json(result))
    else:
        print_answer(result, console)
    return 0


# -- lifecycle ------------------------------------------------------------------------
def cmd_reindex(args: argparse.Namespace) -> int:
    return run_client_command(_reindex(args))


async def _reindex(args: argparse.Namespace) -> int:
    from starters.lifecycle import reindex_flags_problem, start_reindex
    from workers.temporal_client import connect
    from workflows.contracts import ReindexInput, ReindexProgress

    problem = reindex_flags_problem(
        args.mode, args.tenant, args.model, args.pretrained, args.checkpoint
    )
    if problem:
        raise UserError(f"reindex {args.mode}: {problem}")
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
    status(f"started Reindex {handle.id}")
    if not args.wait:
        return 0
    notices = Notices(client, say)
    result_task = asyncio.ensure_future(handle.result())
    last = ""
    try:
        while not result_task.done():
            await asyncio.wait([result_task], timeout=2)
            if result_task.done():
                break
            try:
                p = await handle.query(
                    "progress", result_type=ReindexProgress, rpc_timeout=timedelta(seconds=3)
                )
                line = f"  {p.phase}: {p.done}/{p.total} ({p.failed} failed, {p.rate_per_s}/s"
                line += f", eta {p.eta_s:.0f}s)" if p.eta_s >= 0 else ")"
                if line != last:
                    status(line)
                    last = line
            except Exception:  # no worker yet, or between continue-as-new runs
                pass
            await notices.check(handle)
    finally:
        if not result_task.done():
            result_task.cancel()
    r = result_task.result()
    console.print(
        f"{r.mode}: active index v{r.index_version} (was v{r.previous_version}); "
        f"{r.embedded} re-embedded, {r.failed} failed"
        + (f", verified {r.verified_assets} assets, alias swapped" if r.swapped else "")
    )
    if r.still_failing:
        console.print(
            f"{r.still_failing} still failing: unchanged since they failed, so not retried "
            "(they are retried once the object changes; `mmrag forget` removes them)",
            highlight=False,
        )
    from starters.display import print_failures

    shown = r.failed + r.still_failing
    print_failures(r.failures, shown, console, f"workflow {handle.id} in the Temporal Web UI")
    return 1 if r.failed else 0  # only new failures: a still-failing file fails no run


def cmd_schedule(args: argparse.Namespace) -> int:
    return run_client_command(_schedule(args))


async def _schedule(args: argparse.Namespace) -> int:
    from starters.lifecycle import create_schedule, list_schedules, schedule_action, schedule_id
    from workers.temporal_client import connect

    client = await connect()
    if args.action == "list":
        rows = await list_schedules(client)
        if not rows:
            console.print("no mmrag schedules (`mmrag schedule create` makes one)")
        for row in rows:
            state = "paused" if row.paused else "active"
            console.print(
                f"{row.id:40} {state:7} {row.cron:20} {row.note}", highlight=False, markup=False
            )
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
    sid = args.id or schedule_id(args.kind, args.tenant)
    try:
        await schedule_action(client, args.action, sid)
    except LookupError as e:
        raise UserError(str(e)) from None
    console.print(f"{args.action}: {sid}", highlight=False)
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
    status(f"started Forget {handle.id}")
    result = await result_with_notices(handle, Notices(client, say))
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
    from starters.display import display_uri
    from starters.ingest import register_local_roots
    from starters.lifecycle import start_watch
    from workers.temporal_client import connect
    from workflows.contracts import WatchPrefixInput

    try:
        prefix = normalize_uri(args.prefix)
    except ValueError as e:
        raise UserError(str(e)) from e
    for root in register_local_roots(get_settings().state_dir, args.tenant, [prefix]):
        status(f"storage root of tenant {args.tenant} on this stack: {display_uri(root)}")
    client = await connect()
    handle = await start_watch(
        client,
        WatchPrefixInput(args.tenant, prefix, _parse_tags(args.tag), args.interval),
    )
    status(f"started WatchPrefix {handle.id}")
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


# -- web app and API keys (starters/web/, docs/web.md) ---------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    """The web app and HTTP API; checks what it needs first, so a missing signing key or a
    stopped stack is one line, not a server that fails its start-up."""
    from starters.web.app import server
    from workers.auth import signing_key_from_settings
    from workers.temporal_client import connect

    settings = get_settings()
    host, port = args.host or settings.web_host, args.port or settings.web_port
    if signing_key_from_settings(settings) is None:
        raise UserError(
            "mmrag serve mints a workflow credential for each API key: set "
            "MMRAG_AUTH_SIGNING_KEY_FILE (or run it where `mmrag stack up` created one)"
        )
    try:
        settings.for_database_role("query").database_endpoint()
    except RuntimeError as e:
        raise UserError(str(e)) from None

    async def reachable() -> None:
        await connect(settings, token="")

    run_client_command(reachable())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    status(f"mmrag web app: http://{host}:{port}/ (API docs: http://{host}:{port}/docs)")
    srv = server(settings, host, port)
    srv.run()
    return 0 if srv.started else 2


def cmd_apikey(args: argparse.Namespace) -> int:
    """API keys of `mmrag serve`, with the database owner's URL (as `mmrag db upgrade`)."""
    import getpass
    import uuid

    from sqlalchemy.orm import Session

    from activities.store.registry import AuditRecord, get_engine, write_audit
    from starters.web.keys import create_key, list_keys, revoke_key

    engine = get_engine(get_settings().database_endpoint())
    actor = f"{getpass.getuser()} via mmrag apikey"

    def audited(tenant: str, action: str, details: dict[str, str]) -> None:
        with Session(engine) as session, session.begin():
            record = AuditRecord(
                tenant, action, f"apikey/{uuid.uuid4().hex}", actor=actor, details=details
            )
            write_audit(session, [record])

    if args.action == "create":
        if not args.tenant_given:
            raise UserError("apikey create needs --tenant (a key reaches that tenant only)")
        try:
            key, secret = create_key(engine, args.tenant, args.role, args.name)
        except ValueError as e:
            raise UserError(str(e)) from None
        audited(key.tenant, "apikey_created", {"key_id": key.key_id, "role": key.role})
        status(f"API key {key.key_id}: {key.role} of tenant {key.tenant}; shown once, keep it")
        print(secret)
    elif args.action == "list":
        for row in list_keys(engine, args.tenant if args.tenant_given else ""):
            state = f"revoked {row.revoked_at:%Y-%m-%d}" if row.revoked_at else "live"
            console.print(
                f"{row.key_id}  {row.role:6}  {row.tenant}  {state}  {row.name}",
                highlight=False,
                markup=False,
            )
    else:
        if not args.key_id:
            raise UserError("apikey revoke needs the key's id (`mmrag apikey list` shows them)")
        rows = {r.key_id: r for r in list_keys(engine)}
        if not revoke_key(engine, args.key_id):
            raise UserError(f"no live API key {args.key_id[:20]!r}: see `mmrag apikey list`")
        revoked = next(
            (r for k, r in rows.items() if args.key_id.startswith(("mmrag_" + k, k))), None
        )
        if revoked is not None:
            audited(revoked.tenant, "apikey_revoked", {"key_id": revoked.key_id})
        status("revoked; servers stop accepting it within MMRAG_WEB_KEY_CACHE_S")
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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default in ``--help`` (unless its help names one already), and
    descriptions kept as written (paragraphs, lists)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            "default" in text.lower()
            or action.default in (None, "", False, [], argparse.SUPPRESS)
            or not (action.option_strings or action.nargs in ("?", "*"))
        ):
            return text
        return f"{text} (default: %(default)s)".lstrip()


class _TenantGiven(argparse.Action):
    """``--tenant`` that remembers it was given, so an empty answer in the default tenant
    can say that the default was used."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        namespace.tenant_given = True


def _verb(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help: str,
    more: str = "",
) -> argparse.ArgumentParser:
    """A sub-command whose ``--help`` starts with its one-line help, then ``more``."""
    return sub.add_parser(
        name,
        help=help,
        description=help[0].upper() + help[1:] + (".\n\n" + more if more else "."),
        formatter_class=HelpFormatter,
    )


def _tenant_option(p: argparse.ArgumentParser, help: str = "the tenant to use") -> None:
    p.add_argument("--tenant", default="default", action=_TenantGiven, help=help)
    p.set_defaults(tenant_given=False)


def _queue_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--queue",
        choices=["auto", "mmrag", "mmrag-query"],
        default="auto",
        help="task queue to start the Ask on; auto: mmrag-query when a query worker polls it "
        "(asked again on mmrag if none takes it), else mmrag",
    )


WORKER_HELP = """\
Roles (one per process in production; `all` runs every role in one, for development):
  cpu       workflows, storage, Milvus and Postgres activities     task queue mmrag
  encode    CLIP encoding of ingest batches and query text/images   mmrag-gpu-encode
  generate  LLM answers (OPENAI_API_KEY, OPENAI_BASE_URL,           mmrag-gpu-generate
            MMRAG_LLM_MODEL; without a key answers are extractive)
  query     Asks with their own warm model (the fast path)          mmrag-query
Ingest, re-index and forget need cpu and encode; an Ask needs cpu and encode, or query
(`mmrag ask --queue auto` picks), and generate for a generated answer.

Model settings (encode, query, all load the model before polling):
  MMRAG_CLIP_MODEL       open_clip architecture (default ViT-B-32)
  MMRAG_CLIP_PRETRAINED  its pretrained tag (default laion2b_s34b_b79k), downloaded once
                         into the Hugging Face cache (HF_HOME; HF_HUB_OFFLINE=1: no download)
  MMRAG_CLIP_CHECKPOINT  a local weights file instead of the tag (wins over it)
  MMRAG_DEVICE           auto | cpu | cuda | cuda:N (default auto)
A new index is built with the configured model; Asks use the model of the index they read.
Stop a worker with Ctrl+C or SIGTERM: running activities get MMRAG_GRACEFUL_SHUTDOWN_SECONDS.
"""

STACK_HELP = """\
  up      start the Temporal dev server (Web UI on :8233), Milvus and Postgres in the
          background and apply the migrations; data in MMRAG_STATE_DIR (default .mmrag)
          survives restarts. Idempotent: running servers are kept.
  down    stop the demo's background worker and every server (data stays); warns about
          workers still polling, which outlive the stack
  status  each server's pid, endpoint and whether it answers (exit 1 when one does not)
"""


def build_parser() -> argparse.ArgumentParser:
    from starters.ask import FILTER_KEYS

    parser = argparse.ArgumentParser(
        prog="mmrag",
        description="mmrag: durable multimodal RAG on Temporal. Ingest images, PDFs and video "
        "into a CLIP index in Milvus, then ask questions answered with cited sources.",
        epilog="First steps: `mmrag stack up`, `mmrag worker` (another terminal), "
        '`mmrag ingest ./photos --wait`, `mmrag ask "a red circle"`. '
        "`mmrag COMMAND --help` describes each command.",
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _verb(sub, "stack", "start, stop or inspect the embedded services", STACK_HELP)
    p.add_argument("action", choices=["up", "down", "status"], help="see above")
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

    p = _verb(sub, "worker", "run workers for one role or all", WORKER_HELP)
    p.add_argument(
        "--role",
        choices=["all", *WORKER_ROLES],
        default="all",
        help="which task queues this process serves (see above)",
    )
    p.set_defaults(func=cmd_worker)

    p = _verb(
        sub,
        "ingest",
        "ingest files, folders, file:// or gs:// URIs",
        "Starting the same ingest again attaches to the running one; running it later skips "
        "unchanged objects. Local folders become storage roots of the tenant on this stack.",
    )
    p.add_argument("sources", nargs="+", metavar="PATH_OR_URI")
    _tenant_option(p, "the tenant the assets belong to")
    p.add_argument("--tag", action="append", default=[], metavar="K=V", help="repeatable")
    p.add_argument("--force", action="store_true", help="re-encode unchanged objects")
    p.add_argument(
        "--allow-forgotten",
        action="store_true",
        help="re-ingest objects that were forgotten (`mmrag forget`); otherwise skipped",
    )
    p.add_argument(
        "--batch-size", type=int, default=0, help="objects per encode batch (0: the worker's)"
    )
    p.add_argument("--wait", action="store_true", help="show progress and a summary")
    p.add_argument(
        "--json",
        action="store_true",
        help="with --wait: print only the result as JSON on stdout (status lines on stderr)",
    )
    p.set_defaults(func=cmd_ingest)

    p = _verb(
        sub,
        "search",
        "nearest-neighbour search by text",
        "An Ask without generation or re-ranking: the workers encode the text with the "
        "model the index was built with; needs a running worker.",
    )
    p.add_argument("text")
    _tenant_option(p)
    p.add_argument("--top-k", type=int, default=5, help="results to return")
    _queue_option(p)
    p.set_defaults(func=cmd_search)

    p = _verb(
        sub,
        "ask",
        "ask a question; answer with cited sources",
        "Text, an image (--image), or both. With no LLM configured on the generate worker, "
        "or with --no-generate, the answer is extractive.",
    )
    p.add_argument("question", nargs="?", default="", help="the question (optional with --image)")
    p.add_argument(
        "--image", default="", metavar="PATH|URI", help="query image (image or hybrid search)"
    )
    _tenant_option(p)
    p.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"{FILTER_KEYS} (repeatable)",
    )
    p.add_argument("--top-k", type=int, default=5, help="sources to return")
    p.add_argument("--no-rerank", action="store_true", help="keep the vector order")
    p.add_argument("--no-generate", action="store_true", help="retrieval only (extractive answer)")
    p.add_argument("--max-tokens", type=int, default=300, help="longest generated answer")
    p.add_argument(
        "--json",
        action="store_true",
        help="print only the Ask result contract as JSON on stdout (status lines on stderr)",
    )
    _queue_option(p)
    p.set_defaults(func=cmd_ask)

    p = _verb(
        sub,
        "reindex",
        "re-embed from the registry; swap or roll back the index",
        "incremental: objects that changed, failed or were embedded by an older version; "
        "full: a new index version with --model, verified, then the alias swapped; "
        "rollback: the alias back to the previous version.",
    )
    p.add_argument("mode", choices=["incremental", "full", "rollback"])
    p.add_argument("--tenant", default="", help="incremental only; empty = every tenant")
    p.add_argument("--model", default="", help="full: the new CLIP model (default: the active one)")
    p.add_argument("--pretrained", default="", help="full: its pretrained tag")
    p.add_argument("--checkpoint", default="", help="a local checkpoint file for --model")
    p.add_argument("--grace-hours", type=float, default=24.0, help="keep the old version this long")
    p.add_argument("--wait", action="store_true", help="show progress until it finishes")
    p.set_defaults(func=cmd_reindex)

    p = _verb(
        sub,
        "schedule",
        "Temporal Schedules for re-indexes",
        "create: a schedule per kind and tenant (id mmrag-reindex-KIND-TENANT); list: every "
        "mmrag schedule with its cron; pause, unpause, trigger, delete: by --id, or the "
        "--kind and --tenant it was created with.",
    )
    p.add_argument("action", choices=["create", "list", "pause", "unpause", "trigger", "delete"])
    p.add_argument("--kind", choices=["incremental", "full"], default="incremental")
    p.add_argument("--tenant", default="", help="incremental only; empty = every tenant")
    p.add_argument("--id", default="", help="schedule id (default: derived from kind and tenant)")
    p.add_argument(
        "--cron",
        default="",
        help="minute hour day-of-month month day-of-week (default: '0 3 * * *' for "
        "incremental, '0 4 * * 0' for full)",
    )
    p.add_argument("--model", default="", help="full: the new CLIP model")
    p.add_argument("--pretrained", default="", help="full: its pretrained tag")
    p.add_argument("--checkpoint", default="", help="full: a local checkpoint file")
    p.add_argument("--catchup-hours", type=float, default=1.0, help="run missed actions this late")
    p.add_argument("--paused", action="store_true", help="create it paused")
    p.set_defaults(func=cmd_schedule)

    p = _verb(
        sub,
        "forget",
        "right to be forgotten: remove assets everywhere",
        "Removes the assets' vectors from every index version and marks them forgotten in "
        "the registry (a later ingest skips them unless --allow-reingest here or "
        "--allow-forgotten there); an audit row records it. Say what to forget with "
        "--asset-id, --uri-prefix or --tag.",
    )
    p.add_argument("--tenant", required=True, help="the tenant whose assets are forgotten")
    p.add_argument("--asset-id", default="", help="one asset")
    p.add_argument("--uri-prefix", default="", help="every asset under this URI prefix")
    p.add_argument(
        "--tag", action="append", default=[], metavar="K=V", help="assets with every tag given"
    )
    p.add_argument("--reason", default="", help="a ticket reference, not personal data")
    p.add_argument("--delete-object", action="store_true", help="also delete the stored object")
    p.add_argument(
        "--allow-reingest", action="store_true", help="let a later ingest index them again"
    )
    p.set_defaults(func=cmd_forget)

    p = _verb(
        sub,
        "events",
        "GCS notifications (Pub/Sub push) -> ingest / forget",
        "An HTTP endpoint for Pub/Sub push subscriptions of a bucket: a finalized object is "
        "ingested, a deleted one forgotten. Credentials and allowed buckets come only from "
        "MMRAG_EVENTS_* settings (docs/lifecycle.md).",
    )
    from starters.events import add_arguments as events_arguments

    events_arguments(p)  # credentials only from MMRAG_EVENTS_* settings, never flags
    p.set_defaults(func=cmd_events)

    p = _verb(
        sub,
        "watch",
        "ingest what is new or changed under a prefix",
        "Starts a WatchPrefix workflow that lists the prefix every --interval seconds and "
        "ingests new or changed objects; it runs until terminated (Web UI or `temporal "
        "workflow terminate`). Starting it again for the same prefix attaches.",
    )
    p.add_argument("prefix", metavar="PATH_OR_URI")
    _tenant_option(p, "the tenant the assets belong to")
    p.add_argument("--tag", action="append", default=[], metavar="K=V", help="repeatable")
    p.add_argument("--interval", type=int, default=300, help="seconds between passes (0: once)")
    p.set_defaults(func=cmd_watch)

    p = _verb(
        sub,
        "token",
        "workflow credentials: `issue` prints a token, `keygen` makes a signing key",
        "A token goes in the `mmrag_auth` workflow header (mmrag clients read "
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

    p = _verb(
        sub,
        "serve",
        "the web app and HTTP API (search page, /v1, OpenAPI at /docs)",
        "Starts every ask, ingest and forget as a workflow with a credential minted for the "
        "caller's API key (`mmrag apikey create`). Settings MMRAG_WEB_* (docs/web.md).",
    )
    p.add_argument("--host", default=None, help="(default MMRAG_WEB_HOST, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="(default MMRAG_WEB_PORT, 8080)")
    p.set_defaults(func=cmd_serve)

    p = _verb(
        sub,
        "apikey",
        "API keys of `mmrag serve`: create, list, revoke",
        "A key maps to one tenant and one role (reader: ask, browse, previews; writer: + "
        "ingest, forget). Only a digest is stored; `create` prints the key once. Uses the "
        "database owner's URL (MMRAG_DATABASE_URL or the local stack's).",
    )
    p.add_argument("action", choices=["create", "list", "revoke"])
    p.add_argument("key_id", nargs="?", default="", help="revoke: the key's id (or the key)")
    _tenant_option(p, "create: the key's tenant; list: only this tenant's keys")
    p.add_argument("--role", default="reader", help="create: reader (default) or writer")
    p.add_argument("--name", default="", help="create: what the key is for")
    p.set_defaults(func=cmd_apikey)

    p = _verb(
        sub,
        "db",
        "apply the Postgres migrations (Alembic) to MMRAG_DATABASE_URL",
        "As the database owner; then sets each worker login's password from "
        "MMRAG_DB_INGEST_PASSWORD / MMRAG_DB_QUERY_PASSWORD when set. `mmrag stack up` "
        "does this for the embedded Postgres.",
    )
    p.add_argument("action", choices=["upgrade"])
    p.set_defaults(func=cmd_db)

    p = _verb(
        sub,
        "milvus",
        "Milvus production setup: `provision-rbac` creates mmrag's users and roles",
        "Run as root (MMRAG_MILVUS_TOKEN=root:<password>) against a Milvus with "
        "authorization enabled. Passwords: MMRAG_MILVUS_INGEST_PASSWORD, "
        "MMRAG_MILVUS_ENCODE_PASSWORD, MMRAG_MILVUS_QUERY_PASSWORD (a user whose variable is "
        "unset is not created). Idempotent; docs/security-reference.md, Milvus RBAC.",
    )
    p.add_argument("action", choices=["provision-rbac"])
    p.add_argument(
        "--reset-passwords",
        action="store_true",
        help="drop and re-create a user whose password differs from its variable",
    )
    p.set_defaults(func=cmd_milvus)

    p = _verb(
        sub,
        "codec-server",
        "/encode and /decode for the Web UI and `temporal --codec-endpoint`",
        "Decrypts payloads for a person looking at histories when payload encryption "
        "(MMRAG_CODEC_*) is on; requests need MMRAG_CODEC_SERVER_TOKEN (docs/operations.md).",
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

    p = _verb(
        sub,
        "temporal",
        "Temporal cluster setup for production",
        "Registers the search attributes mmrag's workflows set (the dev server of "
        "`mmrag stack up` gets them at start).",
    )
    p.add_argument("action", choices=["setup"], help="register mmrag's search attributes")
    p.add_argument("--namespace", default="", help="(default: TEMPORAL_NAMESPACE / profile)")
    p.add_argument("--dry-run", action="store_true", help="only report what is missing")
    p.set_defaults(func=cmd_temporal)

    p = _verb(
        sub,
        "demo",
        "stack, workers, demo corpus, answers and the Web UI link",
        "Leaves the stack and a background worker running; `mmrag stack down` stops both.",
    )
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


def exit_now(status: int) -> NoReturn:
    """Leave without finalising the interpreter, after Ctrl+C.

    Ctrl+C can leave a Temporal RPC in flight (the long poll for a result, a query). When
    it completes during interpreter finalisation, the SDK's Rust runtime waits for a thread
    that pyo3 parks for ever because Python is finalising: the process hung until SIGKILL
    (gdb: the main thread in ``BlockingPool::drop``, a tokio thread in pyo3's
    ``HangThread``). The command has nothing left to clean up by then (an Ask it started is
    already terminated), so it flushes its output and exits."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main(argv: Sequence[str] | None = None) -> int:
    from workers.auth import CredentialError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, ConnectionError, CredentialError) as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        if argv is None:  # the mmrag process itself (not a caller in Python)
            exit_now(130)
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
