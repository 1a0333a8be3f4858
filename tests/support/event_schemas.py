"""Webhook bodies checked against the published event catalog, as a receiver would.

The schemas are read from the committed files (``docs/events/``, listed by its
``index.json``), not regenerated from the models: what is checked is what a CRM
developer downloads. (A unit test holds those files to the models.) Validation is
`jsonschema`'s, draft 2020-12. One rule no JSON Schema can state is checked besides:
a status event's type is ``call.`` followed by its ``data.status``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import orjson
from jsonschema import Draft202012Validator

from callbridge.models.events import CALL_UPDATED, event_type

CATALOG_DIR = Path(__file__).resolve().parents[2] / "docs" / "events"


@cache
def validators() -> dict[str, Draft202012Validator]:
    """Catalog type name -> a validator of its published schema."""
    index = json.loads((CATALOG_DIR / "index.json").read_text())
    out = {}
    for entry in index["event_types"]:
        schema = json.loads((CATALOG_DIR / entry["schema"]).read_text())
        Draft202012Validator.check_schema(schema)
        out[entry["type"]] = Draft202012Validator(schema)
    return out


def violations(body: bytes) -> list[str]:
    """What is wrong with one body, one line per problem; empty when it conforms."""
    try:
        doc: Any = orjson.loads(body)
        name = event_type(doc["type"]).name
    except (orjson.JSONDecodeError, TypeError, KeyError, AttributeError) as exc:
        return [f"not an event of the catalog: {exc!r}"]
    validator = validators().get(name)
    if validator is None:
        return [f"{name}: no published schema"]
    found = [
        f"{doc['type']}: {'/'.join(map(str, e.absolute_path)) or '(body)'}: {e.message}"
        for e in validator.iter_errors(doc)
    ]
    status_event = name.startswith("call.") and name != CALL_UPDATED
    if not found and status_event and doc["type"] != f"call.{doc['data']['status']}":
        found.append(f"{doc['type']}: data.status is {doc['data']['status']!r}")
    return found


@dataclass
class SchemaCheck:
    """Every distinct body of a run against its published schema."""

    checked: int = 0
    by_type: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)  # "<webhook-id>: <problem>"

    def __str__(self) -> str:
        return (
            f"schemas: {self.checked} bodies checked, {len(self.violations)} violations, "
            f"by type {dict(sorted(self.by_type.items()))}"
            + "".join(f"\n  schema violation: {v}" for v in self.violations[:5])
        )


def check_bodies(requests: Iterable[tuple[str, bytes]]) -> SchemaCheck:
    """(webhook-id, body) pairs; each distinct pair is validated once."""
    report = SchemaCheck()
    for webhook_id, body in dict.fromkeys(requests):
        report.checked += 1
        found = violations(body)
        report.by_type["?" if found else orjson.loads(body)["type"]] += 1
        report.violations += [f"{webhook_id}: {v}" for v in found]
    return report
