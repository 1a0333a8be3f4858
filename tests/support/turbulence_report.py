"""The figures of one turbulence run, as the checker (`tests.support.turbulence`) finds them."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Missing:
    batch_id: str
    call_id: str
    status: str
    start: float
    visible_s: float
    final: bool


@dataclass(frozen=True, slots=True)
class Problem:
    """One delivered event that breaks a rule, in words."""

    event_id: str
    call: str
    detail: str


@dataclass
class Report:
    """Figures of one run; `ok` when every rule holds. `str()` prints them all."""

    poll_interval_s: float
    required: int = 0
    required_by_status: dict[str, int] = field(default_factory=dict)
    status_events: int = 0
    missing: list[Missing] = field(default_factory=list)
    # Of `missing`: no request carried them at all (lost by polling, or still queued
    # behind an open breaker); the rest were attempted and never answered 2xx.
    missing_unattempted: int = 0
    invented: list[Problem] = field(default_factory=list)
    out_of_order: list[Problem] = field(default_factory=list)
    broken_chains: list[Problem] = field(default_factory=list)
    false_markers: list[Problem] = field(default_factory=list)
    missed_terminal_markers: int = 0
    undelivered_ids: list[str] = field(default_factory=list)
    two_bodies: list[str] = field(default_factory=list)
    same_sequence: list[Problem] = field(default_factory=list)
    batch_completed: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    batch_completed_bad: list[str] = field(default_factory=list)
    unverified: int = 0
    lags_s: list[float] = field(default_factory=list)

    @property
    def batch_completed_exact(self) -> bool:
        return not self.batch_completed_bad and all(
            low <= got <= high for got, low, high in self.batch_completed.values()
        )

    def lag(self, q: float) -> float:
        return percentile(self.lags_s, q)

    @property
    def ok(self) -> bool:
        return not (
            self.missing
            or self.invented
            or self.out_of_order
            or self.broken_chains
            or self.false_markers
            or self.undelivered_ids
            or self.two_bodies
            or self.same_sequence
            or self.unverified
        ) and (self.batch_completed_exact)

    def figures(self) -> dict[str, Any]:
        return {
            "required": self.required,
            "missing": len(self.missing),
            "missing_unattempted": self.missing_unattempted,
            "invented": len(self.invented),
            "out_of_order": len(self.out_of_order),
            "broken_chains": len(self.broken_chains),
            "false_markers": len(self.false_markers),
            "missed_terminal_markers": self.missed_terminal_markers,
            "status_events": self.status_events,
            "undelivered_ids": len(self.undelivered_ids),
            "two_bodies": len(self.two_bodies),
            "same_sequence": len(self.same_sequence),
            "unverified": self.unverified,
            "batch_completed_exact": self.batch_completed_exact,
            "lag_p50_s": round(self.lag(50), 3),
            "lag_p99_s": round(self.lag(99), 3),
            "lag_max_s": round(self.lag(100), 3),
        }

    def __str__(self) -> str:
        lines = [" ".join(f"{k}={v}" for k, v in self.figures().items())]
        missing_by: dict[str, int] = defaultdict(int)
        for m in self.missing:
            missing_by[m.status + (" (final)" if m.final else "")] += 1
        if missing_by:
            lines.append(f"missing by status: {dict(sorted(missing_by.items()))}")
        lines.append(f"required by status: {dict(sorted(self.required_by_status.items()))}")
        for batch_id, (got, low, high) in sorted(self.batch_completed.items()):
            lines.append(f"batch.completed {batch_id}: got {got}, expected {low}..{high}")
        lines += [f"batch.completed problem: {p}" for p in self.batch_completed_bad[:3]]
        for name in ("invented", "out_of_order", "broken_chains", "false_markers"):
            for p in getattr(self, name)[:3]:
                lines.append(f"{name}: {p.call} {p.event_id}: {p.detail}")
        for m in self.missing[:5]:
            lines.append(
                f"missing: {m.batch_id}/{m.call_id} {m.status} at {m.start:.3f} "
                f"(visible {m.visible_s:.2f}s{', final' if m.final else ''})"
            )
        return "\n".join(lines)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]
