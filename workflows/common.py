"""Search attribute keys and retry policies shared by the workflows.

Stateless and deterministic, so the workflow modules import it (with ``contracts`` and the
activity homes, ``workflows/activities/``) passed through the sandbox: re-importing these
modules for every workflow run cost ~40 ms per ``Ask`` (bench/ask.py).
"""

from __future__ import annotations

from datetime import timedelta

from temporalio.common import RetryPolicy, SearchAttributeKey, SearchAttributeUpdate

from workflows.contracts import (
    ASSET_ID_ATTRIBUTE,
    INDEX_VERSION_ATTRIBUTE,
    OUTCOME_ATTRIBUTE,
    SOURCE_ATTRIBUTE,
    TENANT_ATTRIBUTE,
    asset_id_for,
)

TENANT_KEY = SearchAttributeKey.for_keyword(TENANT_ATTRIBUTE)
# Digests of the sources, never their URIs (see source_attribute).
SOURCE_KEY = SearchAttributeKey.for_keyword(SOURCE_ATTRIBUTE)
ASSET_ID_KEY = SearchAttributeKey.for_keyword(ASSET_ID_ATTRIBUTE)
INDEX_VERSION_KEY = SearchAttributeKey.for_int(INDEX_VERSION_ATTRIBUTE)
OUTCOME_KEY = SearchAttributeKey.for_keyword(OUTCOME_ATTRIBUTE)


def source_digest(tenant: str, uri: str) -> str:
    """What ``MmragSource`` says about one source: the digest an object at ``uri`` gets as
    its asset id (:func:`workflows.contracts.asset_id_for`), so an ``IngestAsset`` is found
    by ``MmragSource = MmragAssetId``, and an ingest of a prefix by the digest of the
    prefix as it was given."""
    return asset_id_for(tenant, uri)


def source_attribute(tenant: str, uris: list[str]) -> SearchAttributeUpdate[str]:
    """``MmragSource`` for a run over ``uris``: their digests, comma-separated (first 256
    characters). Never the URIs: search attributes are indexed and shown in clear even when
    payloads are encrypted, outlive ``Forget`` until the namespace's retention removes the
    run, and a URI (``gs://bucket/users/jane-doe/...``) can name a person."""
    return SOURCE_KEY.value_set(",".join(source_digest(tenant, u) for u in uris)[:256])


# Heartbeat timeout of activities that get a liveness heartbeat from their worker
# (workers/run.py LIVENESS_HEARTBEAT): a killed worker's activity is retried after this.
LIVENESS_TIMEOUT = timedelta(seconds=20)

# Every activity's retries are bounded (issue 18): errors no retry fixes are raised
# non-retryable by the activities (BadInput, MissingCredentials, PermissionRefused, ...),
# and anything else (a Postgres or Milvus restart) is retried for about 8 minutes
# (1+2+4+8+16 s, then every 30 s), then the run fails with the step's last error instead of
# retrying unseen for ever.
DB_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=20,
)
# Local activities that only compute (no outside system): a failure is a bug, not an outage.
PURE_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=200), maximum_attempts=3)
ENCODE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    maximum_interval=timedelta(seconds=60),
    maximum_attempts=10,
    non_retryable_error_types=["EncoderMismatch", "BadModel"],
)
