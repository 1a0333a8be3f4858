"""A dialling campaign on the simulator, in its own process, for the planner benchmark.

``python -m bench.campaign --port 0 --batches 10 --calls 20000 --lines 60 --speed 0.5``
serves `callbridge.simulator` batches (``make_app``: the real List Batch Calls API with
its ``status`` and ``external_id`` filters) whose calls a dialler moves through
`Simulator.set_call` on a timer of its own, in wall-clock time:

* every call starts ``pending``; each batch has ``--lines`` lines; a free line takes the
  next call in creation order (redials due first): ``queued``, then ``ringing``, then
  ``answered`` (65 %) -> ``in_progress`` -> ``completed`` (96 %) or ``failed``, or
  ``no_answer`` (20 %), ``busy`` (10 %), ``failed`` (5 %);
* 1 % of the calls a line would take are ``cancelled`` instead, straight from pending;
* half of the ``no_answer``/``busy`` calls are redialled once, 1-5 s (x speed) later;
* a call that ends gets ``ended_at`` (and ``duration_seconds`` when it was answered), so
  a redial that ends as the first attempt did is still a changed item.

Durations (seconds, uniform, multiplied by ``--speed``): queued 0.2-0.6, ringing 0.4-1.6,
answered 0.2-0.4, in_progress 0.8-3.2. Seeded: the same arguments give the same campaign
up to timer jitter.

Routes besides the API: ``GET /_campaign/info`` (batch ids, parameters); ``POST
/_campaign/start``; ``GET /_campaign/state`` (``running``, ``finished``, start and end
times, dials); ``GET /_campaign/truth`` -> ``[[batch, call, status, t], ...]`` every
status change with its ``time.time()``; ``GET /_campaign/requests?since=T`` -> ``[[t,
kind], ...]`` every List Batch Calls request received (kind ``page``, ``status`` or
``lookup``), or with ``batch=B&until=U`` that batch's requests in [T, U] as ``[[t,
label], ...]``; ``GET /_campaign/served?batch=B`` -> ``[[call, [t, ...]], ...]`` the first
two answers that carried each call in each status it held (the checker's rule);
``GET /_campaign/trace?call=B/C&call=...`` -> per call, each status span as served:
its status, how many answers carried it, the first two and the last (time, request
label, path and query: see `bench.served`). It prints ``READY <base url>`` on stdout
once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import heapq
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from bench.common import API_KEY, announce_ready
from bench.served import CURRENT_REQUEST, ServedRecord, request_kind, request_label
from callbridge.simulator import Simulator, SimulatorConfig, make_app

TICK_S = 0.01
# (low, high) seconds before a status moves on, times --speed.
DWELL_S = {
    "queued": (0.2, 0.6),
    "ringing": (0.4, 1.6),
    "answered": (0.2, 0.4),
    "in_progress": (0.8, 3.2),
}
REDIAL_DELAY_S = (1.0, 5.0)
RINGING_OUTCOMES = (("answered", 0.65), ("no_answer", 0.2), ("busy", 0.1), ("failed", 0.05))
CANCEL_SHARE = 0.01
REDIAL_SHARE = 0.5
MAX_REDIALS = 1


@dataclass
class Line:
    """One batch's dialler: its calls, free lines, due redials."""

    batch_id: str
    call_ids: list[str]
    free: int
    next_new: int = 0
    redials: list[str] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)
    answered: dict[str, float] = field(default_factory=dict)
    open_calls: int = 0


class CampaignSimulator(Simulator):
    """The simulator with a bounded record of its answers (`bench.served.ServedRecord`):
    per call and status span, how many answers carried it, the first two and the last
    (time and request). The checker's rule asks only whether a status was served twice;
    the benchmark's explanations of losses and late events read the rest. Full scans of
    200,000 calls every 2 s would otherwise keep tens of millions of readings."""

    def __init__(self, config: SimulatorConfig, *, clock: Callable[[], float]) -> None:
        super().__init__(config, clock=clock)
        self.record = ServedRecord()

    def record_served(self, batch_id: str, call_ids: list[str]) -> None:
        # Called right after the answer's items were encoded, with no await between:
        # each call's status now is the one the answer carries.
        now, request, record = self.clock(), CURRENT_REQUEST.get(), self.record
        batch = self._batch(batch_id)
        for call_id in call_ids:
            record.add((batch_id, call_id), batch.call(call_id).status, now, request)

    def set_call(self, batch_id: str, call_id: str, **fields: Any) -> None:
        super().set_call(batch_id, call_id, **fields)
        if "status" in fields:  # the campaign only sets a status to change it
            self.record.status_changed((batch_id, call_id))


class Campaign:
    def __init__(self, sim: Simulator, lines: int, speed: float, seed: int) -> None:
        self.sim = sim
        self.speed = speed
        self.rng = random.Random(f"campaign:{seed}")
        self.batches = {
            b: Line(b, [c["call_id"] for c in sim.calls(b)], lines) for b in sim.batch_ids
        }
        for line in self.batches.values():
            line.open_calls = len(line.call_ids)
        # (due time, seq, batch, call, action)
        self.heap: list[tuple[float, int, str, str, str]] = []
        self.seq = 0
        self.truth: list[tuple[str, str, str, float]] = []
        self.started_at = 0.0
        self.finished_at = 0.0
        self.dials = 0
        self.task: asyncio.Task[None] | None = None

    def _dwell(self, status: str) -> float:
        low, high = DWELL_S[status]
        return self.rng.uniform(low, high) * self.speed

    def _at(self, due: float, batch_id: str, call_id: str, action: str) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (due, self.seq, batch_id, call_id, action))

    def _set(self, line: Line, call_id: str, status: str, now: float, **fields: Any) -> None:
        self.sim.set_call(line.batch_id, call_id, status=status, **fields)
        self.truth.append((line.batch_id, call_id, status, now))

    def _end(self, line: Line, call_id: str, status: str, now: float) -> None:
        stamp = datetime.fromtimestamp(now, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        fields: dict[str, Any] = {"ended_at": stamp}
        if call_id in line.answered:
            fields["duration_seconds"] = round(now - line.answered.pop(call_id), 3)
        self._set(line, call_id, status, now, **fields)
        line.free += 1
        redial = (
            status in ("no_answer", "busy")
            and line.attempts.get(call_id, 0) <= MAX_REDIALS
            and self.rng.random() < REDIAL_SHARE
        )
        if redial:
            low, high = REDIAL_DELAY_S
            self._at(now + self.rng.uniform(low, high) * self.speed, line.batch_id, call_id, "due")
        else:
            line.open_calls -= 1

    def _dial(self, line: Line, call_id: str, now: float) -> None:
        line.free -= 1
        line.attempts[call_id] = line.attempts.get(call_id, 0) + 1
        self.dials += 1
        self._set(line, call_id, "queued", now)
        self._at(now + self._dwell("queued"), line.batch_id, call_id, "ringing")

    def _fill(self, line: Line, now: float) -> None:
        while line.free > 0:
            if line.redials:
                self._dial(line, line.redials.pop(0), now)
            elif line.next_new < len(line.call_ids):
                call_id = line.call_ids[line.next_new]
                line.next_new += 1
                if self.rng.random() < CANCEL_SHARE:
                    self._set(line, call_id, "cancelled", now)
                    line.open_calls -= 1
                else:
                    self._dial(line, call_id, now)
            else:
                return

    def _step(self, line: Line, call_id: str, action: str, now: float) -> None:
        if action == "due":
            line.redials.append(call_id)
        elif action == "ringing":
            self._set(line, call_id, "ringing", now)
            self._at(now + self._dwell("ringing"), line.batch_id, call_id, "ring_out")
        elif action == "ring_out":
            r, outcome = self.rng.random(), "failed"
            for status, share in RINGING_OUTCOMES:
                if r < share:
                    outcome = status
                    break
                r -= share
            if outcome == "answered":
                line.answered[call_id] = now
                stamp = datetime.fromtimestamp(now, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                self._set(line, call_id, "answered", now, started_at=stamp)
                self._at(now + self._dwell("answered"), line.batch_id, call_id, "talk")
            else:
                self._end(line, call_id, outcome, now)
        elif action == "talk":
            self._set(line, call_id, "in_progress", now)
            self._at(now + self._dwell("in_progress"), line.batch_id, call_id, "hang_up")
        elif action == "hang_up":
            self._end(line, call_id, "completed" if self.rng.random() < 0.96 else "failed", now)

    @property
    def finished(self) -> bool:
        return all(line.open_calls == 0 for line in self.batches.values())

    async def run(self) -> None:
        self.started_at = time.time()
        while not self.finished:
            now = time.time()
            while self.heap and self.heap[0][0] <= now:
                _, _, batch_id, call_id, action = heapq.heappop(self.heap)
                self._step(self.batches[batch_id], call_id, action, now)
            for line in self.batches.values():
                self._fill(line, now)
            await asyncio.sleep(TICK_S)
        self.finished_at = time.time()


def build_app(
    sim: CampaignSimulator, campaign: Campaign, params: dict[str, Any]
) -> web.Application:
    record = sim.record
    app = make_app(sim)

    @web.middleware
    async def note_request(request: web.Request, handler: Handler) -> web.StreamResponse:
        CURRENT_REQUEST.set(request.path_qs)
        return await handler(request)

    app.middlewares.append(note_request)

    async def info(request: web.Request) -> web.Response:
        return web.json_response({"batch_ids": sim.batch_ids, **params})

    async def start(request: web.Request) -> web.Response:
        if campaign.task is None:
            campaign.task = asyncio.create_task(campaign.run())
        return web.json_response({"started_at": time.time()})

    async def state(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "running": campaign.task is not None and not campaign.task.done(),
                "finished": campaign.finished_at > 0,
                "started_at": campaign.started_at,
                "finished_at": campaign.finished_at,
                "dials": campaign.dials,
                "changes": len(campaign.truth),
            }
        )

    async def truth(request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(campaign.truth), content_type="application/json")

    spans_by_batch: dict[str, list[tuple[str, str, float, float | None]]] = {}

    async def spans(request: web.Request) -> web.Response:
        if not campaign.finished_at:
            raise web.HTTPConflict(text="the campaign is still running")
        if not spans_by_batch:
            for span in sim.spans():
                spans_by_batch.setdefault(span.batch_id, []).append(
                    (span.call_id, span.status, span.start, span.end)
                )
        out = spans_by_batch.get(request.query["batch"], [])
        return web.Response(body=orjson.dumps(out), content_type="application/json")

    async def served(request: web.Request) -> web.Response:
        out = record.times(request.query["batch"])
        return web.Response(body=orjson.dumps(out), content_type="application/json")

    async def trace(request: web.Request) -> web.Response:
        keys = [tuple(k.split("/", 1)) for k in request.query.getall("call", [])]
        out = record.trace((b, c) for b, c in keys)
        return web.Response(body=orjson.dumps(out), content_type="application/json")

    async def requests(request: web.Request) -> web.Response:
        since = float(request.query.get("since", "0"))
        batch = request.query.get("batch")
        if batch is None:
            out: list[tuple[float, str]] = [
                (t, kind)
                for t, path_qs, _status in sim.request_log
                if t >= since and (kind := request_kind(path_qs)) is not None
            ]
        else:  # one batch's requests in [since, until], by label (`bench.served`)
            until = float(request.query.get("until", "inf"))
            i = bisect.bisect_left(sim.request_log, (since,))
            out = []
            for t, path_qs, _status in sim.request_log[i:]:
                if t > until:
                    break
                if f"/{batch}/" in path_qs:
                    out.append((t, request_label(path_qs)))
        return web.Response(body=orjson.dumps(out), content_type="application/json")

    async def stop(app: web.Application) -> None:
        if campaign.task is not None:
            campaign.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await campaign.task

    app.router.add_get("/_campaign/info", info)
    app.router.add_post("/_campaign/start", start)
    app.router.add_get("/_campaign/state", state)
    app.router.add_get("/_campaign/truth", truth)
    app.router.add_get("/_campaign/requests", requests)
    app.router.add_get("/_campaign/spans", spans)
    app.router.add_get("/_campaign/served", served)
    app.router.add_get("/_campaign/trace", trace)
    app.on_shutdown.append(stop)
    return app


async def main(ns: argparse.Namespace) -> None:
    config = SimulatorConfig(
        batches=0, api_key=API_KEY, seed=ns.seed, request_log_max=5_000_000, record_served=True
    )
    sim = CampaignSimulator(config, clock=time.time)
    for i in range(ns.batches):
        sim.add_batch(f"sched_c{i:03d}", ns.calls)
    for batch_id in sim.batch_ids:
        sim.encoded_items(batch_id)
    params = {"calls": ns.calls, "lines": ns.lines, "speed": ns.speed, "seed": ns.seed}
    campaign = Campaign(sim, ns.lines, ns.speed, ns.seed)
    runner = web.AppRunner(build_app(sim, campaign, params), access_log=None)
    await runner.setup()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await web.TCPSite(runner, "127.0.0.1", ns.port).start()
        addresses: Any = runner.addresses
        announce_ready(f"http://127.0.0.1:{addresses[0][1]}")
        await stopping.wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--lines", type=int, default=60)
    parser.add_argument("--speed", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=16)
    asyncio.run(main(parser.parse_args()))
