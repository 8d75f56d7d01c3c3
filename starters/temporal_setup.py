"""``mmrag temporal setup``: register mmrag's custom search attributes on a Temporal cluster.

The workflows upsert ``workflows.contracts.SEARCH_ATTRIBUTES`` (tenant, source, asset id,
index version, outcome); a namespace that lacks one fails those workflow tasks. The
embedded dev server gets them from ``mmrag stack up``; a production cluster gets them here,
through the operator service (``workers.search_attributes``, the function ``stack up``
uses too), with the same connection settings as everything else (``TEMPORAL_ADDRESS`` /
``TEMPORAL_NAMESPACE`` / ``TEMPORAL_API_KEY`` / TLS / ``temporal.toml`` profile).

Idempotent: attributes that exist with the right type are left alone, missing ones are
added, and one that exists with another type is reported (a type cannot be changed in
place) with exit status 1. Temporal Cloud namespaces that refuse the operator call get the
``tcld`` command to run instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence

from temporalio.service import RPCError, RPCStatusCode

from workers.search_attributes import register_search_attributes
from workflows.contracts import SEARCH_ATTRIBUTES


def tcld_command(namespace: str, wanted: Mapping[str, str] = SEARCH_ATTRIBUTES) -> str:
    attrs = " ".join(f'--search-attribute "{n}={k}"' for n, k in wanted.items())
    return f"tcld namespace search-attributes add --namespace {namespace} {attrs}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["setup"], help="register mmrag's search attributes")
    parser.add_argument("--namespace", default="", help="(default: TEMPORAL_NAMESPACE / profile)")
    parser.add_argument("--dry-run", action="store_true", help="only report what is missing")


async def _setup(args: argparse.Namespace) -> int:
    from workers.temporal_client import connect

    client = await connect()
    namespace = args.namespace or client.namespace
    try:
        report = await register_search_attributes(client, namespace, dry_run=args.dry_run)
    except RPCError as e:
        if e.status in (RPCStatusCode.PERMISSION_DENIED, RPCStatusCode.UNIMPLEMENTED):
            print(
                f"error: the cluster refused to manage search attributes on {namespace} "
                f"({e.message}). On Temporal Cloud run:\n  {tcld_command(namespace)}",
                file=sys.stderr,
            )
            return 2
        raise RuntimeError(
            f"search attribute setup on namespace {namespace} failed: {e.message} "
            "(check TEMPORAL_NAMESPACE and that the namespace exists)"
        ) from e
    verb = "missing" if args.dry_run else "added"
    print(f"namespace {report.namespace}:")
    for name in report.added:
        print(f"  {verb:8} {name} ({SEARCH_ATTRIBUTES[name]})")
    for name in report.present:
        print(f"  {'present':8} {name} ({SEARCH_ATTRIBUTES[name]})")
    for name, why in report.conflicts.items():
        print(f"  CONFLICT {name}: {why}; remove it or rename mmrag's attribute", file=sys.stderr)
    return 0 if report.ok else 1


def main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(prog="mmrag temporal", description=__doc__)
        add_arguments(parser)
        args = parser.parse_args(args)
    from workers.temporal_client import run_client_command

    return run_client_command(_setup(args))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (RuntimeError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
