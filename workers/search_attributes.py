"""Registering mmrag's custom search attributes on a namespace: the one function that both
``mmrag stack up`` (the embedded dev server, stack/servers.py) and ``mmrag temporal setup``
(a production cluster, starters/temporal_setup.py) call.

The workflows upsert ``workflows.contracts.SEARCH_ATTRIBUTES``; a namespace that lacks one
fails those workflow tasks. Registration goes through the operator service
(``AddSearchAttributes``) and is idempotent: attributes that exist with the right type are
left alone, missing ones are added, and one that exists with another type is reported as a
conflict (a type cannot be changed in place), never "fixed". It lives in ``workers`` because
that is the lowest layer both the stack and the starters may import that talks to Temporal.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.client import Client

from workflows.contracts import SEARCH_ATTRIBUTES


def indexed_value_type(kind: str) -> IndexedValueType.ValueType:
    """``"KeywordList"`` -> ``INDEXED_VALUE_TYPE_KEYWORD_LIST``."""
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", kind).upper()
    return IndexedValueType.Value(f"INDEXED_VALUE_TYPE_{snake}")


def type_name(value: IndexedValueType.ValueType) -> str:
    """``INDEXED_VALUE_TYPE_KEYWORD_LIST`` -> ``"KeywordList"`` (the contracts' spelling)."""
    name = IndexedValueType.Name(value).removeprefix("INDEXED_VALUE_TYPE_")
    return "".join(part.capitalize() for part in name.split("_"))


@dataclass
class SetupReport:
    namespace: str
    added: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    conflicts: dict[str, str] = field(default_factory=dict)  # name -> "exists as X, ..."

    @property
    def ok(self) -> bool:
        return not self.conflicts


async def register_search_attributes(
    client: Client,
    namespace: str | None = None,
    wanted: Mapping[str, str] = SEARCH_ATTRIBUTES,
    dry_run: bool = False,
) -> SetupReport:
    """Add the missing attributes of ``wanted`` to ``namespace`` (default: the client's);
    with ``dry_run`` only report what is missing. Conflicts are reported, not changed."""
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
