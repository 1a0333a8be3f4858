"""Where a cycle's CPU goes, without a profiler's overhead (poll cycles only).

`PhaseTimer` patches a few leaf functions of the service *in this process only*
(``unittest.mock.patch``; nothing under service/ is edited) with wrappers that add
the CPU time (``time.process_time``) spent inside each to a named phase. The
benchmarks run one coroutine at a time, so the CPU measured around an awaited
call is that call's own.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from unittest import mock


class PhaseTimer:
    def __init__(self) -> None:
        self.cpu: defaultdict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()
        # Phases whose time is also inside another phase (not added up for "other").
        self.nested: dict[str, str] = {}
        self._gc_started = 0.0

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.process_time()
        else:
            name = f"garbage collector (gen {info['generation']})"
            self.cpu[name] += time.process_time() - self._gc_started
            self.calls[name] += 1
            self.nested[name] = "any"

    def _async(self, name: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.process_time()
            try:
                return await fn(*args, **kwargs)
            finally:
                self.cpu[name] += time.process_time() - t0
                self.calls[name] += 1

        return wrapper

    def _sync(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.cpu[name] += time.process_time() - t0
                self.calls[name] += 1

        return wrapper

    @contextlib.contextmanager
    def poll_phases(self) -> Iterator[None]:
        """Phases of `Poller.poll_once`."""
        import callbridge.poll.cycle as poller
        import callbridge.poll.upstream as upstream
        import callbridge.store.ratelimit as ratelimit
        from callbridge.store.queue import DeliveryQueue
        from callbridge.store.snapshots import SnapshotStore

        fetch = "fetch + decode pages"
        targets: list[tuple[str, Any, str, bool, str | None]] = [
            ("lease", poller.Poller, "_ensure_lease", True, None),
            ("load snapshot", SnapshotStore, "load", True, None),
            (fetch, upstream.UpstreamClient, "fetch_page", True, None),
            ("body digest (blake2b)", upstream, "body_digest", False, fetch),
            ("decode_page (orjson + checks)", upstream, "decode_page", False, fetch),
            ("select_candidates", poller, "select_candidates", False, None),
            ("diff", poller, "diff", False, None),
            ("commit (Lua)", SnapshotStore, "commit", True, None),
            ("relay: read_outbox", SnapshotStore, "read_outbox", True, None),
            ("relay: enqueue", DeliveryQueue, "enqueue", True, None),
            ("relay: trim_outbox", SnapshotStore, "trim_outbox", True, None),
        ]
        # Whichever limiter classes exist (in-process bucket, Redis GCRA).
        for cls_name in ("TokenBucket", "RedisRateLimiter"):
            cls = getattr(ratelimit, cls_name, None)
            if cls is not None:
                targets.append((f"rate limiter ({cls_name})", cls, "acquire", True, fetch))
        with contextlib.ExitStack() as stack:
            for name, owner, attr, is_async, parent in targets:
                orig = getattr(owner, attr)
                wrapped = self._async(name, orig) if is_async else self._sync(name, orig)
                stack.enter_context(mock.patch.object(owner, attr, wrapped))
                if parent is not None:
                    self.nested[name] = parent
            gc.callbacks.append(self._on_gc)
            stack.callback(gc.callbacks.remove, self._on_gc)
            yield

    def report(self, total_cpu_s: float) -> list[dict[str, Any]]:
        """Phases by CPU; ``within`` names the phase a nested one is part of."""
        rows = [
            {
                "phase": name,
                "within": self.nested.get(name),
                "calls": self.calls[name],
                "cpu_s": cpu,
                "share": cpu / total_cpu_s,
            }
            for name, cpu in sorted(self.cpu.items(), key=lambda kv: -kv[1])
        ]
        top_level = sum(cpu for name, cpu in self.cpu.items() if name not in self.nested)
        other = total_cpu_s - top_level
        rows.append(
            {
                "phase": "other (metrics, logging, event loop)",
                "within": None,
                "calls": 0,
                "cpu_s": other,
                "share": other / total_cpu_s,
            }
        )
        return rows
