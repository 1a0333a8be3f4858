"""The data every stage shares: call statuses, the platform's pages, events.

* `common`: statuses and their order, the List Batch Calls page models, the event an
  outbox carries (`Event`), a timeline entry, the Retry-After header;
* `events`: the webhook bodies, one model per event type: the single description of
  what receivers get (published as JSON Schemas by `api.catalog`).
"""

from callbridge.models.common import (
    ANSWERED,
    BUSY,
    CANCELLED,
    COMPLETED,
    FAILED,
    IN_PROGRESS,
    KNOWN_STATUSES,
    NO_ANSWER,
    PENDING,
    QUEUED,
    REMOVED,
    RINGING,
    TERMINAL_STATUSES,
    ApiError,
    CallItem,
    CallsPage,
    Envelope,
    Event,
    PollOutcome,
    TimelineEntry,
    event_id,
    event_id_v1,
    is_backward,
    is_terminal,
    iso_ms,
    normalise_status,
    parse_retry_after,
    skipped_statuses,
)

__all__ = [
    "ANSWERED",
    "BUSY",
    "CANCELLED",
    "COMPLETED",
    "FAILED",
    "IN_PROGRESS",
    "KNOWN_STATUSES",
    "NO_ANSWER",
    "PENDING",
    "QUEUED",
    "REMOVED",
    "RINGING",
    "TERMINAL_STATUSES",
    "ApiError",
    "CallItem",
    "CallsPage",
    "Envelope",
    "Event",
    "PollOutcome",
    "TimelineEntry",
    "event_id",
    "event_id_v1",
    "is_backward",
    "is_terminal",
    "iso_ms",
    "normalise_status",
    "parse_retry_after",
    "skipped_statuses",
]
