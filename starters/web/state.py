"""What the server holds while it runs: one Temporal client, the query login's engine, the
key verifier, the preview renderer, and where uploads and the Web UI are.

Nothing about a request or an ingest is kept here: progress is asked of the workflow each
time, so a restarted server answers for an ingest started before it (tests/test_web_api.py).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

from fastapi import Request
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from temporalio.client import Client

from activities.store.registry import get_engine
from settings import Settings
from starters.ask import ask_task_queue
from starters.web.credentials import KeyCredentials
from starters.web.keys import KeyVerifier
from starters.web.previews import Previews
from workers.auth import AuthClientInterceptor, signing_key_from_settings

ASK_QUEUE_CACHE_S = 10.0  # how long the choice of the Ask's task queue is reused


class ServeError(RuntimeError):
    """The server cannot start: one line saying what to set."""


@dataclass
class WebState:
    settings: Settings
    client: Client
    engine: Engine
    keys: KeyVerifier
    previews: Previews
    upload_base: Path
    ui_url: str
    namespace: str
    _queue: tuple[str, float] = ("", 0.0)
    _queue_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @classmethod
    async def open(cls, settings: Settings) -> WebState:
        from workers.temporal_client import connect, connect_config

        signing_key = signing_key_from_settings(settings)
        if signing_key is None:
            raise ServeError(
                "mmrag serve starts workflows with credentials it mints for each API key: set "
                "MMRAG_AUTH_SIGNING_KEY_FILE (or run it where `mmrag stack up` created one)"
            )
        credentials = KeyCredentials(signing_key, timedelta(seconds=settings.web_token_ttl_s))
        client = await connect(
            settings, token="", interceptors=[AuthClientInterceptor(credentials)]
        )
        try:
            url = settings.for_database_role("query").database_endpoint()
        except RuntimeError as e:
            raise ServeError(str(e)) from None
        engine = get_engine(with_connect_timeout(url, settings.web_database_connect_timeout_s))
        ui = settings.web_temporal_ui_url
        if not ui:
            try:
                ui = settings.stack_endpoint("temporal_ui_url")
            except RuntimeError:
                ui = ""
        base = Path(settings.web_upload_dir or settings.state_dir / "uploads")
        return cls(
            settings=settings,
            client=client,
            engine=engine,
            keys=KeyVerifier(engine, settings.web_key_cache_s),
            previews=Previews(settings, engine),
            upload_base=base,
            ui_url=ui.rstrip("/"),
            namespace=str(connect_config(settings).get("namespace") or "default"),
        )

    async def ask_queue(self) -> str:
        """The Ask's task queue (the query queue when a query worker polls it), re-checked
        every ``ASK_QUEUE_CACHE_S``: asking Temporal each time would cost every request."""
        queue, until = self._queue
        if queue and time.monotonic() < until:
            return queue
        async with self._queue_lock:
            queue, until = self._queue
            if not queue or time.monotonic() >= until:
                queue = await ask_task_queue(self.client)
                self._queue = (queue, time.monotonic() + ASK_QUEUE_CACHE_S)
        return queue

    def run_link(self, workflow_id: str, run_id: str = "") -> str:
        """The run's page in the Temporal Web UI, or with no id the list of runs ("" when no
        UI is known)."""
        if not self.ui_url:
            return ""
        path = f"{self.ui_url}/namespaces/{quote(self.namespace, safe='')}/workflows/"
        if not workflow_id:
            return path.rstrip("/")  # the list of runs
        path += quote(workflow_id, safe="")
        return f"{path}/{run_id}/history" if run_id else path

    async def close(self) -> None:
        self.previews.close()


def with_connect_timeout(url: str, seconds: int) -> str:
    """``url`` with libpq's ``connect_timeout`` (unless it names one): a Postgres that is
    unreachable rather than refusing (a dropped route, a host being replaced) is then a 503
    within that time, not a request thread waiting minutes on TCP (docs/web.md)."""
    parsed = make_url(url)
    if "connect_timeout" in parsed.query or seconds <= 0:
        return url
    timed = parsed.update_query_dict({"connect_timeout": str(seconds)})
    return timed.render_as_string(hide_password=False)


def web_state(request: Request) -> WebState:
    state: WebState = request.app.state.web
    return state
