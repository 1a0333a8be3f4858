"""What a replica knows of a batch it polls, between cycles (`BatchCache`).

Everything here is a cache of what Redis holds, or of what the last committed scan
saw: it moves forward only after a commit (`committed`) and is dropped whenever
the lease is lost (`drop_cache`), to be loaded again from Redis.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from callbridge.poll.candidates import ItemSignatures
from callbridge.poll.cycle_trace import CycleTrace
from callbridge.poll.diff import DiffResult
from callbridge.poll.fanout import FanOut
from callbridge.poll.group_commit import GroupCommit
from callbridge.poll.pages import RawPage
from callbridge.poll.planner import Plan, PlanState
from callbridge.poll.second_look import Suspect
from callbridge.store.callstate import CallState, CallStates
from callbridge.store.snapshots import BatchMeta


@dataclass(slots=True)
class BatchCache:
    """What this replica knows about a batch it polls."""

    batch_id: str
    backfill: bool
    token: str | None = None
    meta: BatchMeta = field(default_factory=BatchMeta)
    states: CallStates | None = None  # None: not loaded (cold)
    signatures: ItemSignatures = field(default_factory=ItemSignatures)
    pages: dict[int, RawPage] = field(default_factory=dict)
    not_found: bool = False
    retired: bool = False
    # The last complete full scan served fewer calls than the snapshot holds: the next
    # full scan reads every page and names those it does not serve (`batch_end`).
    census: bool = False
    # Set while committed events may still sit in the outbox un-fanned-out
    # (after a take-over, or a fan-out that failed): drained before anything else.
    outbox_dirty: bool = False
    # Calls seen moving backwards, not confirmed yet, with what the last scan that
    # served them showed; kept with each commit (`BatchMeta.suspects`).
    suspects: dict[str, Suspect] = field(default_factory=dict)
    # What the scan planner remembers of the batch (`planner.PlanState`).
    plan: PlanState = field(default_factory=PlanState)
    # The group commit of the cycle running now, if any (`group_commit`).
    group: GroupCommit | None = None
    # ...and its fan-outs, run in the background in commit order (`fanout.FanOut`).
    fanout: FanOut | None = None
    # ...and its span, while tracing is on (`cycle_trace`).
    trace: CycleTrace | None = None
    # Cycles run since the batch was loaded (`second_look.Suspect.cycle`).
    cycle: int = 0
    next_due: float = 0.0
    last_started: float | None = None
    task: asyncio.Task[None] | None = None
    # Held for the length of a cycle (`Poller.poll_once`): one cycle of a batch at a time.
    cycle_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def committed(
        self,
        meta: BatchMeta,
        states: Mapping[str, CallState],
        encoded: Mapping[str, str],
        signatures: dict[str, int],
        suspects: dict[str, Suspect],
        pages: list[RawPage] | None,
    ) -> None:
        """Move the caches forward to a cycle just committed (`pages`: None unless
        the scan was complete)."""
        assert self.states is not None
        self.meta = meta
        self.not_found = False
        self.states.update(states, encoded)
        self.signatures.update(signatures)
        self.suspects = suspects
        # Pages of a partial scan keep no digest: they are read in full next time; so
        # are all while a suspect waits (its page may not change, its call must be
        # looked at again).
        self.pages = (
            {p.page: dataclasses.replace(p, raws=[], unchanged=False) for p in pages}
            if pages is not None and not suspects
            else {}
        )

    def drop_cache(self) -> None:
        self.states = None
        self.census = False
        self.signatures = ItemSignatures()
        self.pages = {}
        self.suspects = {}
        self.plan = PlanState()


@dataclass(slots=True)
class CycleCommits:
    """What the groups of one cycle committed, for the planner (`reader.settle_plan`)."""

    items: list[dict[str, Any]] = field(default_factory=list)
    moved: int = 0
    # Every call the cycle's groups served, while it is a census (`BatchCache.census`).
    served: set[str] | None = None


def meta_after(
    meta: BatchMeta,
    result: DiffResult,
    suspects: tuple[list[bytes], list[str]],
    plan: Plan | None,
    now_ms: int,
) -> BatchMeta:
    """The batch's metadata as a commit of `result` leaves it (`plan`: the cycle's,
    on its last group only; `suspects`: as stored with the commit)."""
    out = dataclasses.replace(
        meta,
        counts=result.counts,
        completed=result.completed,
        completions=result.completions,
        last_poll_ms=now_ms,
        not_found_since_ms=0,
        ended="",
        suspects=suspects[0],
        suspects_twice=suspects[1],
    )
    if plan is not None:
        out.scan_plan, out.scan_reason = plan.kind, plan.reason
    if result.changed:
        out.last_change_ms = now_ms
    if result.completions > meta.completions:
        out.completed_at_ms = now_ms
    return out
