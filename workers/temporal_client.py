"""Connect to Temporal the way the `temporal` CLI does, with mmrag's data converter.

``temporalio.envconfig`` reads ``TEMPORAL_ADDRESS``, ``TEMPORAL_NAMESPACE``,
``TEMPORAL_API_KEY``, the TLS variables and ``temporal.toml`` profiles
(``TEMPORAL_PROFILE``, ``TEMPORAL_CONFIG_FILE``), so one configuration serves the dev
server, a self-hosted cluster and Temporal Cloud. When none of them names an address,
the embedded stack's address (from ``mmrag stack up``) is used.

Every client (CLI, demo, tests, workers, the replayer) gets its data converter from
:func:`data_converter`, so payload encryption is on everywhere or nowhere: a worker that
could not read what a starter wrote would fail its tasks, not the starter.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import temporalio.converter
from temporalio.client import Client, Interceptor
from temporalio.common import HeaderCodecBehavior
from temporalio.converter import (
    DataConverter,
    DefaultFailureConverter,
    DefaultFailureConverterWithEncodedAttributes,
)
from temporalio.envconfig import ClientConfig
from temporalio.runtime import Runtime

from settings import Settings, get_settings
from workers.codec import codec_from_settings

T = TypeVar("T")


def connect_config(settings: Settings | None = None) -> dict[str, Any]:
    """``Client.connect`` keyword arguments from envconfig, defaulting to the embedded stack."""
    settings = settings or get_settings()
    config: dict[str, Any] = dict(ClientConfig.load_client_connect_config())
    if not config.get("target_host"):  # neither the environment nor a profile names one
        try:
            config["target_host"] = settings.stack_endpoint("temporal_address")
        except RuntimeError:
            config.setdefault("target_host", "localhost:7233")
    config.setdefault("namespace", "default")
    return config


def data_converter(settings: Settings | None = None) -> DataConverter:
    """The default JSON converter plus the payload codec of ``MMRAG_CODEC_*``.

    With a key, failure messages and stack traces are encrypted too
    (``encode_common_attributes``): they quote URIs and questions. Without one the codec
    still runs, passing payloads through but naming the missing key when it meets an
    encrypted one. Use this for ``Replayer`` as well: replay decodes the same payloads.
    """
    settings = settings or get_settings()
    codec = codec_from_settings(settings)
    failures = (
        DefaultFailureConverterWithEncodedAttributes if codec.enabled else DefaultFailureConverter
    )
    return dataclasses.replace(
        temporalio.converter.default(), payload_codec=codec, failure_converter_class=failures
    )


def client_interceptors(settings: Settings) -> list[Interceptor]:
    """Client interceptors (inherited by workers built on the client): tracing when on."""
    from workers.telemetry import tracing_interceptors

    return tracing_interceptors(settings)


def credential_interceptors(settings: Settings, token: str | None = None) -> list[Interceptor]:
    """The ``mmrag_auth`` client interceptor (workers/auth.py): ``token`` when given (``""``:
    attach none, as workers do), else ``MMRAG_AUTH_TOKEN``, else short-lived operator
    tokens minted from the issuer's signing key when one is configured or the local stack
    has one; else none, and the workers refuse what this client starts, saying so."""
    from workers.auth import AuthClientInterceptor, ClientCredentials, client_credentials

    if token == "":
        return []
    credentials = ClientCredentials(token) if token else client_credentials(settings)
    return [AuthClientInterceptor(credentials)] if credentials else []


async def connect(
    settings: Settings | None = None,
    *,
    runtime: Runtime | None = None,
    interceptors: Sequence[Interceptor] = (),
    token: str | None = None,
) -> Client:
    """A client for mmrag: envconfig connection, codec, tracing, the caller's credential
    (see :func:`credential_interceptors`); ``runtime`` for metrics.

    Headers go through the payload codec too (``HeaderCodecBehavior.CODEC``), so with
    payload encryption on the credential is encrypted in histories like every payload."""
    settings = settings or get_settings()
    config = connect_config(settings)
    try:
        return await Client.connect(
            **config,
            data_converter=data_converter(settings),
            interceptors=[
                *client_interceptors(settings),
                *credential_interceptors(settings, token),
                *interceptors,
            ],
            runtime=runtime,
            header_codec_behavior=HeaderCodecBehavior.CODEC,
        )
    except RuntimeError as e:
        raise ConnectionError(
            f"cannot reach Temporal at {config.get('target_host')} "
            f"(namespace {config.get('namespace')}): {e}. Start it with `mmrag stack up`, "
            "or set TEMPORAL_ADDRESS / a temporal.toml profile for your cluster."
        ) from e


def run_client_command(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` for a short-lived command that uses a Client (CLI verbs).

    With temporalio 1.35 a process that leaves a Client to be collected during interpreter
    shutdown aborts at exit about half the time ("PyGILState_Release: thread state must be
    current", or SIGSEGV): the SDK's Rust side releases it from its own thread after Python
    has started finalising. Collecting it while the event loop still runs avoids that
    (measured: 9/15 crashes with plain asyncio.run, 0/20 with this).
    """

    async def collected() -> T:
        try:
            return await main
        finally:
            gc.collect()

    return asyncio.run(collected())
