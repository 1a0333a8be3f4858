"""``callbridge admin`` against a running bridge (the real app on a real port).

Commands run in-process through `admin_cli.run` (the same code ``callbridge admin``
runs, with its output captured), and once as the real command in a subprocess to
prove the wiring: entry point, environment variables and exit codes.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis

from callbridge.app import RUNNING, Bridge, build_app
from callbridge.cli import admin as admin_cli
from callbridge.cli.main import build_parser
from callbridge.simulator import Simulator, SimulatorConfig, make_app
from tests.support.prometheus import wait_for
from tests.support.receivers import Receiver
from tests.support.settings import API_KEY, SECRET, make_settings

TOKEN = "admin-token-0123456789"


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@dataclass
class Running:
    url: str
    bridge: Bridge
    sim: Simulator

    async def admin(self, *argv: str, token: str | None = TOKEN) -> Result:
        """``callbridge admin ARGV`` with --url/--token; nothing from the environment."""
        flags = ["--url", self.url] + (["--token", token] if token else [])
        args = build_parser().parse_args(["admin", *flags, *argv])
        out, err = io.StringIO(), io.StringIO()
        code = await admin_cli.run(args, out, err, env={})
        return Result(code, out.getvalue(), err.getvalue())


@pytest.fixture
async def running(redis_url: str, redis_client: aioredis.Redis, aiohttp_server: Any) -> Running:
    """A bridge with one batch polled once and its deliveries drained: crm got them,
    legacy (answering 500, no retries) dead-lettered them."""
    sim = Simulator(SimulatorConfig(api_key=API_KEY, seed=21, calls_per_batch=6))
    sim.advance(4)
    upstream = await aiohttp_server(make_app(sim))
    crm, legacy = Receiver(), Receiver(default=500)
    crm_url = (await aiohttp_server(crm.app())).make_url("/hook")
    legacy_url = (await aiohttp_server(legacy.app())).make_url("/hook")
    settings = make_settings(
        str(upstream.make_url("")),
        redis_url,
        batches=sim.batch_ids,
        subscriptions=[
            {"name": "crm", "url": str(crm_url), "secret": SECRET},
            {
                "name": "legacy",
                "url": str(legacy_url),
                "secret": SECRET,
                "retry_schedule_seconds": [],
            },
        ],
        admin={"token": TOKEN},
    )
    server = await aiohttp_server(build_app(settings, replica_id="t"))
    bridge = server.app[RUNNING]

    async def settled() -> bool:
        """The bridge's own loops polled the batch and finished every delivery."""
        depths = [await bridge.queue.depths(name) for name in ("crm", "legacy")]
        pending = sum(d[s] for d in depths for s in ("ready", "scheduled", "inflight"))
        return bool(crm.delivered) and depths[1]["dead"] > 0 and pending == 0

    await wait_for(settled, timeout_s=15, what="the first poll's deliveries", every_s=0.02)
    return Running(str(server.make_url("")).rstrip("/"), bridge, sim)


async def test_batches_list_add_remove(running: Running) -> None:
    (batch,) = running.sim.batch_ids
    listed = await running.admin("batches", "list")
    assert listed.code == 0, listed.err
    header, row = listed.out.splitlines()
    assert header.split()[:3] == ["BATCH", "LIFECYCLE", "CALLS"]
    assert row.split()[:3] == [batch, "active", "6"]

    added = await running.admin("batches", "add", "sched_new", "--no-backfill")
    assert (added.code, added.out) == (0, "watching batch sched_new\n")
    as_json = await running.admin("batches", "list", "--json")
    assert {b["id"] for b in as_json.json()} == {batch, "sched_new"}

    removed = await running.admin("batches", "remove", "sched_new")
    assert (removed.code, removed.out) == (0, "batch sched_new removed\n")
    gone = await running.admin("batches", "remove", "sched_new")
    assert gone.code == admin_cli.EXIT_NOT_FOUND
    assert "No batch watched with id sched_new" in gone.err
    bad = await running.admin("batches", "add", "not a batch id")
    assert bad.code == admin_cli.EXIT_USAGE
    assert "refused" in bad.err


async def test_timeline(running: Running) -> None:
    (batch,) = running.sim.batch_ids
    call = next(c for c in running.sim.calls(batch) if c["status"] != "pending")
    shown = await running.admin("timeline", batch, call["call_id"])
    assert shown.code == 0, shown.err
    head, columns, *entries = shown.out.splitlines()
    assert head.startswith(f"call {call['call_id']} in batch {batch}: {call['status']}")
    assert columns.split() == ["AT", "STATUS", "SEQUENCE", "EVENT", "EVENT", "ID"]
    assert call["status"] in entries[-1]

    data = (await running.admin("--json", "timeline", batch, call["call_id"])).json()
    assert data["status"] == call["status"]
    assert data["timeline"][-1]["event_id"].startswith("evt_")
    missing = await running.admin("timeline", batch, "call_nope")
    assert missing.code == admin_cli.EXIT_NOT_FOUND


async def test_subscriptions_list_and_enable(running: Running) -> None:
    listed = await running.admin("subscriptions", "list")
    assert listed.code == 0, listed.err
    # Columns are two or more spaces apart; a cell may hold one space.
    rows = {r[0]: r for r in (re.split(r"\s{2,}", line) for line in listed.out.splitlines()[1:])}
    assert set(rows) == {"crm", "legacy"}
    assert rows["crm"][1] == "enabled"
    assert len(rows["legacy"]) == 8
    data = {s["name"]: s for s in (await running.admin("subscriptions", "list", "--json")).json()}
    assert data["legacy"]["queue"]["dead"] > 0
    assert data["legacy"]["queue"]["dead"] == int(rows["legacy"][6])  # the DEAD column

    await running.bridge.queue.set_enabled("crm", False)
    assert "disabled (operator)" in (await running.admin("subscriptions", "list")).out
    enabled = await running.admin("subscriptions", "enable", "crm")
    assert (enabled.code, enabled.out) == (0, "subscription crm enabled\n")
    assert not (await running.bridge.queue.endpoint("crm")).disabled
    assert (await running.admin("subscriptions", "enable", "nope")).code == 1


async def test_dead_letters_list_and_replay(running: Running) -> None:
    listed = await running.admin("dead-letters", "list", "legacy")
    assert listed.code == 0, listed.err
    assert listed.out.split()[:5] == ["EVENT", "ID", "TYPE", "ATTEMPTS", "LAST"]
    assert "HTTP 500" in listed.out
    items = (await running.admin("dead-letters", "list", "legacy", "--json")).json()["items"]
    assert len(items) >= 2
    assert all(i["state"] == "dead" for i in items)
    assert (await running.admin("dead-letters", "list", "crm")).out == "no dead letters\n"

    one = await running.admin("dead-letters", "replay", "legacy", "--id", items[0]["event_id"])
    assert (one.code, one.out) == (0, "1 dead letter(s) of legacy due again\n")
    # Every one: a background job (issue 23 item 11), its id and how to follow it.
    rest = await running.admin("dead-letters", "replay", "legacy")
    assert rest.code == 0, rest.err
    found = re.fullmatch(
        r"replay job (\w+) of legacy: (\d+) dead letter\(s\) to look at, made due again in "
        r"the background \(follow it: callbridge admin recoveries legacy\)\n",
        rest.out,
    )
    assert found, rest.out
    assert int(found[2]) == len(items) - 1
    jobs = (await running.admin("--json", "recoveries", "legacy")).json()
    assert [(j["id"], j["scope"], j["total"]) for j in jobs] == [(found[1], "dead", len(items) - 1)]
    table = (await running.admin("recoveries", "legacy")).out.splitlines()
    assert table[0].split()[:4] == ["JOB", "SCOPE", "STATE", "PHASE"]
    assert table[1].split()[:2] == [found[1], "dead"]
    assert (await running.admin("dead-letters", "list", "nope")).code == 1
    assert (await running.admin("dead-letters", "replay", "nope")).code == 1


async def test_redeliver(running: Running) -> None:
    (batch,) = running.sim.batch_ids
    call = next(c for c in running.sim.calls(batch) if c["status"] != "pending")
    timeline = (await running.admin("--json", "timeline", batch, call["call_id"])).json()
    event_id = timeline["timeline"][-1]["event_id"]
    again = await running.admin("redeliver", event_id)
    assert again.code == 0, again.err
    assert again.out.startswith(f"event {event_id} due again for: ")
    assert "crm" in again.out
    as_json = await running.admin("--json", "redeliver", event_id)
    assert "crm" in as_json.json()["subscriptions"]
    assert (await running.admin("redeliver", "evt_nope")).code == admin_cli.EXIT_NOT_FOUND


async def test_a_wrong_or_missing_token_exits_3(running: Running) -> None:
    for argv in (("batches", "list"), ("--json", "subscriptions", "list")):
        wrong = await running.admin(*argv, token="wrong-token-xxxxxxxx")
        assert wrong.code == admin_cli.EXIT_AUTH
        assert wrong.out == ""
        assert "admin token rejected" in wrong.err
        assert "wrong-token" not in wrong.err  # the token is never echoed
    missing = await running.admin("batches", "list", token=None)
    assert missing.code == admin_cli.EXIT_AUTH


def every_subcommand(batch: str, call: str, event: str) -> list[tuple[str, ...]]:
    """One command line per subcommand of ``callbridge admin``."""
    return [
        ("batches", "list"),
        ("batches", "add", "sched_json", "--no-backfill"),
        ("batches", "remove", "sched_json"),
        ("timeline", batch, call),
        ("subscriptions", "list"),
        ("subscriptions", "enable", "crm"),
        ("dead-letters", "list", "legacy"),
        ("dead-letters", "replay", "legacy"),
        ("redeliver", event),
    ]


async def test_every_subcommand_answers_json_and_exits_3_on_a_wrong_token(
    running: Running,
) -> None:
    (batch,) = running.sim.batch_ids
    call = next(c for c in running.sim.calls(batch) if c["status"] != "pending")["call_id"]
    timeline = (await running.admin("--json", "timeline", batch, call)).json()
    commands = every_subcommand(batch, call, timeline["timeline"][-1]["event_id"])
    # Leaf commands: the group and, for groups of several, the action.
    leaves = {
        c[:2] if c[0] in ("batches", "subscriptions", "dead-letters") else c[:1] for c in commands
    }
    assert len(leaves) == len(commands) == 9

    async def legacy_dead() -> int:
        subs = (await running.admin("--json", "subscriptions", "list")).json()
        return int(next(s["queue"]["dead"] for s in subs if s["name"] == "legacy"))

    dead_before = await legacy_dead()
    assert dead_before > 0

    for argv in commands:
        wrong = await running.admin(*argv, "--json", token="wrong-token-xxxxxxxx")
        assert (wrong.code, wrong.out) == (admin_cli.EXIT_AUTH, ""), argv
        assert "admin token rejected" in wrong.err, argv
    # Nothing was done with the wrong token.
    assert "sched_json" not in (await running.admin("batches", "list")).out
    assert await legacy_dead() == dead_before

    answers = {}
    for argv in commands:
        done = await running.admin(*argv, "--json")
        assert done.code == admin_cli.EXIT_OK, (argv, done.err)
        answers[argv[:2]] = done.json()  # JSON, whatever the command
    assert answers[("batches", "add")]["id"] == "sched_json"
    assert answers[("batches", "remove")]["id"] == "sched_json"
    assert answers[("subscriptions", "enable")]["name"] == "crm"
    # Replay of every one answers with its job; `replayed` is kept for older CLIs.
    replay = answers[("dead-letters", "replay")]
    assert (replay["replayed"], replay["job"]["scope"]) == (0, "dead")
    assert replay["job"]["total"] == dead_before
    assert "crm" in answers[("redeliver", commands[-1][1])]["subscriptions"]


async def test_an_unreachable_bridge_exits_4(running: Running) -> None:
    args = build_parser().parse_args(["admin", "--url", "http://127.0.0.1:1", "batches", "list"])
    code = await admin_cli.run(
        args, io.StringIO(), io.StringIO(), env={"CALLBRIDGE_ADMIN_TOKEN": TOKEN}
    )
    assert code == admin_cli.EXIT_UNAVAILABLE


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["admin", "batches"])
    assert exit_.value.code == admin_cli.EXIT_USAGE
    assert "ACTION" in capsys.readouterr().err


async def test_the_command_reads_url_and_token_from_the_environment(running: Running) -> None:
    async def callbridge_admin(*argv: str, token: str) -> tuple[int, str]:
        env = {**os.environ, "CALLBRIDGE_ADMIN_URL": running.url, "CALLBRIDGE_ADMIN_TOKEN": token}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "callbridge", "admin", *argv,
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode is not None
        return proc.returncode, out.decode()

    code, out = await callbridge_admin("subscriptions", "list", "--json", token=TOKEN)
    assert code == 0
    assert [s["name"] for s in json.loads(out)] == ["crm", "legacy"]
    code, out = await callbridge_admin("batches", "list", token="wrong-token-xxxxxxxx")
    assert (code, out) == (admin_cli.EXIT_AUTH, "")
