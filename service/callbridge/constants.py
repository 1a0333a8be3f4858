"""Header names, upstream paths and default durations, in one place.

Redis key names are built in `callbridge.store.keys`, under `DEFAULT_KEY_PREFIX`
unless ``redis.key_prefix`` says otherwise.
"""

from __future__ import annotations

# Standard Webhooks headers (https://www.standardwebhooks.com/).
HEADER_WEBHOOK_ID = "webhook-id"
HEADER_WEBHOOK_TIMESTAMP = "webhook-timestamp"
HEADER_WEBHOOK_SIGNATURE = "webhook-signature"

DEFAULT_KEY_PREFIX = "cb"

UPSTREAM_CALLS_PATH = "/api/v1/public/call-batches/{batch_id}/calls"
UPSTREAM_MAX_PAGE_SIZE = 500
UPSTREAM_DEFAULT_PAGE_SIZE = 100

DEFAULT_RETRY_SCHEDULE_S: tuple[float, ...] = (5, 300, 1800, 7200, 18000, 36000, 36000)
RETRY_JITTER_RATIO = 0.2
# Retry-After from a receiver is honoured between these bounds.
RETRY_AFTER_MIN_S = 1.0
RETRY_AFTER_MAX_S = 6 * 3600.0

# How much of a receiver's response body is kept in the attempt history.
RESPONSE_EXCERPT_BYTES = 1024
