"""`callbridge run` that cannot start: its exit code, time and one line."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from tests.support.settings import API_KEY


async def cannot_start(
    tmp_path: Path, redis_url: str, **redis: Any
) -> tuple[int, float, list[str]]:
    """`callbridge run` (no batches, no subscriptions) against `redis_url` (and the
    other `redis` settings): its exit code, how long it took, what it printed."""
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "upstream": {"base_url": "http://127.0.0.1:1", "api_key": "${KEY}"},
                "redis": {"url": redis_url, **redis},
                "server": {"host": "127.0.0.1", "port": 0},
            }
        )
    )
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "callbridge", "run", "--config", str(config),
        env={**os.environ, "KEY": API_KEY},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, time.monotonic() - started, out.decode().strip().splitlines()


def assert_one_line(lines: list[str], cause: str) -> None:
    assert "Traceback" not in "\n".join(lines), lines
    assert [line for line in lines if "starting" not in line] == [
        line for line in lines if line.startswith("callbridge: cannot start: Redis at ")
    ], lines
    (line,) = [line for line in lines if "cannot start" in line]
    assert "(redis.url)" in line, line
    assert cause in line, line
    assert "s3cret" not in line, line
