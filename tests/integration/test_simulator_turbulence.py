"""The simulator's turbulence: outages, pages reordered mid-scan, redials that reset
fields, statuses lasting seconds (some under one), and the ground truth (spans with
clock readings) a checker compares deliveries with."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from callbridge.cli.main import build_parser
from callbridge.cli.simulate import turbulence_options
from callbridge.simulator import (
    DEFAULT_DWELL_SECONDS,
    FaultConfig,
    Simulator,
    SimulatorConfig,
    Timing,
    make_app,
    run_clock,
)

Client = TestClient[web.Request, web.Application]
AUTH = {"Authorization": "Bearer sk_test"}
TERMINAL = {"completed", "failed", "no_answer", "busy", "cancelled"}


class FakeTime:
    """A clock the test moves by hand (the simulator's injectable clock)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def calls_path(batch_id: str) -> str:
    return f"/api/v1/public/call-batches/{batch_id}/calls"


async def get(client: Client, batch_id: str, **params: Any) -> tuple[int, Any]:
    query = {k: str(v) for k, v in params.items()}
    async with client.get(calls_path(batch_id), params=query, headers=AUTH) as response:
        raw = await response.read()
        if response.content_type != "application/json":
            return response.status, None
        return response.status, orjson.loads(raw)


async def scan_ids(client: Client, batch_id: str, limit: int) -> tuple[list[str], set[int]]:
    """Call ids of a paginated scan, in order, and the totals the pages reported."""
    ids: list[str] = []
    totals: set[int] = set()
    for page in itertools.count(1):
        status, body = await get(client, batch_id, limit=limit, page=page)
        assert status == 200
        ids += [item["call_id"] for item in body["data"]["items"]]
        totals.add(body["data"]["total"])
        if not body["data"]["has_more"]:
            return ids, totals
    raise AssertionError("unreachable")


# -- outages ----------------------------------------------------------------------


def test_outage_windows_periodic_and_explicit() -> None:
    faults = FaultConfig(outage_every_seconds=10, outage_seconds=2, outage_windows=((3, 4),))
    assert [faults.in_outage(t) for t in (0, 3.5, 4, 9.9, 10, 11.9, 12, 20.5)] == [
        False, True, False, False, True, True, False, True,
    ]  # fmt: skip
    assert faults.outages(25) == [(3, 4), (10, 12), (20, 22)]
    assert not FaultConfig().in_outage(5)
    with pytest.raises(ValueError, match="shorter"):
        FaultConfig(outage_every_seconds=2, outage_seconds=2)
    with pytest.raises(ValueError, match="outage_windows"):
        FaultConfig(outage_windows=((5, 5),))
    with pytest.raises(ValueError, match="outage_kind"):
        FaultConfig(outage_kind="teapot")


async def test_outage_answers_503_for_its_window_on_the_simulator_clock(
    aiohttp_client: AiohttpClient,
) -> None:
    clock = FakeTime()
    faults = FaultConfig(outage_windows=((5, 7),))
    sim = Simulator(SimulatorConfig(calls_per_batch=5, faults=faults), clock=clock)
    client = await aiohttp_client(make_app(sim))
    batch_id = sim.batch_ids[0]
    seen = []
    for elapsed in (4.9, 5.0, 6.9, 7.0):
        clock.now = sim.started_at + elapsed
        status, body = await get(client, batch_id)
        seen.append(status)
        if status == 503:
            assert body["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert seen == [200, 503, 503, 200]
    assert sim.outages() == [(sim.started_at + 5, sim.started_at + 7)]
    assert [status for _, _, status in sim.request_log] == seen


async def test_reset_outage_drops_the_connection_unanswered(
    aiohttp_client: AiohttpClient,
) -> None:
    sim = Simulator(
        SimulatorConfig(
            calls_per_batch=5,
            faults=FaultConfig(outage_windows=((0, 3600),), outage_kind="reset"),
        )
    )
    client = await aiohttp_client(make_app(sim))
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(client, sim.batch_ids[0])
    # nginx's code for "closed without an answer"; the client's retry of a reset
    # pooled connection may add a second entry.
    assert {status for _, _, status in sim.request_log} == {444}
    sim.faults = FaultConfig()
    assert (await get(client, sim.batch_ids[0]))[0] == 200


# -- reordered pages ----------------------------------------------------------------


async def test_reorder_changes_the_order_between_the_pages_of_one_scan(
    aiohttp_client: AiohttpClient,
) -> None:
    config = SimulatorConfig(calls_per_batch=60, seed=4)
    sim, twin = Simulator(config), Simulator(config)
    client = await aiohttp_client(make_app(sim))
    batch_id = sim.batch_ids[0]
    every = {call["call_id"] for call in sim.calls(batch_id)}
    sim.faults = FaultConfig(reorder_ratio=1.0, reorder_share=0.5)
    disturbed = 0
    for _ in range(5):
        sim.advance()
        twin.advance()
        ids, totals = await scan_ids(client, batch_id, limit=10)
        # Nothing tells the client: the total stays right, yet items repeat or go missing.
        assert totals == {60}
        assert len(ids) == 60
        disturbed += len(set(ids)) < 60
    assert disturbed >= 4
    # The world is untouched: same lifecycle as a twin that was never reordered, and
    # sim.calls() keeps the creation order.
    assert sim.transitions() == twin.transitions()
    assert sim.calls(batch_id) == twin.calls(batch_id)
    # Without the fault a scan sees every call once, in the new (lasting) order.
    sim.faults = FaultConfig()
    ids, _ = await scan_ids(client, batch_id, limit=10)
    assert sorted(ids) == sorted(every)
    assert ids != [call["call_id"] for call in sim.calls(batch_id)]


async def test_filtered_views_follow_the_reordered_list(aiohttp_client: AiohttpClient) -> None:
    sim = Simulator(SimulatorConfig(calls_per_batch=40, seed=6))
    client = await aiohttp_client(make_app(sim))
    batch_id = sim.batch_ids[0]
    sim.advance(3)
    sim.faults = FaultConfig(reorder_ratio=1.0, reorder_share=1.0)
    await get(client, batch_id, limit=500)  # reorders after answering
    sim.faults = FaultConfig()
    _, body = await get(client, batch_id, limit=500)
    served = [item["call_id"] for item in body["data"]["items"]]
    for status in ("pending", "queued"):
        _, filtered = await get(client, batch_id, status=status, limit=500)
        expected = [item["call_id"] for item in body["data"]["items"] if item["status"] == status]
        assert [item["call_id"] for item in filtered["data"]["items"]] == expected
    one = served[7]
    external_id = next(c["external_id"] for c in sim.calls(batch_id) if c["call_id"] == one)
    _, by_ext = await get(client, batch_id, external_id=external_id)
    assert [item["call_id"] for item in by_ext["data"]["items"]] == [one]


# -- redials --------------------------------------------------------------------------


def test_unanswered_attempts_have_times_and_a_redial_sets_them_back_to_null() -> None:
    sim = Simulator(
        SimulatorConfig(calls_per_batch=80, seed=12, redial_probability=1.0, max_redials=2)
    )
    batch_id = sim.batch_ids[0]
    unanswered = redialled = 0
    previous = {c["call_id"]: c for c in sim.calls(batch_id)}
    while not sim.is_finished():
        sim.advance()
        now = {c["call_id"]: c for c in sim.calls(batch_id)}
        for call_id, item in now.items():
            before = previous[call_id]
            if item["status"] in ("no_answer", "busy") and before["status"] == "ringing":
                unanswered += 1
                assert item["started_at"] is not None
                assert item["ended_at"] >= item["started_at"]
                assert item["duration_seconds"] == 0
            if item["status"] == "queued" and before["status"] in ("no_answer", "busy"):
                redialled += 1
                assert before["ended_at"] is not None
                assert (item["started_at"], item["ended_at"], item["duration_seconds"]) == (
                    None,
                    None,
                    None,
                )
        previous = now
    assert unanswered > 5
    assert redialled > 5


# -- the wall-clock mode -------------------------------------------------------------


def test_timing_draws_dwell_in_seconds_and_rounds_up_to_steps() -> None:
    timing = Timing(step_seconds=0.1, dwell_seconds={"ringing": (0.15, 0.15)})
    assert timing.dwell_steps("ringing", 0.5) == 2
    assert timing.dwell_steps("queued", 0.0) == 3  # default range kept: 0.3 s
    assert timing.dwell_seconds["queued"] == DEFAULT_DWELL_SECONDS["queued"]
    assert Timing(step_seconds=1, dwell_seconds={"answered": (0, 0)}).dwell_steps(
        "answered", 0.0
    ) == 1  # fmt: skip
    with pytest.raises(ValueError, match="no dwell"):
        Timing(dwell_seconds={"pending": (1, 2)})
    with pytest.raises(ValueError, match="low <= high"):
        Timing(dwell_seconds={"queued": (3, 2)})


def test_spans_in_the_wall_clock_mode_last_the_configured_seconds() -> None:
    clock = FakeTime()
    dwell = {"queued": (1.0, 2.0), "ringing": (0.1, 0.3), "answered": (0.1, 0.2)}
    config = SimulatorConfig(
        batches=2, calls_per_batch=60, seed=3, concurrency=30, timing=Timing(0.1, dwell)
    )
    sim = Simulator(config, clock=clock)
    while not sim.is_finished():
        clock.now += 0.1
        sim.advance()
    spans = sim.spans()
    durations: dict[str, list[float]] = {}
    for span in spans:
        if span.end is not None:
            durations.setdefault(span.status, []).append(span.end - span.start)
    for status, (low, high) in dwell.items():
        assert all(low - 0.11 < d < high + 0.11 for d in durations[status]), status
    # Sub-second statuses: a ring answered within 0.2 s is there.
    assert min(durations["ringing"]) <= 0.2 + 1e-6
    # The spans tell the same story as the histories: per call, back to back, the
    # first one the creation's pending, the last one open.
    per_call: dict[tuple[str, str], list[Any]] = {}
    for span in spans:
        per_call.setdefault((span.batch_id, span.call_id), []).append(span)
    assert len(per_call) == 120
    for (batch_id, call_id), chain in per_call.items():
        assert [s.status for s in chain] == [s for _, s in sim.history(batch_id, call_id)]
        assert chain[0].start == sim.started_at
        assert chain[-1].end is None
        assert chain[-1].status in TERMINAL
        for a, b in itertools.pairwise(chain):
            assert a.end == b.start
    # Same seed, same world, wherever the clock stood.
    again = Simulator(config, clock=FakeTime())
    while not again.is_finished():
        again.advance()
    assert again.transitions() == sim.transitions()


async def test_run_clock_moves_the_world_in_real_time() -> None:
    config = SimulatorConfig(
        calls_per_batch=20,
        seed=2,
        concurrency=20,
        timing=Timing(0.05, {"queued": (0.1, 0.1), "ringing": (0.1, 0.1)}),
    )
    sim = Simulator(config)
    stop = asyncio.Event()
    task = asyncio.create_task(run_clock(sim, 0.05, stop))
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.wait_for(task, 2)
    ringing = [s for s in sim.spans() if s.status == "ringing" and s.end is not None]
    assert ringing
    # Real time, not steps: each ring lasted about 0.1 s of the monotonic clock.
    assert all(0.05 < s.end - s.start < 0.4 for s in ringing if s.end is not None)
    assert 5 <= sim.step_count <= 11


# -- the command line ------------------------------------------------------------------


def test_simulate_flags_build_the_turbulent_world() -> None:
    args = build_parser().parse_args(
        [
            "simulate", "--realtime", "--step", "0.05", "--concurrency", "40",
            "--dwell", "ringing=0.1:0.2", "--dwell", "answered=0.5",
            "--fault-reorder", "0.05", "--reorder-share", "0.2",
            "--outage-every", "20", "--outage-seconds", "2", "--outage-kind", "reset",
            "--outage-window", "5:7.5",
        ]
    )  # fmt: skip
    faults, timing = turbulence_options(args)
    assert timing is not None
    assert timing.step_seconds == 0.05
    assert timing.dwell_seconds["ringing"] == (0.1, 0.2)
    assert timing.dwell_seconds["answered"] == (0.5, 0.5)
    assert args.concurrency == 40
    f = FaultConfig(**faults)
    assert (f.reorder_ratio, f.reorder_share) == (0.05, 0.2)
    assert (f.outage_every_seconds, f.outage_seconds, f.outage_kind) == (20, 2, "reset")
    assert f.outage_windows == ((5, 7.5),)
    plain, no_timing = turbulence_options(build_parser().parse_args(["simulate"]))
    assert no_timing is None
    assert FaultConfig(**plain) == FaultConfig()
    for bad in (["--dwell", "ringing"], ["--outage-window", "7:5"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["simulate", *bad])


def test_simulate_refuses_an_impossible_outage_schedule(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = build_parser().parse_args(["simulate", "--outage-every", "2", "--outage-seconds", "3"])
    with pytest.raises(SystemExit) as exc:
        turbulence_options(args)
    assert exc.value.code == 2
    assert "outage_seconds must be shorter" in capsys.readouterr().err


async def test_reorder_die_leaves_the_other_faults_draws_alone(
    aiohttp_client: AiohttpClient,
) -> None:
    config = SimulatorConfig(calls_per_batch=30, seed=5)
    plain, reordering = Simulator(config), Simulator(config)
    plain.faults = FaultConfig(server_error_ratio=0.4, rate_limit_ratio=0.2)
    reordering.faults = FaultConfig(server_error_ratio=0.4, rate_limit_ratio=0.2, reorder_ratio=0.5)
    for sim in (plain, reordering):
        client = await aiohttp_client(make_app(sim))
        for _ in range(30):
            await get(client, sim.batch_ids[0], limit=10)
    codes = [[status for _, _, status in sim.request_log] for sim in (plain, reordering)]
    assert codes[0] == codes[1]
    assert set(codes[0]) == {200, 429, 500, 502, 503} or len(set(codes[0])) >= 3
    with pytest.raises(ValueError, match="reorder_share"):
        FaultConfig(reorder_share=2)
