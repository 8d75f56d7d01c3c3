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
import re
import typing
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import temporalio.converter
from temporalio.api.common.v1 import Payload
from temporalio.client import Client, Interceptor
from temporalio.common import HeaderCodecBehavior
from temporalio.converter import (
    CompositePayloadConverter,
    DataConverter,
    DefaultFailureConverter,
    DefaultFailureConverterWithEncodedAttributes,
    DefaultPayloadConverter,
    JSONPlainPayloadConverter,
    JSONTypeConverter,
)
from temporalio.envconfig import ClientConfig
from temporalio.exceptions import ApplicationError
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


#: Error type of an input that cannot be decoded into its dataclass (workflows/limits.py
#: BAD_INPUT: the same type the workflows give the inputs they refuse).
BAD_INPUT = "BadInput"
_FIELD = re.compile(r"^Failed converting field (\w+) on dataclass <class '(?:[\w.]*\.)?(\w+)'>$")
_ITEM = re.compile(r"^Failed converting (?:value for key (.+) in mapping|.+ index (\d+)$)")


class _NoStringAsList(JSONTypeConverter):
    """A JSON string where a list is declared is refused: the SDK would take
    ``"sources": "gs://b/p"`` as the list of its characters and ingest ``g``, ``s``, ..."""

    def to_typed_value(self, hint: type, value: Any) -> Any:
        if typing.get_origin(hint) is list and isinstance(value, str):
            raise TypeError(f"Expected a list, was the string {value[:60]!r}")
        return JSONTypeConverter.Unhandled


class CheckedPayloadConverter(DefaultPayloadConverter):
    """The default converter, except that a payload which does not fit its declared type
    (``"top_k": "five"``, a missing ``tenant``, a string for a list) raises a non-retryable
    ``BadInput`` ApplicationError naming the field, instead of a ``TypeError``.

    Why: the SDK decodes a workflow's input before ``run`` starts, and a ``TypeError`` there
    fails the *workflow task*, which Temporal retries for ever: the run stays Running and
    says nothing to whoever started it. An ApplicationError is a failure error, so the SDK
    fails the *workflow* at once with this message (and an activity's input the same way:
    its attempt fails without retries). ``workflow_failure_exception_types=[TypeError]``
    would do it too, but would also turn every ``TypeError`` bug in workflow code into
    failed runs instead of tasks that recover once a fixed worker is deployed."""

    def __init__(self) -> None:
        converters = [
            JSONPlainPayloadConverter(custom_type_converters=[_NoStringAsList()])
            if isinstance(c, JSONPlainPayloadConverter)
            else c
            for c in DefaultPayloadConverter.default_encoding_payload_converters
        ]
        CompositePayloadConverter.__init__(self, *converters)

    def from_payloads(
        self, payloads: Sequence[Payload], type_hints: list[type] | None = None
    ) -> list[Any]:
        try:
            return super().from_payloads(payloads, type_hints)
        except (TypeError, ValueError) as e:
            raise ApplicationError(input_problem(e), type=BAD_INPUT, non_retryable=True) from None


def input_problem(error: BaseException) -> str:
    """One line from the SDK's chain of conversion errors: the field's path (``AskInput.
    filters.created_after``), what was wrong, what to do."""
    path = ""
    while error.__cause__ is not None:
        if field := _FIELD.match(str(error)):
            path += f".{field[1]}" if path else f"{field[2]}.{field[1]}"
        elif item := _ITEM.match(str(error)):
            path += f"[{item[1] or item[2]}]"
        else:
            break
        error = error.__cause__
    where = f"field {path}" if path else "the input"
    what = str(error).replace("<class '", "").replace("'>", "")
    return f"{where} cannot be read: {what}; fix it and start the run again"


def data_converter(settings: Settings | None = None) -> DataConverter:
    """The JSON converter that refuses ill-typed input (:class:`CheckedPayloadConverter`)
    plus the payload codec of ``MMRAG_CODEC_*``.

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
        temporalio.converter.default(),
        payload_converter_class=CheckedPayloadConverter,
        payload_codec=codec,
        failure_converter_class=failures,
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
