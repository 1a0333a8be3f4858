"""The upstream simulator in its own process, with a control route for the benchmarks.

``python -m bench.sim_server --port 0 --calls 100000`` serves one batch of a
`service.simulator.Simulator` (time never advances by itself) and adds:

* ``GET /_bench/info`` -> ``{"batch_id", "calls"}``;
* ``POST /_bench/mutate?ratio=0.1&round=N&mode=spread|clustered`` -> changes
  ``ratio`` of the calls through the simulator's public ``set_call``: every other
  chosen call moves one status on (pending -> queued -> ringing -> answered ->
  in_progress -> completed), the others (and calls already terminal) get a field
  change (``duration_seconds``). ``spread`` picks calls at random (seeded by the
  round, so every run is identical), ``clustered`` a contiguous run of calls.

It prints ``READY <base url>`` on stdout once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
from typing import Any

from aiohttp import web

from bench.common import API_KEY, announce_ready
from service.simulator import Simulator, SimulatorConfig

NEXT_STATUS = {
    "pending": "queued",
    "queued": "ringing",
    "ringing": "answered",
    "answered": "in_progress",
    "in_progress": "completed",
}


class Mutator:
    """Deterministic edits of a share of a batch's calls."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.batch_id = sim.batch_ids[0]
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


def build_app(sim: Simulator) -> web.Application:
    mutator = Mutator(sim)
    app = sim.make_app()

    async def info(request: web.Request) -> web.Response:
        return web.json_response({"batch_id": mutator.batch_id, "calls": len(mutator.call_ids)})

    async def mutate(request: web.Request) -> web.Response:
        q = request.query
        result = mutator.mutate(
            float(q.get("ratio", "0.1")), int(q.get("round", "0")), q.get("mode", "spread")
        )
        return web.json_response(result)

    app.router.add_get("/_bench/info", info)
    app.router.add_post("/_bench/mutate", mutate)
    return app


async def main(port: int, calls: int, seed: int) -> None:
    config = SimulatorConfig(
        batches=1,
        calls_per_batch=calls,
        api_key=API_KEY,
        seed=seed,
        # The request log would grow by 200 entries a cycle; keep it small.
        request_log_max=10_000,
    )
    sim = Simulator(config)
    # Encode every item once now, as a long-running simulator would have.
    sim.encoded_items(sim.batch_ids[0])
    runner = web.AppRunner(build_app(sim), access_log=None)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        addresses: Any = runner.addresses
        announce_ready(f"http://127.0.0.1:{addresses[0][1]}")
        await stop.wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=7)
    ns = parser.parse_args()
    asyncio.run(main(ns.port, ns.calls, ns.seed))
