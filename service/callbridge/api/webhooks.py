"""The ``webhooks`` of ``openapi.json``: the requests the bridge sends, from the catalog.

OpenAPI 3.1 describes outgoing requests in a ``webhooks`` section: one entry per event
type, with the body's schema (`callbridge.models.events`' models, as components), an
example, the Standard Webhooks headers and what each answer does. `with_webhooks`
rewrites that section of a document and leaves the hand-written rest as it is;
``callbridge event-schemas`` applies it to the packaged document, and a test fails when
the committed one is not what it gives.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

from pydantic.json_schema import models_json_schema

from callbridge.api.catalog import SchemaGenerator, example
from callbridge.constants import (
    HEADER_WEBHOOK_ID,
    HEADER_WEBHOOK_SIGNATURE,
    HEADER_WEBHOOK_TIMESTAMP,
)
from callbridge.models.events import EVENT_TYPES, EventType

JsonDoc = dict[str, Any]

_TAGS = {
    "call": "call events",
    "batch": "batch events",
    "operational": "operational events",
}
_TAG_TEXT = {
    "call events": "Webhooks about calls: `call.<status>` and `call.updated`.",
    "batch events": "Webhooks about batches.",
    "operational events": "Webhooks about the bridge's deliveries to a subscription, for the "
    "team that runs it.",
}
_REQUEST_TEXT = (
    "Sent as `POST` to the subscription's URL with `Content-Type: application/json` and "
    "the subscription's own `headers`, signed per Standard Webhooks. Deduplicate on "
    "`webhook-id`: every attempt of an event carries the same id and the same body."
)
_PARAMETERS: dict[str, JsonDoc] = {
    "WebhookId": {
        "name": HEADER_WEBHOOK_ID,
        "in": "header",
        "required": True,
        "description": "The event's id, a digest of the event and its exact body: the same "
        "on every attempt and redelivery, never on two bodies. Receivers deduplicate on it.",
        "schema": {"type": "string", "minLength": 1},
        "example": "evt_3f1c2a9b8d7e6f5a4b3c2d1e",
    },
    "WebhookTimestamp": {
        "name": HEADER_WEBHOOK_TIMESTAMP,
        "in": "header",
        "required": True,
        "description": "Unix time of this attempt, in seconds (fresh per attempt). Reject "
        "requests too far from your clock (Standard Webhooks suggests 5 minutes).",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
        "example": "1795860005",
    },
    "WebhookSignature": {
        "name": HEADER_WEBHOOK_SIGNATURE,
        "in": "header",
        "required": True,
        "description": '`v1,<base64 HMAC-SHA256 of "{webhook-id}.{webhook-timestamp}.{body}">` '
        "with the subscription's secret (the bytes after `whsec_`, base64-decoded); several, "
        "space-separated, while secrets rotate: accept the request when any one matches.",
        "schema": {"type": "string", "pattern": "^v1,[A-Za-z0-9+/=]+( v1,[A-Za-z0-9+/=]+)*$"},
        "example": "v1,K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4=",
    },
    "Traceparent": {
        "name": "traceparent",
        "in": "header",
        "required": False,
        "description": "May be present: the W3C Trace Context of the delivery attempt, when "
        "the bridge traces; continue the trace from it. Not signed: it is outside the signed "
        "content, so a valid signature says nothing about it.",
        "schema": {"type": "string"},
        "example": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    },
    "Tracestate": {
        "name": "tracestate",
        "in": "header",
        "required": False,
        "description": "W3C Trace Context vendor state, sent with `traceparent` when set. "
        "Not signed.",
        "schema": {"type": "string"},
    },
}
_RESPONSES: dict[str, JsonDoc] = {
    "WebhookAccepted": {
        "description": "Delivered. Any 2xx counts; the body is ignored. Answer quickly: "
        "the attempt times out after the subscription's `timeout_seconds`."
    },
    "WebhookGone": {
        "description": "410 Gone disables the subscription until an operator re-enables it; "
        "its events stay queued."
    },
    "WebhookTooManyRequests": {
        "description": "Paces the subscription: retried no earlier than `Retry-After` "
        "(seconds; 1 when absent). Not counted towards the circuit breaker.",
        "headers": {"Retry-After": {"schema": {"type": "string"}}},
    },
    "WebhookFailed": {
        "description": "Any other answer, a redirect (never followed), a timeout or a "
        "connection failure: retried on the subscription's schedule, then dead-lettered."
    },
}


def _webhook(event_type: EventType, ref: JsonDoc) -> JsonDoc:
    return {
        "post": {
            "summary": event_type.name,
            "description": event_type.description + "\n\n" + _REQUEST_TEXT,
            "tags": [_TAGS[event_type.group]],
            "parameters": [{"$ref": f"#/components/parameters/{p}"} for p in _PARAMETERS],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": ref, "example": example(event_type.name)}
                },
            },
            "responses": {
                "2XX": {"$ref": "#/components/responses/WebhookAccepted"},
                "410": {"$ref": "#/components/responses/WebhookGone"},
                "429": {"$ref": "#/components/responses/WebhookTooManyRequests"},
                "default": {"$ref": "#/components/responses/WebhookFailed"},
            },
        }
    }


def openapi_parts() -> tuple[JsonDoc, dict[str, JsonDoc]]:
    """The ``webhooks`` section and the components it refers to, by component kind."""
    refs, defs = models_json_schema(
        [(t.model, "validation") for t in EVENT_TYPES],
        ref_template="#/components/schemas/{model}",
        schema_generator=SchemaGenerator,
    )
    webhooks = {t.name: _webhook(t, refs[(t.model, "validation")]) for t in EVENT_TYPES}
    components = {
        "schemas": defs["$defs"],
        "parameters": copy.deepcopy(_PARAMETERS),
        "responses": copy.deepcopy(_RESPONSES),
    }
    return webhooks, components


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _reachable(doc: JsonDoc, root: Any) -> set[tuple[str, str]]:
    """(kind, name) of every component `root` refers to, directly or through others."""
    found: set[tuple[str, str]] = set()
    todo = list(_refs(root))
    while todo:
        kind, name = todo.pop().removeprefix("#/components/").split("/", 1)
        if (kind, name) not in found:
            found.add((kind, name))
            todo.extend(_refs(doc.get("components", {}).get(kind, {}).get(name)))
    return found


def with_webhooks(doc: JsonDoc) -> JsonDoc:
    """`doc` (an OpenAPI 3.1 document) with its webhooks, their components and tags
    replaced by the catalog's; the rest is left as written.

    ValueError when a generated component would replace one the paths use.
    """
    webhooks, generated = openapi_parts()
    new = {(kind, name) for kind, entries in generated.items() for name in entries}
    written = _reachable(doc, doc.get("paths", {}))
    if new & written:
        raise ValueError(f"the paths use components of these names: {sorted(new & written)}")
    out = copy.deepcopy(doc)
    components = out.setdefault("components", {})
    # Drop what the old webhooks used (a type removed takes its components along) and
    # every name about to be written: the new ones then come in the catalog's order,
    # whatever the document held, and regenerating twice gives the same bytes.
    for kind, name in (_reachable(doc, doc.get("webhooks", {})) - written) | new:
        components.get(kind, {}).pop(name, None)
    for kind, entries in generated.items():
        components.setdefault(kind, {}).update(entries)
    out["webhooks"] = webhooks
    tags = [t for t in out.get("tags", []) if t.get("name") not in _TAG_TEXT]
    out["tags"] = tags + [{"name": n, "description": d} for n, d in _TAG_TEXT.items()]
    return out


def render(doc: JsonDoc) -> str:
    """The document as committed: two-space indented, UTF-8, a final newline."""
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
