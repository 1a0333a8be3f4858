"""The data callbridge speaks: upstream pages and calls, call statuses, events.

The upstream models accept unknown fields and unknown status strings: the platform
may add either at any time, and a new status must become a ``call.<status>`` event,
never a crash.
"""

from __future__ import annotations

import email.utils
import hashlib
import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from callbridge.constants import RETRY_AFTER_MAX_S

PENDING = "pending"
QUEUED = "queued"
RINGING = "ringing"
ANSWERED = "answered"
IN_PROGRESS = "in_progress"
COMPLETED = "completed"
FAILED = "failed"
NO_ANSWER = "no_answer"
BUSY = "busy"
CANCELLED = "cancelled"

# Every status the API documents, in lifecycle order.
KNOWN_STATUSES: tuple[str, ...] = (
    PENDING,
    QUEUED,
    RINGING,
    ANSWERED,
    IN_PROGRESS,
    COMPLETED,
    FAILED,
    NO_ANSWER,
    BUSY,
    CANCELLED,
)
# Not a status the API serves: what the bridge stores for a call the platform stopped
# listing (`poll.batch_end`). Finished like a terminal status; a call served again
# after it comes back as a redial does.
REMOVED = "removed"
TERMINAL_STATUSES: frozenset[str] = frozenset(
    {COMPLETED, FAILED, NO_ANSWER, BUSY, CANCELLED, REMOVED}
)

# The normal path that leads to each status; used to name what a poll missed.
# failed can happen anywhere, so nothing is "skipped" on the way to it.
_CANONICAL_PATH: dict[str, tuple[str, ...]] = {
    QUEUED: (PENDING, QUEUED),
    RINGING: (PENDING, QUEUED, RINGING),
    ANSWERED: (PENDING, QUEUED, RINGING, ANSWERED),
    IN_PROGRESS: (PENDING, QUEUED, RINGING, ANSWERED, IN_PROGRESS),
    COMPLETED: (PENDING, QUEUED, RINGING, ANSWERED, IN_PROGRESS, COMPLETED),
    NO_ANSWER: (PENDING, QUEUED, RINGING, NO_ANSWER),
    BUSY: (PENDING, QUEUED, RINGING, BUSY),
    CANCELLED: (PENDING, CANCELLED),
}


def is_terminal(status: str) -> bool:
    return status in TERMINAL_STATUSES


# Order of the statuses a call passes before it ends.
_PROGRESS = {s: i for i, s in enumerate((PENDING, QUEUED, RINGING, ANSWERED, IN_PROGRESS))}


def normalise_status(status: str) -> str:
    """Statuses are documented lowercase; " Completed" is still completed."""
    # Every item of a scan passes here: a look-up of the few spellings served beats
    # two string copies. Bounded: statuses come from outside.
    normal = _NORMALISED.get(status)
    if normal is None:
        normal = status.strip().lower()
        if len(_NORMALISED) < 256:
            _NORMALISED[status] = normal
    return normal


_NORMALISED: dict[str, str] = {}


def is_backward(previous: str, new: str) -> bool:
    """Whether a call moving from `previous` to `new` went back in its lifecycle.

    Either a redial (the call left a terminal status, or ended unseen and started
    again) or a stale copy of the call served by the platform; only a second
    observation tells which, so such a move is confirmed before it is reported.
    """
    if previous in TERMINAL_STATUSES:
        return new not in TERMINAL_STATUSES
    a, b = _PROGRESS.get(previous), _PROGRESS.get(new)
    return a is not None and b is not None and b < a


def skipped_statuses(previous: str | None, new: str) -> list[str]:
    """Statuses of the normal lifecycle that lie between `previous` and `new`.

    A call leaving a terminal status is being redialled: its path starts again
    from pending. First sight (previous None) reports nothing as skipped.
    """
    path = _CANONICAL_PATH.get(new)
    if previous is None or path is None:
        return []
    start = PENDING if is_terminal(previous) else previous
    if start not in path:
        return []
    return list(path[path.index(start) + 1 : -1])


# What one poll cycle of a batch came to (a label of callbridge_poll_cycles_total).
PollOutcome = Literal[
    "committed",
    "unchanged",
    "partial",
    "not_owner",
    "failed",
    "fenced",
    "not_found",
    "auth_failed",
]


# --- upstream envelope ---------------------------------------------------------


class CallItem(BaseModel):
    """One call as the API returns it. Unknown fields are kept, never rejected."""

    # The descriptions are published: this model is the ``call`` of every call event
    # (`callbridge.models.events`).
    model_config = ConfigDict(extra="allow", frozen=True)

    call_id: str = Field(min_length=1, description="The platform's id of the call.")
    status: str = Field(min_length=1, description="The status exactly as served (not normalised).")
    external_id: str | None = Field(None, description="Your id for the contact, if you gave one.")
    phone_number: str | None = Field(None, description="The number dialled.")
    name: str | None = Field(None, description="The contact's name.")
    duration_seconds: float | None = Field(None, description="Length of the call, once ended.")
    started_at: str | None = Field(None, description="When the call started, as served.")
    ended_at: str | None = Field(None, description="When the call ended, as served.")
    metadata: dict[str, Any] | None = Field(
        None, description="The metadata the contact was uploaded with."
    )


class CallsPage(BaseModel):
    """The ``data`` member of a successful List Batch Calls response."""

    model_config = ConfigDict(extra="allow", frozen=True)

    items: list[CallItem]
    total: int = Field(ge=0)
    page: int = Field(ge=1)
    limit: int = Field(ge=1)
    has_more: bool


class ApiError(BaseModel):
    model_config = ConfigDict(extra="allow")

    code: str | None = None
    details: list[Any] = Field(default_factory=list)


class Envelope(BaseModel):
    """Every response of the API: status_code, message, error, data."""

    model_config = ConfigDict(extra="allow")

    status_code: int | None = None
    message: str | None = None
    error: ApiError | None = None
    data: Any = None


def iso_ms(now_ms: int) -> str:
    """``2026-11-28T10:00:05.123Z``."""
    dt = datetime.fromtimestamp(now_ms / 1000, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now_ms % 1000:03d}Z"


@dataclass(slots=True)
class TimelineEntry:
    """One observation of a call, kept for operators (bounded per call)."""

    call_id: str
    at_ms: int
    status: str
    seq: int
    event_type: str | None  # None when recorded silently (first sight as pending)
    # The event's id: it is derived from the body (`event_id`), which the timeline
    # does not keep, so it is stored. None with no event.
    event_id: str | None = None

    def as_list(self) -> list[Any]:
        """The stored form: ``[at_ms, status, sequence, event type, event id]``, or the
        first four alone when nothing was emitted. Entries of four with an event type
        were written before ids named their bodies: their id is `event_id_v1`'s."""
        head = [self.at_ms, self.status, self.seq, self.event_type]
        return head if self.event_id is None else [*head, self.event_id]


# --- headers -------------------------------------------------------------------


def parse_retry_after(
    value: str | None, *, cap_s: float = RETRY_AFTER_MAX_S, now: float | None = None
) -> float | None:
    """Seconds from a Retry-After header, delta-seconds or HTTP-date (RFC 9110 §10.2.3;
    a date in the past is 0); None when absent or odd. `now`: unix time (default the
    wall clock), which an HTTP-date is counted from."""
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value.strip())
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # a date without a zone: HTTP-dates are GMT
            when = when.replace(tzinfo=UTC)
        seconds = max(0.0, when.timestamp() - (time.time() if now is None else now))
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, cap_s)


# --- events --------------------------------------------------------------------


def event_id(batch_id: str, subject: str, seq: int, event_type: str, body: bytes) -> str:
    """The id of an event: a digest of what it is about and of its exact body.

    One id never names two bodies, whatever happens to the store: a change seen again
    after a failover rewound Redis gets a new timestamp, hence a new id, and so does
    any other change that would have taken the same (call, sequence, type) - a
    deduplicating receiver never drops it as a copy of one it has. An event committed
    keeps its id and body (both are in the outbox and the queues)."""
    h = hashlib.blake2b(
        f"{batch_id}\x1f{subject}\x1f{seq}\x1f{event_type}\x1f".encode(), digest_size=12
    )
    h.update(body)
    return "evt_" + h.hexdigest()


# `Event.build` has an argument of that name.
derive_event_id = event_id


def event_id_v1(batch_id: str, subject: str, seq: int, event_type: str) -> str:
    """The id the previous releases gave (batch, subject, sequence, type) alone: how
    their timeline entries, which do not store it, name their events."""
    h = hashlib.blake2b(
        f"{batch_id}\x1f{subject}\x1f{seq}\x1f{event_type}".encode(), digest_size=12
    )
    return "evt_" + h.hexdigest()


@dataclass(frozen=True, slots=True)
class Event:
    """A webhook event. `body` is the exact JSON a subscriber receives, encoded once."""

    id: str
    type: str
    batch_id: str
    call_id: str | None
    body: bytes = field(repr=False)
    # Its trace context as stored with it (`tracing.Tracing.stored`); "" when tracing
    # is off, or for an event a previous release committed.
    trace: str = ""

    @classmethod
    def build(
        cls,
        *,
        type: str,
        timestamp: str,
        batch_id: str,
        call_id: str | None,
        data: dict[str, Any],
        seq: int = 0,
        event_id: str | None = None,
    ) -> Event:
        """The event with this body; its id is `event_id` when given (an operational
        event's, from its stream entry), else derived from the body (`event_id`) and
        `seq` (the call's sequence, or the batch's count of such events)."""
        body = orjson.dumps({"type": type, "timestamp": timestamp, "data": data})
        if event_id is None:
            event_id = derive_event_id(batch_id, call_id or "", seq, type, body)
        return cls(id=event_id, type=type, batch_id=batch_id, call_id=call_id, body=body)

    def payload(self) -> dict[str, Any]:
        loaded: dict[str, Any] = orjson.loads(self.body)
        return loaded
