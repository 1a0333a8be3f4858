"""The upstream simulator in its own process, with control routes for the benchmarks.

``python -m bench.sim_server --port 0 --calls 100000`` serves one batch of a
`callbridge.simulator.Simulator`; ``--layout 1x1000,10x1000`` serves groups of batches
instead (here one batch of 1,000 calls and ten of 1,000). The simulator's own
lifecycle never advances: calls change only through the routes below, which use the
simulator's public ``set_call``. Its request log uses ``time.time()``, the clock
every benchmark process shares. Routes:

* ``GET /_bench/info`` -> ``{"batch_id", "calls", "batch_ids", "groups", "sizes"}``
  (``batch_id``/``calls``: the first batch);
* ``POST /_bench/mutate?ratio=0.1&round=N&mode=spread|clustered[&batch=ID ...]`` ->
  changes ``ratio`` of the calls of each given batch (default: the first): every
  other chosen call moves one status on (pending -> queued -> ringing -> answered
  -> in_progress -> completed), the others (and calls already terminal) get a field
  change (``duration_seconds``). ``spread`` picks calls at random (seeded by the
  round, so every run is identical), ``clustered`` a contiguous run of calls;
* ``POST /_bench/churn?rate=1000&duration=20`` -> starts a timer task in this process
  that makes ``rate`` status changes per second for ``duration`` seconds, one status
  step each, taking the calls round-robin across every batch (so with 10,000 calls
  one call changes every 10 s at 1,000/s), and records ``time.time()`` of each;
* ``GET /_bench/churn`` -> ``{"running", "changes": [[batch, call, status, t], ...]}``;
* ``POST /_bench/finish?batch=ID ...`` -> every call of those batches ``completed``;
* ``POST /_bench/switch?status=completed[&batch=ID ...]`` -> every call of those batches
  (default: the first) takes ``status`` in one step: no request is served half-way,
  so the whole batch changes at one instant, returned as ``at`` (``time.time()``
  once the last call changed) with ``switched``, the number of calls;
* ``GET /_bench/requests?since=T`` -> ``[[t, path_qs, status], ...]`` received at or
  after ``T`` (the simulator's request log).

It prints ``READY <base url>`` on stdout once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import time

from aiohttp import web

from bench.common import API_KEY, serve_child
from callbridge.simulator import Simulator, SimulatorConfig, make_app

NEXT_STATUS = {
    "pending": "queued",
    "queued": "ringing",
    "ringing": "answered",
    "answered": "in_progress",
    "in_progress": "completed",
}


class Mutator:
    """Deterministic edits of a share of one batch's calls."""

    def __init__(self, sim: Simulator, batch_id: str) -> None:
        self.sim = sim
        self.batch_id = batch_id
        calls = sim.calls(self.batch_id)
        self.call_ids = [c["call_id"] for c in calls]
        self.status = {c["call_id"]: c["status"] for c in calls}

    def mutate(self, ratio: float, round_no: int, mode: str) -> dict[str, int]:
        n = len(self.call_ids)
        k = max(0, min(n, round(n * ratio)))
        if mode == "clustered":
            start = (round_no * k) % max(1, n)
            chosen = [(start + i) % n for i in range(k)]
        else:
            chosen = sorted(random.Random(f"mutate:{round_no}").sample(range(n), k))
        statuses = fields = 0
        for j, index in enumerate(chosen):
            call_id = self.call_ids[index]
            nxt = NEXT_STATUS.get(self.status[call_id])
            if j % 2 == 0 and nxt is not None:
                self.sim.set_call(self.batch_id, call_id, status=nxt)
                self.status[call_id] = nxt
                statuses += 1
            else:
                self.sim.set_call(self.batch_id, call_id, duration_seconds=10 + round_no)
                fields += 1
        return {"changed": statuses + fields, "status_changes": statuses, "field_changes": fields}

    def switch(self, status: str) -> int:
        """Every call takes `status` (synchronously: no request sees half of it)."""
        for call_id in self.call_ids:
            if self.status[call_id] != status:
                self.sim.set_call(self.batch_id, call_id, status=status)
                self.status[call_id] = status
        return len(self.call_ids)

    def finish(self) -> int:
        for call_id in self.call_ids:
            if self.status[call_id] != "completed":
                self.sim.set_call(self.batch_id, call_id, status="completed")
                self.status[call_id] = "completed"
        return len(self.call_ids)


class Churn:
    """A steady stream of status changes across all batches, with their wall times."""

    def __init__(self, mutators: dict[str, Mutator]) -> None:
        self.mutators = mutators
        # Round-robin over batches, then over calls: neighbours in the order are in
        # different batches, and a call comes round again only after all the others.
        longest = max((len(m.call_ids) for m in mutators.values()), default=0)
        self.order = [
            (m, m.call_ids[i])
            for i in range(longest)
            for m in mutators.values()
            if i < len(m.call_ids)
        ]
        self.next = 0
        self.changes: list[tuple[str, str, str, float]] = []
        self.task: asyncio.Task[None] | None = None

    def _change_one(self) -> bool:
        for _ in range(len(self.order)):
            m, call_id = self.order[self.next]
            self.next = (self.next + 1) % len(self.order)
            nxt = NEXT_STATUS.get(m.status[call_id])
            if nxt is None:
                continue
            m.sim.set_call(m.batch_id, call_id, status=nxt)
            m.status[call_id] = nxt
            self.changes.append((m.batch_id, call_id, nxt, time.time()))
            return True
        return False

    async def run(self, rate: float, duration: float, tick: float = 0.01) -> None:
        started = time.monotonic()
        done = 0
        while (elapsed := time.monotonic() - started) < duration:
            due = int(rate * elapsed)
            while done < due:
                if not self._change_one():
                    return
                done += 1
            await asyncio.sleep(tick)


def build_app(sim: Simulator, groups: dict[str, list[str]]) -> web.Application:
    mutators = {b: Mutator(sim, b) for b in sim.batch_ids}
    first = sim.batch_ids[0]
    churn = Churn(mutators)
    app = make_app(sim)

    async def info(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "batch_id": first,
                "calls": len(mutators[first].call_ids),
                "batch_ids": sim.batch_ids,
                "groups": groups,
                "sizes": {b: len(m.call_ids) for b, m in mutators.items()},
            }
        )

    async def mutate(request: web.Request) -> web.Response:
        q = request.query
        ratio, round_no = float(q.get("ratio", "0.1")), int(q.get("round", "0"))
        mode = q.get("mode", "spread")
        total = {"changed": 0, "status_changes": 0, "field_changes": 0}
        for batch_id in q.getall("batch", [first]):
            for k, v in mutators[batch_id].mutate(ratio, round_no, mode).items():
                total[k] += v
        return web.json_response(total)

    async def finish(request: web.Request) -> web.Response:
        n = sum(mutators[b].finish() for b in request.query.getall("batch", []))
        return web.json_response({"finished_calls": n})

    async def switch(request: web.Request) -> web.Response:
        status = request.query.get("status", "completed")
        n = sum(mutators[b].switch(status) for b in request.query.getall("batch", [first]))
        return web.json_response({"switched": n, "at": time.time()})

    async def churn_start(request: web.Request) -> web.Response:
        if churn.task is not None and not churn.task.done():
            raise web.HTTPConflict(text="churn already running")
        q = request.query
        churn.task = asyncio.create_task(
            churn.run(float(q.get("rate", "1000")), float(q.get("duration", "10")))
        )
        return web.json_response({"started_at": time.time()})

    async def churn_state(request: web.Request) -> web.Response:
        running = churn.task is not None and not churn.task.done()
        return web.json_response({"running": running, "changes": churn.changes})

    async def requests(request: web.Request) -> web.Response:
        since = float(request.query.get("since", "0"))
        return web.json_response([r for r in sim.request_log if r[0] >= since])

    async def stop_churn(app: web.Application) -> None:
        if churn.task is not None:
            churn.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await churn.task

    app.router.add_get("/_bench/info", info)
    app.router.add_post("/_bench/mutate", mutate)
    app.router.add_post("/_bench/finish", finish)
    app.router.add_post("/_bench/switch", switch)
    app.router.add_post("/_bench/churn", churn_start)
    app.router.add_get("/_bench/churn", churn_state)
    app.router.add_get("/_bench/requests", requests)
    app.on_shutdown.append(stop_churn)
    return app


def parse_layout(layout: str) -> list[tuple[int, int]]:
    """``"1x1000,10x1000"`` -> [(1, 1000), (10, 1000)]: (batches, calls per batch)."""
    out: list[tuple[int, int]] = []
    for part in layout.split(","):
        batches, _, calls = part.strip().partition("x")
        out.append((int(batches), int(calls)))
    return out


async def main(port: int, calls: int, seed: int, layout: str | None) -> None:
    config = SimulatorConfig(
        batches=0 if layout else 1,
        calls_per_batch=calls,
        api_key=API_KEY,
        seed=seed,
        # The log would grow by a few hundred entries a cycle; keep it bounded.
        request_log_max=200_000,
    )
    sim = Simulator(config, clock=time.time)
    groups: dict[str, list[str]] = {}
    if layout:
        for g, (n, size) in enumerate(parse_layout(layout)):
            name = f"{n}x{size}"
            groups[name] = [f"sched_g{g}b{i:03d}" for i in range(n)]
            for batch_id in groups[name]:
                sim.add_batch(batch_id, size)
    else:
        groups[f"1x{calls}"] = sim.batch_ids
    # Encode every item once now, as a long-running simulator would have.
    for batch_id in sim.batch_ids:
        sim.encoded_items(batch_id)
    await serve_child(build_app(sim, groups), port)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--layout", help="groups of batches: 1x1000,10x1000 (batches x calls)")
    parser.add_argument("--seed", type=int, default=7)
    ns = parser.parse_args()
    asyncio.run(main(ns.port, ns.calls, ns.seed, ns.layout))
