"""What a started workflow is waiting for, said in one line, so no CLI command sits silent.

A workflow nobody serves does not fail: its task waits in the task queue until a worker
polls it, and an activity that keeps failing retries. From the outside both look like
a command that prints nothing. :class:`Notices` asks the server (DescribeWorkflowExecution,
DescribeTaskQueue) every few seconds and says, once per change:

* ``waiting for a worker on task queue mmrag: ...`` when the workflow task, or an
  activity, has been scheduled for a while and no live worker polls its queue, naming the
  ``mmrag worker --role`` that serves it;
* ``scan_page is retrying (attempt 4): <the last failure>`` when an activity keeps failing
  (decoded with the client's data converter, so an encrypted failure reads as text).

Temporal lists a poller for minutes after its last poll. :func:`live_pollers` trusts one
only when it polled within :data:`POLLER_FRESH_S` (an idle worker's long poll lasts about a
minute: measured, its last access time steps back to 0 every ~57 s), and, for a worker on
this host (the SDK's identity is ``pid@host``), only while that pid is alive, so a worker
killed a moment ago on this machine is not counted.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from temporalio.api.enums.v1 import PendingActivityState, PendingWorkflowTaskState, TaskQueueType
from temporalio.api.failure.v1 import Failure
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.service import RPCError

from workflows.contracts import (
    ENCODE_TASK_QUEUE,
    GENERATE_TASK_QUEUE,
    QUERY_TASK_QUEUE,
    TASK_QUEUE,
)

#: A poller whose last poll is older than this is gone (idle workers re-poll every ~57 s).
POLLER_FRESH_S = 70.0
#: Say that a task waits for a worker once it has waited this long.
NOTICE_AFTER_S = 2.0
#: How often a follower asks the server what the run waits for.
CHECK_EVERY_S = 2.0
#: Server calls made while following a run give up after this long (the next check retries).
RPC_TIMEOUT = timedelta(seconds=5)

ROLE_OF_QUEUE = {
    TASK_QUEUE: "cpu",
    QUERY_TASK_QUEUE: "query",
    ENCODE_TASK_QUEUE: "encode",
    GENERATE_TASK_QUEUE: "generate",
}


@dataclass
class LivePoller:
    identity: str
    age_s: float  # seconds since its last poll


@dataclass
class Unserved:
    """A task that has waited ``waited_s`` on ``queue`` without a worker taking it."""

    queue: str
    workflow_task: bool  # True: the workflow's own task (nothing has run yet)
    pollers: int  # live pollers of the queue: 0, or busy (or stale elsewhere)
    waited_s: float


@dataclass
class Waiting:
    """What a running workflow waits for: ``text`` (one line, "" for nothing to say)."""

    text: str = ""
    unserved: Unserved | None = None


def _seconds(ts: Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


def _pid_gone(identity: str) -> bool:
    """Whether ``identity`` (``pid@host``, the SDK's default) names a dead process here."""
    pid, sep, host = identity.partition("@")
    if not sep or not pid.isdigit() or host != socket.gethostname():
        return False  # another host, or an identity we cannot read: trust the server
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


async def live_pollers(client: Client, queue: str, activities: bool = False) -> list[LivePoller]:
    """The workers that poll ``queue`` now (see the module docstring for "now")."""
    kind = (
        TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY
        if activities
        else TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW
    )
    response = await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace=client.namespace, task_queue=TaskQueue(name=queue), task_queue_type=kind
        ),
        timeout=RPC_TIMEOUT,
    )
    now = time.time()
    pollers = [LivePoller(p.identity, now - _seconds(p.last_access_time)) for p in response.pollers]
    return [p for p in pollers if p.age_s < POLLER_FRESH_S and not _pid_gone(p.identity)]


def worker_hint(queue: str) -> str:
    role = ROLE_OF_QUEUE.get(queue)
    if role is None:
        return "start a worker that polls it"
    return f"start one with `mmrag worker --role {role}` (or `--role all`)"


async def _waiting_on(
    client: Client, queue: str, what: str, workflow_task: bool, waited_s: float
) -> Waiting:
    pollers = await live_pollers(client, queue, activities=not workflow_task)
    unserved = Unserved(queue, workflow_task, len(pollers), waited_s)
    if not pollers:
        return Waiting(
            f"waiting for a worker on task queue {queue} ({what}): none has polled it in the "
            f"last {POLLER_FRESH_S:.0f} s; {worker_hint(queue)}",
            unserved,
        )
    names = ", ".join(p.identity for p in pollers[:3]) + (" ..." if len(pollers) > 3 else "")
    return Waiting(
        f"waiting for a worker on task queue {queue} ({what}): {len(pollers)} poll it "
        f"({names}) but none has taken it yet",
        unserved,
    )


async def failure_text(client: Client, failure: Failure) -> str:
    """The root cause of ``failure`` in one line, decoded (and decrypted) like a result."""
    copy = Failure()
    copy.CopyFrom(failure)
    error: BaseException = await client.data_converter.decode_failure(copy)
    while error.__cause__ is not None:
        error = error.__cause__
    kind = getattr(error, "type", None) or ""
    message = (str(error).strip().splitlines() or [""])[0]
    if len(message) > 300:
        message = message[:297] + "..."
    return f"{kind}: {message}" if kind and kind not in message else message or kind


async def waiting_for(
    client: Client,
    handle: WorkflowHandle[Any, Any],
    notice_after_s: float = NOTICE_AFTER_S,
    running_after_s: float | None = None,
) -> Waiting:
    """One look at a run: what it waits for, or ``Waiting()`` when it is simply working
    (or closed). With ``running_after_s``, a run older than that also says what is running
    (a step on which worker): a command with no progress of its own then still says why it
    takes long (the first Ask after a start loads the model and opens the index)."""
    description = await handle.describe(rpc_timeout=RPC_TIMEOUT)
    if description.status != WorkflowExecutionStatus.RUNNING:
        return Waiting()
    raw = description.raw_description
    now = time.time()
    queue = raw.execution_config.task_queue.name or description.task_queue
    task = raw.pending_workflow_task
    since = task.original_scheduled_time if task.HasField("original_scheduled_time") else None
    waited = now - _seconds(since or task.scheduled_time)
    if (
        raw.HasField("pending_workflow_task")
        and task.state == PendingWorkflowTaskState.PENDING_WORKFLOW_TASK_STATE_SCHEDULED
        and waited >= notice_after_s
    ):
        return await _waiting_on(client, queue, description.workflow_type, True, waited)
    for activity in raw.pending_activities:
        name = activity.activity_type.name
        if activity.attempt > 1 and activity.HasField("last_failure"):
            of = f" of {activity.maximum_attempts}" if activity.maximum_attempts else ""
            cause = await failure_text(client, activity.last_failure)
            return Waiting(f"{name} is retrying (attempt {activity.attempt}{of}): {cause}")
        waited = now - _seconds(activity.scheduled_time)
        if (
            activity.state == PendingActivityState.PENDING_ACTIVITY_STATE_SCHEDULED
            and waited >= notice_after_s
        ):
            on = activity.activity_options.task_queue.name or queue
            return await _waiting_on(client, on, name, False, waited)
    if running_after_s is None or now - description.start_time.timestamp() < running_after_s:
        return Waiting()
    for activity in raw.pending_activities:
        if activity.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED:
            who = activity.last_worker_identity or "a worker"
            return Waiting(f"still running: {activity.activity_type.name} on {who}")
    if task.state == PendingWorkflowTaskState.PENDING_WORKFLOW_TASK_STATE_STARTED:
        return Waiting(f"still running: {description.workflow_type}'s local steps on a worker")
    return Waiting()


#: Called while the run's first workflow task waits for a worker (see ``Unserved``); may
#: start the same work elsewhere and return its handle (the follower then follows that one).
Reroute = Callable[[WorkflowHandle[Any, Any], Unserved], Awaitable[WorkflowHandle[Any, Any] | None]]


@dataclass
class Notices:
    """Says what a run waits for, once per change, at most every ``every_s`` seconds."""

    client: Client
    say: Callable[[str], None]
    every_s: float = CHECK_EVERY_S
    notice_after_s: float = NOTICE_AFTER_S
    running_after_s: float | None = None  # see waiting_for
    _last_text: str = field(default="", init=False)
    _next_check: float = field(default=0.0, init=False)

    async def check(self, handle: WorkflowHandle[Any, Any]) -> Waiting:
        now = time.monotonic()
        if now < self._next_check:
            return Waiting()
        self._next_check = now + self.every_s
        try:
            waiting = await waiting_for(
                self.client, handle, self.notice_after_s, self.running_after_s
            )
        except (TimeoutError, RPCError):
            return Waiting()  # the server is busy or restarting: the next check says
        if waiting.text and waiting.text != self._last_text:
            self.say(waiting.text)
        self._last_text = waiting.text
        return waiting


async def result_with_notices(
    handle: WorkflowHandle[Any, Any],
    notices: Notices,
    reroute: Reroute | None = None,
) -> Any:
    """``handle.result()``, saying meanwhile what the run waits for; ``reroute`` may move a
    run whose first task nobody serves (see :data:`Reroute`)."""
    while True:
        result = asyncio.ensure_future(handle.result())
        moved = None
        try:
            while not result.done():
                await asyncio.wait([result], timeout=notices.every_s)
                if result.done():
                    break
                waiting = await notices.check(handle)
                if reroute is not None and waiting.unserved and waiting.unserved.workflow_task:
                    moved = await reroute(handle, waiting.unserved)
                    if moved is not None:
                        break
        finally:
            if not result.done():
                result.cancel()
        if moved is None:
            return result.result()
        if result.done() and not result.cancelled():
            result.exception()  # the moved run's end (terminated): retrieved, not raised
        handle = moved
