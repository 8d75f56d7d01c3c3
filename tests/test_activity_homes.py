"""One home per activity (workflows/activities/): each implementation takes its stub's input
and output types, every stub is implemented and run by some worker role, and the flags the
workers read come from the homes. Pure: no servers."""

from __future__ import annotations

import inspect
import typing

from activities.ask import AskActivities
from activities.captions import CaptionActivities, CaptionStoreActivities
from activities.encode_batch import BatchEncodeActivities
from activities.encode_query import QueryEncodeActivities
from activities.generate import GenerateActivities
from activities.ingest import IngestActivities
from activities.lifecycle import LifecycleActivities
from activities.limits import LimitActivities
from activities.query import QueryActivities
from workers.roles import MILVUS_ACCESS, ROLE_ACTIVITIES
from workers.run import LIVENESS_HEARTBEAT
from workflows.activities import home_of, implementations

IMPLEMENTATIONS = (
    AskActivities,
    CaptionActivities,
    CaptionStoreActivities,
    BatchEncodeActivities,
    QueryEncodeActivities,
    GenerateActivities,
    IngestActivities,
    LifecycleActivities,
    LimitActivities,
    QueryActivities,
)


def _signature(fn: object) -> tuple[list[object], object]:
    hints = typing.get_type_hints(fn)
    params = [p for p in inspect.signature(fn).parameters if p != "self"]  # type: ignore[arg-type]
    return [hints[p] for p in params], hints.get("return")


def _stubs() -> dict[str, object]:
    return {home_of(s).name: s for stubs in ROLE_ACTIVITIES.values() for s in stubs}


def test_each_implementation_has_its_stubs_types() -> None:
    stubs = _stubs()
    implemented: dict[str, str] = {}
    for cls in IMPLEMENTATIONS:
        for name, method in implementations(cls.__new__(cls)).items():
            assert name not in implemented, f"{name}: {implemented[name]} and {cls.__name__}"
            implemented[name] = cls.__name__
            assert _signature(method) == _signature(stubs[name]), name
    assert set(implemented) == set(stubs), "a stub no class implements, or the reverse"


def test_the_workers_read_the_flags_of_the_homes() -> None:
    stubs = _stubs().values()
    assert {home_of(s).name for s in stubs if home_of(s).liveness_heartbeat} == LIVENESS_HEARTBEAT
    assert "encode_batch" not in LIVENESS_HEARTBEAT  # it heartbeats its own resume cursor
    # A role's Milvus user covers its most demanding activity; generate touches nothing.
    assert {r: a.user for r, a in MILVUS_ACCESS.items()} == {
        "cpu": "mmrag_ingest",
        "encode": "mmrag_encode",
        "generate": "",
        "query": "mmrag_query",
    }
