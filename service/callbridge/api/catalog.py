"""The published event catalog: one JSON Schema (draft 2020-12) per event type, with an
example, and the OpenAPI 3.1 ``webhooks`` that describe the requests themselves.

Everything here is generated from the body models (`callbridge.models.events`), purely: the
admin API serves it (``GET /v1/event-types``), and ``callbridge event-schemas`` writes it
to ``docs/events/`` and into the packaged ``openapi.json``, where it is committed. A test
regenerates both and fails when the committed copies differ.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from typing import Any

from pydantic.json_schema import GenerateJsonSchema

from callbridge.models.events import (
    BATCH_COMPLETED,
    BATCH_RETIRED,
    CALL_OTHER_STATUS,
    CALL_UPDATED,
    DELIVERY_DEAD_LETTERED,
    EVENT_TYPES,
    SUBSCRIPTION_BREAKER_OPENED,
    SUBSCRIPTION_DISABLED,
    SUBSCRIPTION_RECOVERED,
    EventType,
)

DIALECT = "https://json-schema.org/draft/2020-12/schema"
INDEX_FILE = "index.json"
README_FILE = "README.md"

JsonDoc = dict[str, Any]


class SchemaGenerator(GenerateJsonSchema):
    """Pydantic's generator without a title per field ("Call Id" for call_id: noise; the
    models keep theirs, which code generators name their types after)."""

    def field_title_should_be_set(self, schema: Any) -> bool:  # pydantic's type is private
        return False


# --- examples -----------------------------------------------------------------------
# One body per type, as the diff builds them (a test diffs each call example's story
# and compares): a call of one batch, followed along its lifecycle.

_AT = "2026-11-28T10:00:05.123Z"
_BATCH = "sched_bdb2b840"
_STARTED, _ENDED = "2026-11-28T09:58:41.000Z", "2026-11-28T10:00:03.000Z"


def example_call(status: str, **fields: Any) -> dict[str, Any]:
    """The platform's item of the example call, in `status`."""
    ended = status in ("completed", "failed", "no_answer", "busy", "cancelled")
    answered = status in ("answered", "in_progress", "completed", "voicemail")
    return {
        "call_id": "call_a1b2c3d4",
        "external_id": "101",
        "phone_number": "+14155550123",
        "name": "John Doe",
        "status": status,
        "duration_seconds": 82.0 if ended and answered else None,
        "started_at": _STARTED if answered else None,
        "ended_at": _ENDED if ended else None,
        "metadata": {"Name": "John Doe", "Company Name": "Acme Corporation"},
        **fields,
    }


# status -> (previous status, sequence, skipped statuses): the call's story up to it.
# Sequence 0 is pending, recorded silently; ringing is a first sight (initial).
_STORY: dict[str, tuple[str | None, int, list[str]]] = {
    "pending": ("no_answer", 4, []),
    "queued": ("pending", 1, []),
    "ringing": (None, 1, []),
    "answered": ("ringing", 2, []),
    "in_progress": ("ringing", 3, ["answered"]),
    "completed": ("in_progress", 4, []),
    "failed": ("ringing", 2, []),
    "no_answer": ("ringing", 2, []),
    "busy": ("ringing", 2, []),
    "cancelled": ("pending", 1, []),
    "voicemail": ("answered", 3, []),
}


def _call_data(status: str) -> dict[str, Any]:
    previous, seq, skipped = _STORY[status]
    return {
        "batch_id": _BATCH,
        "call_id": "call_a1b2c3d4",
        "external_id": "101",
        "status": status,
        "previous_status": previous,
        "sequence": seq,
        "initial": previous is None,
        "skipped_statuses": skipped,
        "missed_terminal": False,
        "call": example_call(status),
    }


def _subscription(reason: str | None, failing: bool) -> dict[str, Any]:
    since = "2026-11-28T09:59:35.000Z" if failing else None
    return {"subscription": "crm", "reason": reason, "failing_since": since, "at": _AT}


_DATA: dict[str, dict[str, Any]] = {
    CALL_OTHER_STATUS: _call_data("voicemail"),
    CALL_UPDATED: {
        **_call_data("completed"),
        "previous_status": "completed",
        "sequence": 5,
        "changed_fields": ["metadata"],
        "call": example_call("completed", metadata={"Name": "John Doe", "Company Name": "Globex"}),
    },
    BATCH_COMPLETED: {
        "batch_id": _BATCH,
        "total": 1200,
        "counts": {"busy": 60, "cancelled": 12, "completed": 900, "failed": 48, "no_answer": 180},
    },
    BATCH_RETIRED: {
        "batch_id": _BATCH,
        "reason": "not_found",
        "not_found_since": "2026-11-27T10:00:05.123Z",
    },
    SUBSCRIPTION_BREAKER_OPENED: _subscription("10 of 20 attempts in 30 s failed", True),
    SUBSCRIPTION_RECOVERED: _subscription(None, False),
    SUBSCRIPTION_DISABLED: _subscription("410 Gone", True),
    DELIVERY_DEAD_LETTERED: {
        "subscription": "crm",
        "event_id": "evt_3f1c2a9b8d7e6f5a4b3c2d1e",
        "event_type": "call.completed",
        "attempts": 8,
        "last_error": "HTTP 500",
        "at": _AT,
    },
}


def example(name: str) -> dict[str, Any]:
    """An example body of the event type `name` (a catalog name)."""
    if name in _DATA:
        type_ = "call.voicemail" if name == CALL_OTHER_STATUS else name
        return {"type": type_, "timestamp": _AT, "data": copy.deepcopy(_DATA[name])}
    return {"type": name, "timestamp": _AT, "data": _call_data(name.removeprefix("call."))}


# --- schemas --------------------------------------------------------------------------


def file_name(event_type: EventType) -> str:
    """``call.completed.json``; ``call.{status}.json`` for the other statuses."""
    return f"{event_type.name}.json"


@cache
def _schema(name: str) -> str:
    event_type = next(t for t in EVENT_TYPES if t.name == name)
    doc = event_type.model.model_json_schema(schema_generator=SchemaGenerator)
    return json.dumps({"$schema": DIALECT, **doc, "examples": [example(name)]})


def schema(event_type: EventType) -> JsonDoc:
    """The self-contained JSON Schema of one event type (a fresh copy: callers may edit)."""
    loaded: JsonDoc = json.loads(_schema(event_type.name))
    return loaded


def catalog() -> list[JsonDoc]:
    """What ``GET /v1/event-types`` lists: every type with its schema and an example."""
    return [
        {
            "type": t.name,
            "operational": t.operational,
            "description": t.description,
            "schema": schema(t),
            "example": example(t.name),
        }
        for t in EVENT_TYPES
    ]


def _dump(doc: Any) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def files() -> dict[str, str]:
    """``docs/events/``: file name -> content (a schema per type, the index, a README)."""
    out = {file_name(t): _dump(schema(t)) for t in EVENT_TYPES}
    index = {
        "description": "callbridge webhook event types: one JSON Schema (draft 2020-12) "
        "per type. Generated by `callbridge event-schemas`; do not edit.",
        "event_types": [
            {
                "type": t.name,
                "operational": t.operational,
                "description": t.description,
                "schema": file_name(t),
            }
            for t in EVENT_TYPES
        ],
    }
    out[INDEX_FILE] = _dump(index)
    out[README_FILE] = _readme()
    return out


def _readme() -> str:
    lines = [
        "# Event catalog",
        "",
        "Generated by `callbridge event-schemas --out docs/events` from the models in",
        "`service/callbridge/models/events.py`; do not edit. One JSON Schema (draft 2020-12) per",
        "event type, each with an example; `index.json` lists them. The same catalog is",
        "served by the admin API at `GET /v1/event-types` and, with the request headers,",
        "as the `webhooks` of `openapi.json`. The README's Events section tells what the",
        "fields mean.",
        "",
    ]
    for title, operational in (("Events", False), ("Operational events", True)):
        lines += [f"## {title}", "", "| type | schema | what |", "|---|---|---|"]
        for t in EVENT_TYPES:
            if t.operational == operational:
                link = file_name(t).replace("{", "%7B").replace("}", "%7D")
                lines.append(f"| `{t.name}` | [{file_name(t)}]({link}) | {t.description} |")
        lines.append("")
    return "\n".join(lines)
