"""The webhook bodies the bridge delivers, as models: every event type and its fields.

Every body is ``{"type": ..., "timestamp": ..., "data": {...}}``. The diff builds them
as plain dicts encoded by orjson (`poll.diff`: no validation on the hot path, and the
call's item embedded as the bytes it was served as); these models are the one
description of them. `callbridge.api.catalog` publishes them as JSON Schemas, examples and
OpenAPI ``webhooks``, and the tests hold the diff to them: every body it builds
validates, field for field (tests/unit/test_events.py), and so does every body the
turbulence runs deliver (tests/support/event_schemas.py).

The schemas are exact: the bridge's own objects (the body, ``data``) list every field
they have and allow no other (``additionalProperties: false``); ``data.call`` is the
platform's item and may carry fields the platform adds. A later version that adds a
field changes these models, and the committed schemas with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, create_model

from callbridge.models import KNOWN_STATUSES, TERMINAL_STATUSES, CallItem

CALL_UPDATED = "call.updated"
BATCH_COMPLETED = "batch.completed"
BATCH_RETIRED = "batch.retired"
# The catalog's name for `call.<status>` with a status the platform's docs do not list.
CALL_OTHER_STATUS = "call.{status}"
SUBSCRIPTION_BREAKER_OPENED = "subscription.breaker_opened"
SUBSCRIPTION_RECOVERED = "subscription.recovered"
SUBSCRIPTION_DISABLED = "subscription.disabled"
DELIVERY_DEAD_LETTERED = "delivery.dead_lettered"

# `models.iso_ms`: UTC, milliseconds, ``Z``.
TIMESTAMP_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z$"
Timestamp = Annotated[
    str, Field(pattern=TIMESTAMP_PATTERN, json_schema_extra={"format": "date-time"})
]
# A status as the diff reports it: trimmed and lowercased (`models.normalise_status`).
Status = Annotated[str, Field(min_length=1)]
# The statuses the platform documents (`models.KNOWN_STATUSES`, checked by a test).
DocumentedStatus = Literal[
    "pending",
    "queued",
    "ringing",
    "answered",
    "in_progress",
    "completed",
    "failed",
    "no_answer",
    "busy",
    "cancelled",
]
# `models.TERMINAL_STATUSES`, checked by a test.
# `removed`: a call the platform stopped listing, reported once by `call.updated` with
# `removed: true`, then counted as finished.
TerminalStatus = Literal["completed", "failed", "no_answer", "busy", "cancelled", "removed"]

Group = Literal["call", "batch", "operational"]


class _Exact(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _CallFields(_Exact):
    batch_id: str = Field(description="The batch the call belongs to.")
    call_id: str = Field(min_length=1, description="The platform's id of the call.")
    external_id: str | None = Field(
        description="The call's `external_id` as served (null when it has none)."
    )
    status: Status = Field(
        description="The call's status, trimmed and lowercase: the `<status>` of the event type."
    )
    previous_status: Status | None = Field(
        description="The status the bridge last reported for the call; null on first sight."
    )
    sequence: int = Field(
        ge=1,
        description="1, 2, 3, ... per call, one per event of the call. Retries can reorder "
        "deliveries: order a call's events by it. After a Redis failover with "
        "`redis.min_replicas_to_ack: 0`, a number may come again on another event (the "
        "one delivered later is the bridge's view after the failover).",
    )
    initial: bool = Field(
        description="True when the bridge first saw the call in this status (not pending): "
        "`previous_status` is then null. Never true with `backfill: false`."
    )
    skipped_statuses: list[DocumentedStatus] = Field(
        description="Statuses of the normal lifecycle the call passed between two polls "
        "without being served to the bridge, in lifecycle order."
    )
    missed_terminal: bool = Field(
        description="True when the call was redialled and the platform never showed how "
        "its previous attempt ended: it moved back between two non-terminal statuses, "
        "confirmed by a second look. False on every other event."
    )


class CallStatusData(_CallFields):
    """The call's status changed, or the bridge saw the call for the first time."""

    call: CallItem = Field(description="The call exactly as the platform served it.")


class CallUpdatedData(_CallFields):
    """Other fields of the call changed under the same status."""

    previous_status: Status = Field(description="The call's status: it did not change.")
    initial: Literal[False] = Field(description="Always false.")
    skipped_statuses: list[DocumentedStatus] = Field(max_length=0, description="Always empty.")
    missed_terminal: Literal[False] = Field(description="Always false.")
    changed_fields: list[str] = Field(
        description="Names of the fields of `call` that changed, sorted. A field that "
        "went back to null or disappeared is not a change (an upstream glitch). Empty only "
        "with `removed`.",
    )
    removed: Literal[True] | None = Field(
        default=None,
        description="Present (true) only when the platform stopped listing the call for "
        "`poller.vanished_call_seconds`: reported once, `status` the last one seen, `call` "
        "null; the call then counts as finished (status `removed` in `batch.completed`).",
    )
    call: CallItem | None = Field(
        description="The call exactly as the platform served it; null only with `removed`."
    )


class BatchRetiredData(_Exact):
    """The bridge stopped watching the batch without it completing."""

    batch_id: str = Field(description="The batch.")
    reason: Literal["not_found"] = Field(
        description="not_found: the API answered 404 for `poller.not_found_retire_seconds`."
    )
    not_found_since: Timestamp = Field(description="Since when the API answered 404.")


class BatchCompletedData(_Exact):
    """Every call of the batch is in a final status."""

    batch_id: str = Field(description="The batch.")
    total: int = Field(ge=1, description="Calls in the batch: the sum of `counts`.")
    counts: dict[TerminalStatus, Annotated[int, Field(ge=1)]] = Field(
        description="Calls per final status, sorted by status; only statuses that have calls."
    )


class SubscriptionStateData(_Exact):
    """A subscription's delivery state changed."""

    subscription: str = Field(description="The subscription's name, as in the config.")
    reason: str | None = Field(description="Why, in words; null when there is nothing to add.")
    failing_since: Timestamp | None = Field(
        description="When the endpoint started failing; null when it is not failing."
    )
    at: Timestamp = Field(description="When the state changed.")


class DeadLetterData(_Exact):
    """A delivery gave up and went to the subscription's dead letters."""

    subscription: str = Field(description="The subscription's name, as in the config.")
    event_id: str = Field(description="The dead-lettered event's id (its `webhook-id`).")
    event_type: str = Field(description="The dead-lettered event's type.")
    attempts: int = Field(
        ge=0,
        description="Attempts made; 0 when the delivery went to the dead letters at once "
        "(the subscription's backlog was full).",
    )
    last_error: str | None = Field(description="The last attempt's error; null when none.")
    at: Timestamp = Field(description="When the delivery was dead-lettered.")


DataT = TypeVar("DataT", bound=BaseModel)


class EventBody(_Exact, Generic[DataT]):
    """A webhook body; its id is the ``webhook-id`` header."""

    type: str = Field(description="The event type.")
    timestamp: Timestamp = Field(
        description="When the bridge saw what the event reports (UTC). The time of each "
        "delivery attempt is the `webhook-timestamp` header."
    )
    data: DataT


@dataclass(frozen=True, slots=True)
class EventType:
    """One entry of the catalog: a type, the model of its bodies, and what it means."""

    name: str
    group: Group
    model: type[BaseModel]
    description: str

    @property
    def operational(self) -> bool:
        """About the bridge's deliveries, not about calls: for the team running it."""
        return self.group == "operational"


def _entry(
    name: str, group: Group, data: type[BaseModel], description: str, *, type_: Any = None
) -> EventType:
    # The model's name is the type's in CamelCase (call.no_answer -> CallNoAnswerEvent):
    # what code generators name their classes after.
    words = name.replace("{", "").replace("}", "").replace(".", "_").split("_")
    # A Literal built at run time: one value per type, a `const` in the schema.
    pinned: Any = Literal[name] if type_ is None else type_
    model = create_model(
        "".join(w.capitalize() for w in words) + "Event",
        __base__=EventBody[data],  # type: ignore[valid-type]
        __doc__=description,
        __module__=__name__,
        type=(pinned, Field(description="The event type.")),
    )
    return EventType(name, group, model, description)


_STATUS_MEANING: dict[str, str] = {
    "pending": "The call is back at pending: it is being redialled (see `previous_status` "
    "and `missed_terminal`). A call first seen pending is recorded silently.",
    "queued": "The call is queued for dialling.",
    "ringing": "The call is ringing.",
    "answered": "The call was answered.",
    "in_progress": "The conversation is under way.",
    "completed": "The call ended normally.",
    "failed": "The call failed; this can happen at any point of its lifecycle.",
    "no_answer": "Nobody answered.",
    "busy": "The line was busy.",
    "cancelled": "The call was cancelled.",
}
_FINAL = " A final status; a redial may still follow, with a higher `sequence`."
_OPERATIONAL = "Operational event (about deliveries, not calls). "


def _call_status(status: str) -> EventType:
    final = _FINAL if status in TERMINAL_STATUSES else ""
    return _entry(f"call.{status}", "call", CallStatusData, _STATUS_MEANING[status] + final)


EVENT_TYPES: tuple[EventType, ...] = (
    *(_call_status(s) for s in KNOWN_STATUSES),
    _entry(
        CALL_OTHER_STATUS,
        "call",
        CallStatusData,
        "`call.<status>` for a status the platform's documentation does not list (e.g. "
        "`call.voicemail`): the bridge reports every status it is served, trimmed and "
        "lowercase. The type is always `call.` followed by `data.status`.",
        type_=Annotated[str, Field(pattern=r"^call\..+$")],
    ),
    _entry(
        CALL_UPDATED,
        "call",
        CallUpdatedData,
        "Fields of the call other than its status changed (`changed_fields`): a late "
        "`ended_at` or `duration_seconds`, edited metadata.",
    ),
    _entry(
        BATCH_COMPLETED,
        "batch",
        BatchCompletedData,
        "Every call of the batch is in a final status, as seen by a scan that read the whole "
        "batch. Sent again if a redial reopens the batch and it completes again.",
    ),
    _entry(
        BATCH_RETIRED,
        "batch",
        BatchRetiredData,
        "The batch ended without completing: the API answered 404 for it for "
        "`poller.not_found_retire_seconds` (1 day). The bridge stops polling it.",
    ),
    _entry(
        SUBSCRIPTION_BREAKER_OPENED,
        "operational",
        SubscriptionStateData,
        _OPERATIONAL + "The subscription's circuit breaker opened: deliveries to it pause "
        "and a probe tests the endpoint.",
    ),
    _entry(
        SUBSCRIPTION_RECOVERED,
        "operational",
        SubscriptionStateData,
        _OPERATIONAL + "The subscription's endpoint answers again: deliveries resume.",
    ),
    _entry(
        SUBSCRIPTION_DISABLED,
        "operational",
        SubscriptionStateData,
        _OPERATIONAL + "The subscription was disabled (its endpoint answered 410 Gone); its "
        "events stay queued until an operator re-enables it.",
    ),
    _entry(
        DELIVERY_DEAD_LETTERED,
        "operational",
        DeadLetterData,
        _OPERATIONAL + "A delivery went to the subscription's dead letters (retries "
        "exhausted, or the backlog full); it can be replayed.",
    ),
)

_BY_NAME = {t.name: t for t in EVENT_TYPES}


def event_type(name: str) -> EventType:
    """The catalog entry describing events of type `name`; KeyError when none does.

    ``call.<x>`` for a status the catalog does not list is `CALL_OTHER_STATUS`.
    """
    found = _BY_NAME.get(name)
    if found is None and name.startswith("call.") and name != CALL_OTHER_STATUS:
        found = _BY_NAME[CALL_OTHER_STATUS]
    if found is None:
        raise KeyError(name)
    return found
