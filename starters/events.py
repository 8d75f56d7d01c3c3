"""``mmrag events serve``: Google Cloud Storage notifications (Pub/Sub push) -> workflows.

Pub/Sub push delivers each notification as ``POST {"message": {"attributes": {...},
"data": base64(object resource), "messageId": ...}, "subscription": ...}``. An
``OBJECT_FINALIZE`` starts ``IngestAsset`` and an ``OBJECT_DELETE`` starts ``Forget`` (that
object generation only, re-ingest allowed); both with workflow ids derived from the
object's generation, so a redelivered notification is a no-op and an out-of-order delete
of an older generation cannot remove a newer one.

Authentication: a shared token (``Authorization: Bearer T`` or ``?token=T`` in the push
URL, compared in constant time). Answers: 204 started (or already started), 400
malformed (Pub/Sub should dead-letter it), 401 bad token, 503 when Temporal is
unreachable (Pub/Sub retries).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError

from workflows.contracts import (
    FORGET_WORKFLOW,
    INGEST_ASSET_WORKFLOW,
    TASK_QUEUE,
    ForgetInput,
    IngestAssetInput,
    asset_id_for,
    ingest_asset_workflow_id,
)

log = logging.getLogger("mmrag.events")
MAX_BODY = 1024 * 1024


class BadEvent(ValueError):
    """The request is not a GCS notification we understand (answered with 400)."""


@dataclass
class ObjectEvent:
    kind: str  # OBJECT_FINALIZE | OBJECT_DELETE | other
    uri: str
    generation: str


def parse_push(body: bytes) -> ObjectEvent:
    """The documented Pub/Sub push envelope around a GCS notification."""
    try:
        envelope = json.loads(body)
        message = envelope["message"]
        attributes = message.get("attributes") or {}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise BadEvent(f"not a Pub/Sub push envelope: {e}") from e
    resource: dict[str, Any] = {}
    if message.get("data"):
        try:
            resource = json.loads(base64.b64decode(message["data"]))
        except ValueError as e:
            raise BadEvent(f"message data is not base64 JSON: {e}") from e
    kind = attributes.get("eventType", "")
    bucket = attributes.get("bucketId") or resource.get("bucket", "")
    name = attributes.get("objectId") or resource.get("name", "")
    generation = str(attributes.get("objectGeneration") or resource.get("generation", ""))
    if not (kind and bucket and name and generation):
        raise BadEvent("eventType, bucketId, objectId and objectGeneration are required")
    return ObjectEvent(kind, f"gs://{bucket}/{name}", generation)


class EventBridge:
    """Starts workflows for events on its own event loop thread, for a threaded server."""

    def __init__(self, client: Client, tenant: str, token: str) -> None:
        self.client = client
        self.tenant = tenant
        self.token = token
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)

    def authorised(self, header: str, query_token: str) -> bool:
        if not self.token:
            return True
        offered = header.removeprefix("Bearer ").strip() if header else query_token
        return hmac.compare_digest(offered.encode(), self.token.encode())

    def handle(self, event: ObjectEvent) -> str:
        future = asyncio.run_coroutine_threadsafe(self._start(event), self.loop)
        return future.result(timeout=30)

    async def _start(self, event: ObjectEvent) -> str:
        arg: IngestAssetInput | ForgetInput
        if event.kind == "OBJECT_FINALIZE":
            workflow_id = ingest_asset_workflow_id(self.tenant, event.uri, event.generation)
            workflow, arg = INGEST_ASSET_WORKFLOW, IngestAssetInput(self.tenant, event.uri)
        elif event.kind == "OBJECT_DELETE":
            asset_id = asset_id_for(self.tenant, event.uri)
            workflow_id = f"forget/{self.tenant}/{asset_id}/{event.generation}"
            workflow, arg = (
                FORGET_WORKFLOW,
                ForgetInput(
                    self.tenant,
                    asset_id=asset_id,
                    reason="object deleted from storage",
                    allow_reingest=True,
                    if_generation=event.generation,
                ),
            )
        else:
            return "ignored"
        try:
            await self.client.start_workflow(
                workflow,
                arg,
                id=workflow_id,
                task_queue=TASK_QUEUE,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            )
        except WorkflowAlreadyStartedError:
            return "duplicate"
        return "started"


def make_server(bridge: EventBridge, host: str, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            log.info("%s %s", self.address_string(), format % args)

        def do_POST(self) -> None:  # noqa: N802
            query = parse_qs(urlparse(self.path).query)
            if not bridge.authorised(
                self.headers.get("Authorization", ""), query.get("token", [""])[0]
            ):
                self._answer(401, "bad or missing token")
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length <= 0 or length > MAX_BODY:
                self._answer(400, "empty or oversized body")
                return
            try:
                event = parse_push(self.rfile.read(length))
                outcome = bridge.handle(event)
            except BadEvent as e:
                self._answer(400, str(e))
                return
            except Exception as e:  # Temporal unreachable: Pub/Sub will retry
                log.warning("could not start a workflow: %s", e)
                self._answer(503, "workflow service unavailable, retry later")
                return
            log.info("%s %s gen %s: %s", event.kind, event.uri, event.generation, outcome)
            self._answer(204, "")

        def _answer(self, status: int, message: str) -> None:
            body = message.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if body:
                self.wfile.write(body)

    return ThreadingHTTPServer((host, port), Handler)
