"""What a caller may put in a workflow input, checked before any work starts.

Two kinds of caller-supplied values, treated differently on purpose:

* **Meaning** — tags and Ask filters decide *which* data is written or read. A value the
  workers cannot honour exactly is refused (``BadInput`` / ``BadQuery``, non-retryable,
  one line saying what to fix): silently dropping a tag filter would widen a search, and
  silently dropping a tag would lose data. ``tags_problem`` and ``filters_problem`` are
  pure and deterministic, so workflows call them on their input before the first activity
  and ``activities/store/vectors.py`` calls them again for direct callers.
* **Load** — page size, batch size, concurrency, heartbeat, watch interval, ``top_k``,
  ``max_answer_tokens`` only pace or size the same work. They are clamped on the worker
  side to the deployment's maxima (``MMRAG_MAX_*`` settings, ``bound_knobs``): the result is
  still right, and a caller written against a bigger deployment keeps working. Workflows
  get the bounds from the ``bound_knobs`` local activity, so the clamped values are in the
  history and replay does not depend on a worker's settings.

Standard library and temporalio only: workflows import it passed through the sandbox.
"""

from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ApplicationError

from workflows.activities.limits import Knobs, bound_knobs
from workflows.common import PURE_RETRY
from workflows.contracts import AskFilters

#: Tags per asset: the ``tags`` ARRAY field of a collection (``max_capacity``).
MAX_TAGS = 64
#: One stored tag, ``key=value`` in UTF-8 bytes: the array element's ``max_length``.
MAX_TAG_BYTES = 256
#: Values of one list filter (``media_types``, ``asset_ids``): each becomes a literal of
#: the Milvus expression, which has to stay small.
MAX_FILTER_VALUES = 1000
#: The ``created_at`` field is an INT64.
MAX_INT64 = 2**63 - 1
#: Longest string a list filter may hold (asset ids are 32 hex digits, media types short).
MAX_FILTER_VALUE_CHARS = 256

BAD_INPUT = "BadInput"
BAD_QUERY = "BadQuery"


def tags_problem(tags: object, field: str = "tags") -> str:
    """``""`` when ``tags`` can be stored and matched exactly, else what to fix (one line).

    Tags are stored as ``key=value`` strings, so a key containing ``=`` would collide with
    another tag (``{"a=b": "c"}`` and ``{"a": "b=c"}`` are both ``a=b=c``)."""
    if not isinstance(tags, dict):
        return f"{field} must be an object of string keys and string values"
    if len(tags) > MAX_TAGS:
        return f"{field}: {len(tags)} tags given, at most {MAX_TAGS} are allowed; send fewer"
    for key, value in tags.items():
        if not isinstance(key, str) or not isinstance(value, str):
            return f"{field}: keys and values must be strings ({key!r}: {value!r})"
        if not key:
            return f"{field}: a tag key is empty"
        if "=" in key:
            return (
                f"{field}: tag key {key!r} contains '=', which would collide with the tag "
                f"{key.split('=', 1)[0]!r}; rename the key"
            )
        size = len(f"{key}={value}".encode())
        if size > MAX_TAG_BYTES:
            return (
                f"{field}: tag {key!r} is {size} bytes as key=value, at most {MAX_TAG_BYTES} "
                "are allowed; shorten it"
            )
    return ""


def _list_problem(values: object, field: str) -> str:
    if not isinstance(values, list):
        return f"filters.{field} must be a list of strings"
    if len(values) > MAX_FILTER_VALUES:
        return (
            f"filters.{field}: {len(values)} values given, at most {MAX_FILTER_VALUES} are "
            "allowed; narrow the filter"
        )
    for value in values:
        if not isinstance(value, str) or not value:
            return f"filters.{field}: {value!r} is not a non-empty string"
        if len(value) > MAX_FILTER_VALUE_CHARS:
            return f"filters.{field}: a value is longer than {MAX_FILTER_VALUE_CHARS} characters"
    return ""


def _time_problem(value: object, field: str) -> str:
    if isinstance(value, bool) or not isinstance(value, int):
        return f"filters.{field} must be whole epoch seconds (an integer), not {value!r}"
    if not 0 <= value <= MAX_INT64:
        return f"filters.{field}={value} is out of range: use epoch seconds, 0 for no bound"
    return ""


def filters_problem(filters: AskFilters) -> str:
    """``""`` when an Ask's filters compile to a query Milvus accepts, else what to fix."""
    return (
        _list_problem(filters.media_types, "media_types")
        or _time_problem(filters.created_after, "created_after")
        or _time_problem(filters.created_before, "created_before")
        or tags_problem(filters.tags, "filters.tags")
        or _list_problem(filters.asset_ids, "asset_ids")
    )


def refuse_if(problem: str, error_type: str) -> None:
    """Fail the run at once, non-retryably, when a check above found a ``problem``."""
    if problem:
        raise ApplicationError(problem, type=error_type, non_retryable=True)


# Patch id: workflows bound their caller's load knobs by the ``bound_knobs`` local activity
# (since issue 13); histories from before replay with the caller's own values.
KNOBS_BOUNDED = "knobs-bounded-by-worker"


async def bounded_knobs(knobs: Knobs) -> Knobs:
    """``knobs`` as the worker allows them; unchanged when replaying an older history."""
    if not workflow.patched(KNOBS_BOUNDED):
        return knobs
    return await workflow.execute_local_activity(
        bound_knobs,
        knobs,
        start_to_close_timeout=timedelta(seconds=10),
        retry_policy=PURE_RETRY,  # a local activity's default retries are unbounded
        summary="bound the caller's load knobs",
    )
