"""`callbridge demo` shows the operator console: its URL and token are printed and work."""

from __future__ import annotations

import asyncio
import io
import logging
import re
from typing import Any

import aiohttp
import pytest

from callbridge.demo import run_demo
from callbridge.metrics import Metrics
from callbridge.poll.cycle_metrics import count_odd_items


async def test_demo_prints_a_working_console_url_and_token() -> None:
    out = io.StringIO()
    ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    demo = asyncio.create_task(
        run_demo(calls=3, step_seconds=0.05, port=0, out=out, on_ready=ready.set_result)
    )
    info = await asyncio.wait_for(ready, 30)
    base, token = info["base_url"], info["admin_token"]
    printed = re.search(r"console:\s+(\S+)\s+\(admin token: (\S+)\)", out.getvalue())
    assert printed is not None, out.getvalue()
    assert printed.groups() == (f"{base}/ui/", token)
    async with aiohttp.ClientSession() as session:
        async with session.get(printed.group(1)) as page:
            assert page.status == 200
            assert "callbridge console" in await page.text()
        headers = {"Authorization": f"Bearer {printed.group(2)}"}
        async with session.get(f"{base}/v1/batches", headers=headers) as resp:
            assert resp.status == 200
            assert [b["id"] for b in (await resp.json())["data"]] == [info["batch_id"]]
    assert await asyncio.wait_for(demo, 50) == 0
    assert "done:" in out.getvalue()


async def test_the_demo_counts_the_simulators_oddities_instead_of_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The simulator redials calls and resets their fields on purpose; the demo printed
    a WARNING per scan that saw it (``odd item(s) in the scan: status_regressed``), as
    if something were broken. It counts them in its summary line; real runs still warn."""
    out = io.StringIO()
    with caplog.at_level(logging.WARNING):
        # Seed 39 redials a call the bridge sees go back (3 calls, 0.2 s steps).
        assert await run_demo(calls=3, step_seconds=0.2, port=0, out=out, seed=39) == 0
    anomalies = [r for r in caplog.records if getattr(r, "action", None) == "upstream_anomaly"]
    assert [r.getMessage() for r in anomalies] == []
    (done,) = [line for line in out.getvalue().splitlines() if line.startswith("done:")]
    assert "oddities of the simulated platform tolerated (" in done, done
    assert "status_regressed" in done or "field_regressed" in done, done
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        count_odd_items(Metrics(), "sched_real", 1, 0)
    assert [getattr(r, "action", None) for r in caplog.records] == ["upstream_anomaly"]
