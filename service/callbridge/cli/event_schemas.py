"""``callbridge event-schemas``: write the event catalog, or check a written one.

    callbridge event-schemas --out schemas/       # the JSON Schemas of this version
    callbridge event-schemas --out docs/events --openapi service/callbridge/api/openapi.json
    ... --check                                   # exit 1 when they are not up to date

``--out`` gets one JSON Schema per event type, ``index.json`` and a ``README.md``
(`callbridge.api.catalog.files`); ``--openapi`` rewrites the ``webhooks`` section of an
OpenAPI 3.1 document and the components it uses, leaving the rest as written
(`callbridge.api.webhooks`). A ``.json`` file in ``--out`` that the catalog no longer
generates is reported, never deleted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_STALE, EXIT_USAGE = 0, 1, 2


def expected(out: Path | None, openapi: Path | None) -> dict[Path, str]:
    """Every file the catalog generates, by path, with its content."""
    from callbridge.api.catalog import files
    from callbridge.api.webhooks import render, with_webhooks

    wanted: dict[Path, str] = {}
    if out is not None:
        wanted.update({out / name: text for name, text in files().items()})
    if openapi is not None:
        wanted[openapi] = render(with_webhooks(json.loads(openapi.read_text())))
    return wanted


def problems(wanted: dict[Path, str], out: Path | None) -> list[str]:
    """What differs from `wanted` on disk, one line per file; empty when up to date."""
    found = []
    for path, text in wanted.items():
        if not path.exists():
            found.append(f"{path}: missing")
        elif path.read_text() != text:
            found.append(f"{path}: differs from what the models generate")
    if out is not None and out.is_dir():
        for path in sorted(out.glob("*.json")):
            if path not in wanted:
                found.append(f"{path}: not generated any more (delete it)")
    return found


def cmd_event_schemas(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else None
    openapi = Path(args.openapi) if args.openapi else None
    if out is None and openapi is None:
        print("nothing to do: give --out DIR and/or --openapi FILE", file=sys.stderr)
        return EXIT_USAGE
    if openapi is not None and not openapi.is_file():
        print(f"{openapi}: no such file", file=sys.stderr)
        return EXIT_USAGE
    wanted = expected(out, openapi)
    if not args.check:
        for path, text in wanted.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists() or path.read_text() != text:
                path.write_text(text)
                print(f"wrote {path}")
    found = problems(wanted, out)
    for line in found:
        print(line, file=sys.stderr)
    if found and args.check:
        print("run `callbridge event-schemas` without --check to regenerate", file=sys.stderr)
        return EXIT_STALE
    print(f"{len(wanted)} files up to date")
    return EXIT_OK


def add_event_schemas_parser(sub: Any) -> None:
    """Register ``event-schemas`` on the ``callbridge`` subparsers."""
    p = sub.add_parser(
        "event-schemas",
        help="write the event catalog (a JSON Schema per event type, OpenAPI webhooks)",
        description=(__doc__ or "").replace("``", "`"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", metavar="DIR", help="directory for the JSON Schemas and index")
    p.add_argument(
        "--openapi", metavar="FILE", help="an OpenAPI 3.1 document whose webhooks to rewrite"
    )
    p.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 when a file is not up to date"
    )
    p.set_defaults(func=cmd_event_schemas)
