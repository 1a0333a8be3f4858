"""What a simulator starts with: the world's shape and the faults it injects.

Imports nothing else of the simulator, so every other part may depend on it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

# Every way the malformed fault can break a 200 body.
MALFORMED_KINDS: tuple[str, ...] = (
    "truncated",  # the valid body cut in half
    "html",  # a maintenance page served with 200
    "no_data",  # the envelope with "data": null
    "items_not_list",  # "items" is an object wrapping the list
    "missing_fields",  # "data" lacks total and has_more
    "empty",  # zero-length body
    "not_an_object",  # a bare JSON array of items
)
SERVER_ERROR_STATUSES: tuple[int, ...] = (500, 502, 503)
# How the API answers during an outage: a 503 envelope, or the connection reset unanswered.
OUTAGE_KINDS: tuple[str, ...] = ("503", "reset")
# Wall-clock mode: how long each status lasts, seconds (uniform in [low, high]). For
# no_answer and busy it is the pause before a redial. The short ends are there on
# purpose: a call may ring and be answered within 0.2 s, quicker than any poll.
DEFAULT_DWELL_SECONDS: Mapping[str, tuple[float, float]] = MappingProxyType(
    {
        "queued": (0.3, 4.0),
        "ringing": (0.1, 6.0),
        "answered": (0.1, 1.5),
        "in_progress": (2.0, 20.0),
        "no_answer": (1.0, 6.0),
        "busy": (1.0, 6.0),
    }
)


@dataclass(frozen=True)
class FaultConfig:
    """Faults the simulator injects into List Batch Calls responses; all off by default.

    Ratios are per-request probabilities drawn from a seeded RNG kept apart from
    the world's, so injecting faults never changes the calls' lifecycle.

    * ``rate_limit_ratio``: 429, ``Retry-After: <retry_after_seconds>`` (an integer
      when whole, else a decimal such as ``0.1``) and a RATE_LIMITED envelope.
    * ``server_error_ratio``: a status drawn from ``server_error_statuses``; 500 and
      503 carry an error envelope, 502 an HTML page as a reverse proxy sends it.
    * ``slow_ratio``: the response is delayed by ``slow_seconds`` and then answered
      as usual (possibly with another fault).
    * ``malformed_ratio``: a 200 whose body is not the documented envelope, of a kind
      drawn from ``malformed_kinds`` (see ``MALFORMED_KINDS``).
    * ``shift_ratio``: the page is served as if 1-3 items had been inserted before it
      (the scan sees duplicates across pages) or removed before it (the scan misses
      items), with ``total`` and ``has_more`` consistent with that shifted list. The
      world is not changed, so the next unshifted scan sees everything.
    * ``auth_fail``: every request gets the documented 401, whatever its key.
    * ``reorder_ratio``: after answering a page, the batch's order really changes:
      ``reorder_share`` of its items trade places at random, for good. The following
      requests of a paginated scan see some items twice and miss others, and ``total``
      stays right (unlike ``shift_ratio``, nothing tells the client). Calls do not
      change; the next scan that is not disturbed again sees every call once.
    * Outages: while one lasts, every List Batch Calls request is answered with a 503
      envelope (``outage_kind="503"``) or has its connection reset without an answer
      (``"reset"``), before any other fault. Windows are seconds since the simulator
      started (`Simulator.started_at`, on its own clock): ``outage_windows`` lists
      ``(start, end)`` pairs, and ``outage_every_seconds`` > 0 adds one outage of
      ``outage_seconds`` every that many seconds (the first after one period).
      `outages` lists them; the world goes on during an outage, unseen.

    The reorder draws come from a stream of their own, so the other faults draw as
    they did before it existed.
    """

    rate_limit_ratio: float = 0.0
    retry_after_seconds: float = 1.0
    server_error_ratio: float = 0.0
    slow_ratio: float = 0.0
    slow_seconds: float = 2.0
    malformed_ratio: float = 0.0
    shift_ratio: float = 0.0
    auth_fail: bool = False
    reorder_ratio: float = 0.0
    reorder_share: float = 0.1
    outage_every_seconds: float = 0.0
    outage_seconds: float = 0.0
    outage_windows: tuple[tuple[float, float], ...] = ()
    outage_kind: str = "503"
    server_error_statuses: tuple[int, ...] = SERVER_ERROR_STATUSES
    malformed_kinds: tuple[str, ...] = MALFORMED_KINDS

    def __post_init__(self) -> None:
        for name in (
            "rate_limit_ratio",
            "server_error_ratio",
            "slow_ratio",
            "malformed_ratio",
            "shift_ratio",
            "reorder_ratio",
            "reorder_share",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"FaultConfig.{name} must be between 0 and 1, got {value!r}")
        if self.retry_after_seconds < 0 or self.slow_seconds < 0:
            raise ValueError("FaultConfig.retry_after_seconds and slow_seconds must be >= 0")
        if not self.server_error_statuses or not set(self.server_error_statuses) <= set(
            SERVER_ERROR_STATUSES
        ):
            raise ValueError(
                f"FaultConfig.server_error_statuses must be a non-empty subset of "
                f"{SERVER_ERROR_STATUSES}"
            )
        if not self.malformed_kinds or not set(self.malformed_kinds) <= set(MALFORMED_KINDS):
            raise ValueError(
                f"FaultConfig.malformed_kinds must be a non-empty subset of {MALFORMED_KINDS}"
            )
        if self.outage_every_seconds < 0 or self.outage_seconds < 0:
            raise ValueError("FaultConfig.outage_every_seconds and outage_seconds must be >= 0")
        if 0 < self.outage_every_seconds <= self.outage_seconds:
            raise ValueError("FaultConfig.outage_seconds must be shorter than outage_every_seconds")
        if any(not 0 <= start < end for start, end in self.outage_windows):
            raise ValueError("FaultConfig.outage_windows: pairs (start, end), 0 <= start < end")
        if self.outage_kind not in OUTAGE_KINDS:
            raise ValueError(f"FaultConfig.outage_kind must be one of {OUTAGE_KINDS}")

    def in_outage(self, elapsed: float) -> bool:
        """Whether the API is down `elapsed` seconds after the simulator started."""
        if any(start <= elapsed < end for start, end in self.outage_windows):
            return True
        every = self.outage_every_seconds
        if every <= 0 or self.outage_seconds <= 0 or elapsed < every:
            return False
        return elapsed % every < self.outage_seconds

    def outages(self, until: float) -> list[tuple[float, float]]:
        """Every outage window starting before `until` (seconds since start), in order."""
        windows = [w for w in self.outage_windows if w[0] < until]
        every = self.outage_every_seconds
        if every > 0 and self.outage_seconds > 0:
            for k in range(1, math.ceil(until / every)):
                windows.append((k * every, k * every + self.outage_seconds))
        return sorted(windows)


@dataclass(frozen=True)
class Timing:
    """The wall-clock mode: a step stands for `step_seconds` and statuses last seconds.

    Each status of ``dwell_seconds`` lasts a uniform draw from its ``(low, high)`` range
    (rounded up to whole steps, one at least); for no_answer and busy it is the pause
    before a redial. Item timestamps advance `step_seconds` per step. A driver calls
    `Simulator.advance` every `step_seconds` of real time (`serve`, `run_clock`), so a
    status of 0.2 s is visible to clients for about 0.2 s.
    """

    step_seconds: float = 0.1
    dwell_seconds: Mapping[str, tuple[float, float]] = field(
        default_factory=lambda: DEFAULT_DWELL_SECONDS
    )

    def __post_init__(self) -> None:
        if not self.step_seconds > 0:
            raise ValueError("Timing.step_seconds must be > 0")
        unknown = set(self.dwell_seconds) - set(DEFAULT_DWELL_SECONDS)
        if unknown:
            raise ValueError(
                f"Timing.dwell_seconds: no dwell for {sorted(unknown)}; "
                f"known: {sorted(DEFAULT_DWELL_SECONDS)}"
            )
        for status, (low, high) in self.dwell_seconds.items():
            if not 0 <= low <= high:
                raise ValueError(f"Timing.dwell_seconds[{status!r}] must be 0 <= low <= high")
        # Statuses left out keep their default range.
        merged = {**DEFAULT_DWELL_SECONDS, **self.dwell_seconds}
        object.__setattr__(self, "dwell_seconds", MappingProxyType(merged))

    def dwell_steps(self, status: str, draw: float) -> int:
        """Steps `status` lasts for a uniform `draw` in [0, 1)."""
        low, high = self.dwell_seconds[status]
        return max(1, math.ceil((low + (high - low) * draw) / self.step_seconds - 1e-9))


@dataclass(frozen=True)
class SimulatorConfig:
    """The world the simulator starts with; every run with the same config is identical.

    ``concurrency`` is how many calls of a batch hold a dialling slot at once (queued
    to in_progress); the rest wait in pending, and redials skip the wait.
    ``late_update_probability`` is the chance that a completed call changes a field
    one step after completing (``ended_at``/``duration_seconds`` filled in late, or
    its metadata edited) with its status unchanged.
    ``request_log_max`` bounds `Simulator.request_log` for long standalone runs.
    ``timing`` switches to the wall-clock mode (see `Timing`); without it a status
    lasts 1-4 steps and a step stands for 15 s of item timestamps.
    """

    batches: int = 1
    calls_per_batch: int = 50
    api_key: str = "sk_test"
    seed: int = 0
    batch_prefix: str = "sched_"
    redial_probability: float = 0.3
    max_redials: int = 2
    late_update_probability: float = 0.2
    faults: FaultConfig = field(default_factory=FaultConfig)
    concurrency: int = 10
    request_log_max: int = 1_000_000
    # Keep `Simulator.served` (when each call was in an answer): for test checkers.
    record_served: bool = False
    timing: Timing | None = None

    def __post_init__(self) -> None:
        if self.batches < 0 or self.calls_per_batch < 0 or self.max_redials < 0:
            raise ValueError("batches, calls_per_batch and max_redials must be >= 0")
        if self.concurrency < 1 or self.request_log_max < 1:
            raise ValueError("concurrency and request_log_max must be >= 1")
        for name in ("redial_probability", "late_update_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"SimulatorConfig.{name} must be between 0 and 1")
