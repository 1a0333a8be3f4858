"""The published catalog: the committed files are what the models generate, every schema
is a valid draft 2020-12 schema, and the body check the turbulence runs use can fail."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import orjson
import pytest
from jsonschema import Draft202012Validator

from callbridge.api import catalog
from callbridge.cli.event_schemas import expected, problems
from callbridge.cli.main import main
from callbridge.models.events import EVENT_TYPES
from tests.support.event_schemas import CATALOG_DIR, check_bodies, violations

ROOT = Path(__file__).resolve().parents[2]
OPENAPI = ROOT / "service" / "callbridge" / "api" / "openapi.json"
REGENERATE = (
    "the committed catalog is not what the models generate: run\n"
    "  callbridge event-schemas --out docs/events --openapi service/callbridge/api/openapi.json"
)


def test_the_committed_catalog_is_what_the_models_generate() -> None:
    found = problems(expected(CATALOG_DIR, OPENAPI), CATALOG_DIR)
    assert found == [], REGENERATE + "\n" + "\n".join(found)


def test_every_event_type_has_a_valid_schema_file_and_an_example_that_validates() -> None:
    index = json.loads((CATALOG_DIR / "index.json").read_text())
    assert [e["type"] for e in index["event_types"]] == [t.name for t in EVENT_TYPES]
    for entry in index["event_types"]:
        schema = json.loads((CATALOG_DIR / entry["schema"]).read_text())
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        Draft202012Validator.check_schema(schema)
        [body] = schema["examples"]
        assert list(Draft202012Validator(schema).iter_errors(body)) == []
        assert schema["additionalProperties"] is False  # exact: see callbridge.models.events


def test_the_check_names_what_is_stale(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "events"
    assert main(["event-schemas", "--out", str(out), "--check"]) == 1
    assert "call.completed.json: missing" in capsys.readouterr().err
    assert main(["event-schemas", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(catalog.files())
    assert main(["event-schemas", "--out", str(out), "--check"]) == 0
    # What a model change without regeneration looks like: the file differs.
    schema = json.loads((out / "call.completed.json").read_text())
    del schema["$defs"]["CallStatusData"]["properties"]["missed_terminal"]
    (out / "call.completed.json").write_text(json.dumps(schema))
    (out / "call.renamed.json").write_text("{}")
    capsys.readouterr()
    assert main(["event-schemas", "--out", str(out), "--check"]) == 1
    err = capsys.readouterr().err
    assert "call.completed.json: differs from what the models generate" in err
    assert "call.renamed.json: not generated any more (delete it)" in err


def test_the_check_covers_the_openapi_webhooks(tmp_path: Path) -> None:
    doc = tmp_path / "openapi.json"
    shutil.copy(OPENAPI, doc)
    args = ["event-schemas", "--openapi", str(doc), "--check"]
    assert main(args) == 0
    edited = json.loads(doc.read_text())
    del edited["webhooks"]["call.updated"]
    doc.write_text(json.dumps(edited))
    assert main(args) == 1
    assert main(args[:-1]) == 0  # rewritten: as committed, byte for byte
    assert doc.read_text() == OPENAPI.read_text()


def test_the_body_check_finds_what_is_wrong() -> None:
    good = catalog.example("call.completed")
    assert violations(orjson.dumps(good)) == []

    def broken(**changes: object) -> list[str]:
        body = json.loads(json.dumps(good))
        for path, value in changes.items():
            *parents, last = path.split("__")
            node = body
            for p in parents:
                node = node[p]
            node[last] = value
        return violations(orjson.dumps(body))

    assert broken(data__trace_id="x")  # a field the catalog does not list
    assert broken(data__sequence="4")  # a field of another type
    assert broken(timestamp="2026-11-28T10:00:05Z")  # not the bridge's form
    assert broken(data__status="failed")  # call.completed must say completed
    assert broken(type="order.created")  # no such event type
    assert violations(b"[]")
    report = check_bodies([("evt_1", orjson.dumps(good)), ("evt_1", orjson.dumps(good))])
    assert (report.checked, report.violations) == (1, [])
