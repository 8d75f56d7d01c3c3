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

from rich.console import Console

from workers.settings import get_settings

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
    asyncio.run(run_workers(args.role))
    return 0


# -- ingest ---------------------------------------------------------------------------
def cmd_ingest(args: argparse.Namespace) -> int:
    return asyncio.run(_ingest(args))


async def _ingest(args: argparse.Namespace) -> int:
    from starters.ingest import follow, print_summary, result_json, start_ingest
    from workers.temporal_client import connect

    client = await connect()
    options = {}
    if args.batch_size:
        options["batch_size"] = args.batch_size
    handle = await start_ingest(
        client, args.tenant, args.sources, _parse_tags(args.tag), force=args.force, **options
    )
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
    return asyncio.run(_ask(args))


async def _ask(args: argparse.Namespace) -> int:
    from starters.ask import ask, image_fields, parse_filters, print_answer, result_json
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
    )
    if args.json:
        print(result_json(result))
    else:
        print_answer(result, console)
    return 0


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
    p.add_argument("--role", choices=["all", "cpu", "encode", "generate"], default="all")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("ingest", help="ingest files, folders, file:// or gs:// URIs")
    p.add_argument("sources", nargs="+", metavar="PATH_OR_URI")
    p.add_argument("--tenant", default="default")
    p.add_argument("--tag", action="append", default=[], metavar="K=V")
    p.add_argument("--force", action="store_true", help="re-encode unchanged objects")
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
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("demo", help="stack, workers, demo corpus, answers and the Web UI link")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, ConnectionError) as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        return 2
    except RuntimeError as e:
        if "mmrag stack up" in str(e) or "MMRAG_" in str(e):
            err.print(f"[red]error:[/red] {e}", highlight=False)
            return 2
        raise
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
