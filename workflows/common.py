"""Search attribute keys and retry policies shared by the workflows.

Stateless and deterministic, so the workflow modules import it (with ``contracts`` and
``activity_payloads``) passed through the sandbox: re-importing these modules for every
workflow run cost ~40 ms per ``Ask`` (bench/ask.py).
"""

from __future__ import annotations

from datetime import timedelta

from temporalio.common import RetryPolicy, SearchAttributeKey

TENANT_KEY = SearchAttributeKey.for_keyword("MmragTenant")
SOURCE_KEY = SearchAttributeKey.for_keyword("MmragSource")
ASSET_ID_KEY = SearchAttributeKey.for_keyword("MmragAssetId")
INDEX_VERSION_KEY = SearchAttributeKey.for_int("MmragIndexVersion")
OUTCOME_KEY = SearchAttributeKey.for_keyword("MmragOutcome")

# Heartbeat timeout of activities that get a liveness heartbeat from their worker
# (workers/run.py LIVENESS_HEARTBEAT): a killed worker's activity is retried after this.
LIVENESS_TIMEOUT = timedelta(seconds=20)

DB_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30)
)
ENCODE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    maximum_interval=timedelta(seconds=60),
    maximum_attempts=10,
    non_retryable_error_types=["EncoderMismatch", "BadModel"],
)
