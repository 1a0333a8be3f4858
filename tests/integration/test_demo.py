"""`callbridge demo` shows the operator console: its URL and token are printed and work."""

from __future__ import annotations

import asyncio
import io
import re
from typing import Any

import aiohttp

from callbridge.demo import run_demo


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
