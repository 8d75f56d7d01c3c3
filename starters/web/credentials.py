"""The workflow credential of each request: an API key becomes a token for its own tenant.

The server holds the token issuer's signing key (``MMRAG_AUTH_SIGNING_KEY[_FILE]``, or the
local stack's) and one Temporal client. Every workflow a request starts carries, in the
``mmrag_auth`` header, a short-lived token minted for the request's key: that key's tenant
only, that key's role, subject ``apikey:<id>``. So the workers check each run exactly as
they check the CLI's (workers/auth.py): a request can never start a run for another
tenant, nor a Forget with a reader key, even if the server's own checks had a hole.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from starters.web.keys import ApiKey
from workers.auth import ClientCredentials, issue_token

_CURRENT: contextvars.ContextVar[ApiKey | None] = contextvars.ContextVar(
    "mmrag_web_key", default=None
)


class KeyCredentials(ClientCredentials):
    """Tokens for whichever key the current request holds (see :func:`acting_as`); a
    start outside a request has no credential and fails here, before reaching Temporal."""

    def __init__(self, signing_key: tuple[Ed25519PrivateKey, str], ttl: timedelta) -> None:
        super().__init__(signing_key=signing_key, ttl=ttl)
        self._key_pair = signing_key
        self._token_ttl = ttl
        self._tokens: dict[ApiKey, tuple[str, float]] = {}
        self._tokens_lock = threading.Lock()

    def token(self) -> str:
        key = _CURRENT.get()
        if key is None:
            raise RuntimeError("a workflow start outside a request has no credential")
        now = time.time()
        with self._tokens_lock:
            hit = self._tokens.get(key)
            if hit is not None and now < hit[1]:
                return hit[0]
            private, kid = self._key_pair
            minted = issue_token(
                private, kid, [key.tenant], key.role, self._token_ttl, subject=key.subject, now=now
            )
            if len(self._tokens) > 10_000:
                self._tokens.clear()
            self._tokens[key] = (minted, now + self._token_ttl.total_seconds() / 2)
            return minted

    def schedule_token(self) -> str:
        raise RuntimeError("the web server creates no schedules")


@contextmanager
def acting_as(key: ApiKey) -> Iterator[None]:
    """Workflow starts inside this block carry ``key``'s credential."""
    reset = _CURRENT.set(key)
    try:
        yield
    finally:
        _CURRENT.reset(reset)
