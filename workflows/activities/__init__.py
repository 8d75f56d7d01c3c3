"""One home per activity: for each activity the workflows call, its name, its input and
output types, and a typed stub that workflows pass to ``workflow.execute_activity`` instead
of a string and a ``result_type``, with the flags the workers read:

- ``liveness_heartbeat``: the activity spends its time in one blocking call and reports no
  progress itself, so the worker heartbeats for it (``workers/run.py``,
  ``LivenessHeartbeat``) and its workflow gives it a short heartbeat timeout;
- ``milvus``: the least Milvus access it needs (:data:`MILVUS_READ` < :data:`MILVUS_WRITE` <
  :data:`MILVUS_MANAGE`); a worker role logs in as the Milvus user that covers all of its
  activities (``workers/roles.py``, ``MILVUS_ACCESS``).

The implementations (``activities/*.py``) take ``@implements(stub)``, which registers them
under the stub's name. The homes, by area: :mod:`.ingest`, :mod:`.ask`, :mod:`.lifecycle`,
:mod:`.limits`.

Standard library and temporalio only, so workflows import these modules passed through the
sandbox. No ``from __future__ import annotations`` here or in the area modules: the data
converter resolves a dataclass's type hints on every payload it decodes, and string
annotations made that ~3x slower.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from temporalio import activity

MILVUS_NONE, MILVUS_READ, MILVUS_WRITE, MILVUS_MANAGE = "", "read", "write", "manage"
MILVUS_LEVELS = (MILVUS_NONE, MILVUS_READ, MILVUS_WRITE, MILVUS_MANAGE)  # least first


@dataclass(frozen=True)
class ActivityHome:
    """An activity's name and the flags the workers read."""

    name: str
    liveness_heartbeat: bool = False
    milvus: str = MILVUS_NONE


F = TypeVar("F", bound=Callable[..., Any])
_HOMES: dict[Callable[..., Any], ActivityHome] = {}


def stub(
    name: str, *, liveness_heartbeat: bool = False, milvus: str = MILVUS_NONE
) -> Callable[[F], F]:
    """Make ``fn`` the typed stub of activity ``name``: workflows call it, never run it."""
    if milvus not in MILVUS_LEVELS:
        raise ValueError(f"milvus={milvus!r}: one of {MILVUS_LEVELS}")

    def wrap(fn: F) -> F:
        _HOMES[fn] = ActivityHome(name, liveness_heartbeat, milvus)
        return activity.defn(name=name)(fn)

    return wrap


def home_of(fn: Callable[..., Any]) -> ActivityHome:
    """The home of a stub, or of an implementation (function or bound method)."""
    return _HOMES[getattr(fn, "__func__", fn)]


def implementations(obj: object) -> dict[str, Callable[..., Any]]:
    """The bound methods of ``obj`` that implement an activity, by activity name."""
    found = {}
    for attr in dir(type(obj)):
        fn = getattr(type(obj), attr, None)
        if callable(fn) and fn in _HOMES:
            found[_HOMES[fn].name] = getattr(obj, attr)
    return found


def implements(stub_fn: Callable[..., Any]) -> Callable[[F], F]:
    """Register the decorated function as the implementation of ``stub_fn``'s activity."""
    home = home_of(stub_fn)

    def wrap(fn: F) -> F:
        _HOMES[fn] = home
        return activity.defn(name=home.name)(fn)

    return wrap


def not_here(name: str) -> NotImplementedError:
    """What a stub raises if it is ever run: workflows schedule it, workers implement it."""
    return NotImplementedError(f"{name} is a stub; the worker runs its implementation")
