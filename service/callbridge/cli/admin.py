"""``callbridge admin``: the admin API (``/v1``) from a terminal.

    callbridge admin batches list | add BATCH [--no-backfill] | remove BATCH
    callbridge admin timeline BATCH CALL
    callbridge admin subscriptions list | enable NAME
    callbridge admin dead-letters list NAME [--limit N] [--offset N] | replay NAME [--id EVENT ...]
    callbridge admin redeliver EVENT
    callbridge admin recover NAME --since 2h [--until 30m | ISO time] | recoveries NAME

The bridge's URL and admin token come from ``--url`` / ``--token`` or
``CALLBRIDGE_ADMIN_URL`` / ``CALLBRIDGE_ADMIN_TOKEN`` (the variable keeps the token out
of the process list and shell history). Output is a table for people, or the API's
``data`` as JSON with ``--json``. Exit codes scripts can rely on:

    0  done
    1  not found (batch, call, subscription, event)
    2  usage: bad arguments, or a request the API refused as invalid
    3  auth: no token, or the bridge rejected it
    4  the bridge could not be reached, or failed
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from callbridge.cli import tables

EXIT_OK, EXIT_NOT_FOUND, EXIT_USAGE, EXIT_AUTH, EXIT_UNAVAILABLE = 0, 1, 2, 3, 4
DEFAULT_URL = "http://127.0.0.1:8080"


class AdminError(Exception):
    """A request that did not succeed; `code` is the exit code it maps to."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # under /v1
    body: dict[str, Any] | None = None
    params: dict[str, str] | None = None


async def call_api(base_url: str, token: str, req: Request, timeout_s: float) -> Any:
    """One admin API request; returns the envelope's ``data`` or raises `AdminError`."""
    import aiohttp  # here, so the rest of the CLI starts without it

    url = base_url + "/v1" + req.path
    headers = {"Authorization": f"Bearer {token}"}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
            session.request(
                req.method, url, json=req.body, params=req.params, headers=headers
            ) as resp,
        ):
            status = resp.status
            try:
                doc = await resp.json(content_type=None)
            except ValueError:
                doc = None
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise AdminError(
            f"cannot reach {base_url}: {exc or type(exc).__name__}", EXIT_UNAVAILABLE
        ) from None
    message = doc.get("message", "") if isinstance(doc, dict) else ""
    if status == 401:
        raise AdminError(f"{url}: admin token rejected", EXIT_AUTH)
    if status == 404:
        hint = " (is the admin API on? it needs admin.token)" if message == "Not found" else ""
        raise AdminError(f"not found: {message or url}{hint}", EXIT_NOT_FOUND)
    if status == 400:
        raise AdminError(f"refused: {message}", EXIT_USAGE)
    if not 200 <= status < 300 or not isinstance(doc, dict):
        raise AdminError(f"{req.method} {url} answered {status}: {message}", EXIT_UNAVAILABLE)
    return doc.get("data")


# -- rendering -------------------------------------------------------------------------


_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def instant(value: str, now_s: float) -> str | int:
    """``2h`` / ``30m`` / ``90s`` / ``1d`` ago as epoch ms, or an ISO time as given."""
    unit = _UNITS_S.get(value[-1:].lower())
    if unit is not None:
        try:
            return int((now_s - float(value[:-1]) * unit) * 1000)
        except ValueError:
            pass
    return value


# -- commands: argparse namespace -> request and renderer -------------------------------

Render = Callable[[Any], str]


def plan(args: argparse.Namespace) -> tuple[Request, Render]:
    """The request a command makes and how its answer is shown."""
    what = args.admin_command
    if what == "batches":
        if args.action == "list":
            return Request("GET", "/batches"), tables.batches
        if args.action == "add":
            body: dict[str, Any] = {"id": args.batch}
            if args.backfill is not None:
                body["backfill"] = args.backfill
            return Request("POST", "/batches", body), lambda d: f"watching batch {d['id']}"
        return (
            Request("DELETE", f"/batches/{_seg(args.batch)}"),
            lambda d: f"batch {d['id']} removed",
        )
    if what == "timeline":
        path = f"/batches/{_seg(args.batch)}/calls/{_seg(args.call)}/timeline"
        return Request("GET", path), tables.timeline
    if what == "subscriptions":
        if args.action == "list":
            return Request("GET", "/subscriptions"), tables.subscriptions
        return (
            Request("POST", f"/subscriptions/{_seg(args.name)}/enable"),
            lambda d: f"subscription {d['name']} enabled",
        )
    if what == "dead-letters":
        base = f"/subscriptions/{_seg(args.name)}/dead-letters"
        if args.action == "list":
            params = {"limit": str(args.limit), "offset": str(args.offset)}
            return Request("GET", base, params=params), tables.dead_letters
        body = {"ids": args.ids} if args.ids else {}
        return Request("POST", base + "/replay", body), _replayed(args.name)
    if what == "recover":
        now = time.time()
        body = {"since": instant(args.since, now)}
        if args.until:
            body["until"] = instant(args.until, now)
        return (
            Request("POST", f"/subscriptions/{_seg(args.name)}/recover", body),
            lambda d: (
                f"recovery job {d['id']} of {args.name}: {d['state']}, "
                f"{d['requeued']} due again so far (callbridge admin recoveries {args.name})"
            ),
        )
    if what == "recoveries":
        return Request("GET", f"/subscriptions/{_seg(args.name)}/recover"), tables.jobs
    return (
        Request("POST", f"/events/{_seg(args.event)}/redeliver"),
        lambda d: f"event {d['event_id']} due again for: {', '.join(d['subscriptions'])}",
    )


def _replayed(name: str) -> Render:
    def render(d: dict[str, Any]) -> str:
        job = d.get("job")
        if job is None:  # by ids (or all, from a bridge of a previous release)
            return f"{d['replayed']} dead letter(s) of {name} due again"
        return (
            f"replay job {job['id']} of {name}: {job['total']} dead letter(s) to look at, "
            f"made due again in the background (follow it: callbridge admin recoveries {name})"
        )

    return render


def _seg(value: str) -> str:
    """A path segment: ids never contain '/', but never let one change the route."""
    from urllib.parse import quote

    return quote(value, safe="")


async def run(
    args: argparse.Namespace, out: TextIO, err: TextIO, env: Mapping[str, str] = os.environ
) -> int:
    """Run one parsed ``callbridge admin`` command; returns the exit code."""
    url = (args.url or env.get("CALLBRIDGE_ADMIN_URL") or DEFAULT_URL).rstrip("/")
    url = url.removesuffix("/v1")
    token = args.token or env.get("CALLBRIDGE_ADMIN_TOKEN")
    if not token:
        print("no admin token: set CALLBRIDGE_ADMIN_TOKEN or use --token", file=err)
        return EXIT_AUTH
    req, render = plan(args)
    try:
        data = await call_api(url, token, req, args.timeout)
    except AdminError as exc:
        print(f"error: {exc}", file=err)
        return exc.code
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True), file=out)
    else:
        print(render(data), file=out)
    return EXIT_OK


def cmd_admin(args: argparse.Namespace) -> int:
    return asyncio.run(run(args, sys.stdout, sys.stderr))


# -- the parser --------------------------------------------------------------------------


def _connection_options(p: argparse.ArgumentParser, default: object) -> None:
    # Accepted before and after the subcommand; SUPPRESS on the inner parsers keeps
    # them from resetting a value given before.
    p.add_argument(
        "--url",
        default=default,
        help=f"bridge URL (default: $CALLBRIDGE_ADMIN_URL, else {DEFAULT_URL})",
    )
    p.add_argument(
        "--token",
        default=default,
        help="admin token (default: $CALLBRIDGE_ADMIN_TOKEN, which stays out of `ps`)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        default=default if default is argparse.SUPPRESS else False,
        help="print the API's data as JSON, for scripts",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=default if default is argparse.SUPPRESS else 10.0,
        help="seconds to wait for the bridge (default 10)",
    )


def add_admin_parser(sub: Any) -> None:
    """Register ``admin`` and its subcommands on the ``callbridge`` subparsers."""
    admin = sub.add_parser(
        "admin",
        help="the admin API from a terminal: batches, timelines, subscriptions, dead letters",
        description=(__doc__ or "").replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _connection_options(admin, None)
    admin.set_defaults(func=cmd_admin)
    common = argparse.ArgumentParser(add_help=False)
    _connection_options(common, argparse.SUPPRESS)
    commands = admin.add_subparsers(dest="admin_command", required=True, metavar="COMMAND")

    batches = commands.add_parser("batches", help="watched batches")
    actions = batches.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", parents=[common], help="batches with lifecycle, calls, owner")
    p = actions.add_parser("add", parents=[common], help="watch a batch from now on")
    p.add_argument("batch")
    p.add_argument(
        "--backfill",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="emit events for calls already past pending (default: poller.backfill)",
    )
    p = actions.add_parser("remove", parents=[common], help="stop watching a batch")
    p.add_argument("batch")

    p = commands.add_parser("timeline", parents=[common], help="a call's observed statuses")
    p.add_argument("batch")
    p.add_argument("call")

    subs = commands.add_parser("subscriptions", help="webhook subscriptions")
    actions = subs.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", parents=[common], help="state, breaker and queue per subscription")
    p = actions.add_parser("enable", parents=[common], help="re-enable (after 410 Gone)")
    p.add_argument("name")

    dead = commands.add_parser("dead-letters", help="deliveries that exhausted their retries")
    actions = dead.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser("list", parents=[common], help="a subscription's dead letters")
    p.add_argument("name")
    p.add_argument("--limit", type=int, default=100, help="at most this many (1-1000)")
    p.add_argument("--offset", type=int, default=0, help="skip this many")
    p = actions.add_parser(
        "replay",
        parents=[common],
        help="make dead letters due again (all: a background job, see recoveries)",
    )
    p.add_argument("name")
    p.add_argument(
        "--id",
        dest="ids",
        action="append",
        metavar="EVENT",
        help="only this event (repeatable, up to 1000); without: every dead letter",
    )

    p = commands.add_parser(
        "redeliver", parents=[common], help="send an event again to every subscription"
    )
    p.add_argument("event")
    p = commands.add_parser(
        "recover",
        parents=[common],
        help="re-send what a subscription did not get a 2xx for in a time window",
    )
    p.add_argument("name")
    p.add_argument("--since", required=True, help="2h, 30m, 1d ago, or an ISO time with zone")
    p.add_argument("--until", help="end of the window (same forms); default: now on")
    p = commands.add_parser("recoveries", parents=[common], help="a subscription's recovery jobs")
    p.add_argument("name")
