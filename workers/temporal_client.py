"""Connect to Temporal the way the `temporal` CLI does.

``temporalio.envconfig`` reads ``TEMPORAL_ADDRESS``, ``TEMPORAL_NAMESPACE``,
``TEMPORAL_API_KEY``, the TLS variables and ``temporal.toml`` profiles
(``TEMPORAL_PROFILE``, ``TEMPORAL_CONFIG_FILE``), so one configuration serves the dev
server, a self-hosted cluster and Temporal Cloud. When none of them names an address,
the embedded stack's address (from ``mmrag stack up``) is used.
"""

from __future__ import annotations

from typing import Any

from temporalio.client import Client
from temporalio.envconfig import ClientConfig

from workers.settings import Settings, get_settings


def connect_config(settings: Settings | None = None) -> dict[str, Any]:
    settings = settings or get_settings()
    config: dict[str, Any] = dict(ClientConfig.load_client_connect_config())
    if not config.get("target_host"):  # neither the environment nor a profile names one
        try:
            config["target_host"] = settings.stack_endpoint("temporal_address")
        except RuntimeError:
            config.setdefault("target_host", "localhost:7233")
    config.setdefault("namespace", "default")
    return config


async def connect(settings: Settings | None = None) -> Client:
    config = connect_config(settings)
    try:
        return await Client.connect(**config)
    except RuntimeError as e:
        raise ConnectionError(
            f"cannot reach Temporal at {config.get('target_host')} "
            f"(namespace {config.get('namespace')}): {e}. Start it with `mmrag stack up`, "
            "or set TEMPORAL_ADDRESS / a temporal.toml profile for your cluster."
        ) from e
