"""What a simulator starts with: the world's shape and the faults it injects.

Imports nothing else of the simulator, so every other part may depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    """

    rate_limit_ratio: float = 0.0
    retry_after_seconds: float = 1.0
    server_error_ratio: float = 0.0
    slow_ratio: float = 0.0
    slow_seconds: float = 2.0
    malformed_ratio: float = 0.0
    shift_ratio: float = 0.0
    auth_fail: bool = False
    server_error_statuses: tuple[int, ...] = SERVER_ERROR_STATUSES
    malformed_kinds: tuple[str, ...] = MALFORMED_KINDS

    def __post_init__(self) -> None:
        for name in (
            "rate_limit_ratio",
            "server_error_ratio",
            "slow_ratio",
            "malformed_ratio",
            "shift_ratio",
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


@dataclass(frozen=True)
class SimulatorConfig:
    """The world the simulator starts with; every run with the same config is identical.

    ``concurrency`` is how many calls of a batch hold a dialling slot at once (queued
    to in_progress); the rest wait in pending, and redials skip the wait.
    ``late_update_probability`` is the chance that a completed call changes a field
    one step after completing (``ended_at``/``duration_seconds`` filled in late, or
    its metadata edited) with its status unchanged.
    ``request_log_max`` bounds `Simulator.request_log` for long standalone runs.
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

    def __post_init__(self) -> None:
        if self.batches < 0 or self.calls_per_batch < 0 or self.max_redials < 0:
            raise ValueError("batches, calls_per_batch and max_redials must be >= 0")
        if self.concurrency < 1 or self.request_log_max < 1:
            raise ValueError("concurrency and request_log_max must be >= 1")
        for name in ("redial_probability", "late_update_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"SimulatorConfig.{name} must be between 0 and 1")
