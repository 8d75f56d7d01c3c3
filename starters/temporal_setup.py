"""``mmrag temporal setup``: register mmrag's custom search attributes on a Temporal cluster.

The workflows upsert ``workflows.contracts.SEARCH_ATTRIBUTES`` (tenant, source, asset id,
index version, outcome); a namespace that lacks one fails those workflow tasks. The
embedded dev server gets them from ``mmrag stack up``; a production cluster gets them here,
through the operator service (``AddSearchAttributes``), with the same connection settings
as everything else (``TEMPORAL_ADDRESS`` / ``TEMPORAL_NAMESPACE`` / ``TEMPORAL_API_KEY`` /
TLS / ``temporal.toml`` profile).

Idempotent: attributes that exist with the right type are left alone, missing ones are
added, and one that exists with another type is reported (a type cannot be changed in
place) with exit status 1. Temporal Cloud namespaces that refuse the operator call get the
``tcld`` command to run instead.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from workflows.contracts import SEARCH_ATTRIBUTES


def indexed_value_type(kind: str) -> IndexedValueType.ValueType:
    """``"KeywordList"`` -> ``INDEXED_VALUE_TYPE_KEYWORD_LIST``."""
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", kind).upper()
    return IndexedValueType.Value(f"INDEXED_VALUE_TYPE_{snake}")


def type_name(value: IndexedValueType.ValueType) -> str:
    name = IndexedValueType.Name(value).removeprefix("INDEXED_VALUE_TYPE_")
    return "".join(part.capitalize() for part in name.split("_"))


@dataclass
class SetupReport:
    namespace: str
    added: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    conflicts: dict[str, str] = field(default_factory=dict)  # name -> "has X, needs Y"

    @property
    def ok(self) -> bool:
        return not self.conflicts


async def register_search_attributes(
    client: Client,
    namespace: str | None = None,
    wanted: Mapping[str, str] = SEARCH_ATTRIBUTES,
    dry_run: bool = False,
) -> SetupReport:
    """Add the missing attributes of ``wanted`` to ``namespace`` (default: the client's)."""
    namespace = namespace or client.namespace
    report = SetupReport(namespace)
    existing = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=namespace)
    )
    have = {**existing.system_attributes, **existing.custom_attributes}
    missing: dict[str, IndexedValueType.ValueType] = {}
    for name, kind in wanted.items():
        needed = indexed_value_type(kind)
        if name not in have:
            missing[name] = needed
        elif have[name] == needed:
            report.present.append(name)
        else:
            report.conflicts[name] = f"exists as {type_name(have[name])}, mmrag needs {kind}"
    if missing and not dry_run:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(namespace=namespace, search_attributes=missing)
        )
    report.added = list(missing)
    return report


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
