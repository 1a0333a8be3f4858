"""A deterministic, fast simulator of the call platform's List Batch Calls API.

A product feature (``callbridge simulate``, demos, local development, users' own
integration tests), so it answers exactly as the API documents, field for field.
Time moves only through `Simulator.advance`, or every ``step_seconds`` under `serve`.

The simulator is split by concept:

* ``simulator`` (here): configuration, the `Simulator` facade and standalone `serve`;
* ``simulator_lifecycle``: the rules moving calls from pending to an ending;
* ``simulator_calls``: the call store with its cached JSON and filtered views;
* ``simulator_http``: the HTTP API and fault injection (`FaultConfig`).

Separate seeded random streams keep runs reproducible: batch ids, each batch's
contacts (seeded by its id), the lifecycle, and faults. So neither HTTP traffic nor
fault settings change what happens to the calls, and adding a batch does not change
the contacts of another.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from callbridge.models import PENDING
from callbridge.simulator_calls import ITEM_FIELDS, BatchRecord
from callbridge.simulator_http import MALFORMED_KINDS, SERVER_ERROR_STATUSES, FaultConfig, build_app
from callbridge.simulator_lifecycle import LEGAL_TRANSITIONS, Lifecycle, Transition

__all__ = [
    "LEGAL_TRANSITIONS",
    "MALFORMED_KINDS",
    "SERVER_ERROR_STATUSES",
    "FaultConfig",
    "Simulator",
    "SimulatorConfig",
    "Transition",
    "serve",
]

logger = logging.getLogger(__name__)


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


class Simulator:
    """The simulated platform: batches of calls that change only when `advance` is called.

    `faults` may be replaced at any time and applies from the next request.
    `request_log` holds ``(clock() when received, path+query, status)`` for every
    request any app from `make_app` served, ``/healthz`` included; `clock` defaults
    to `time.monotonic`. Unknown batch or call ids raise `KeyError`.
    """

    def __init__(
        self, config: SimulatorConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self.faults: FaultConfig = config.faults
        self.clock = clock
        self.request_log: list[tuple[float, str, int]] = []
        self._lifecycle = Lifecycle(config)
        self._id_rng = random.Random(f"batch-ids:{config.seed}")
        self._batches: dict[str, BatchRecord] = {}
        self._call_ids: set[str] = set()
        for _ in range(config.batches):
            batch_id = f"{config.batch_prefix}{self._id_rng.getrandbits(32):08x}"
            while batch_id in self._batches:
                batch_id = f"{config.batch_prefix}{self._id_rng.getrandbits(32):08x}"
            self.add_batch(batch_id, config.calls_per_batch)

    # -- world ----------------------------------------------------------------
    @property
    def batch_ids(self) -> list[str]:
        """Batch ids in creation order."""
        return list(self._batches)

    @property
    def step_count(self) -> int:
        """Steps taken so far; transitions carry the step they happened in."""
        return self._lifecycle.step

    def add_batch(self, batch_id: str, calls: int) -> None:
        """Create a batch of `calls` pending calls; its contacts derive from seed and id."""
        if batch_id in self._batches:
            raise ValueError(f"batch {batch_id!r} already exists")
        if calls < 0:
            raise ValueError("calls must be >= 0")
        self._batches[batch_id] = BatchRecord.generate(
            batch_id,
            calls,
            seed=self.config.seed,
            taken=self._call_ids,
            created_step=self._lifecycle.step,
        )

    def advance(self, steps: int = 1) -> list[Transition]:
        """Move the world `steps` steps on; returns the status changes, in order."""
        if steps < 0:
            raise ValueError("steps must be >= 0")
        changed: list[Transition] = []
        for _ in range(steps):
            self._lifecycle.advance(self._batches.values(), changed)
        return changed

    def set_call(self, batch_id: str, call_id: str, **fields: Any) -> None:
        """Edit a call directly: any item field but ``call_id``, or a new field.

        Values are stored as their JSON round trip. A new ``status`` is recorded as
        a `Transition` and cancels the call's scheduled work; the lifecycle then goes
        on from it (terminal and unknown statuses stay put). Timestamps are not filled
        in for a forced status.
        """
        batch = self._batch(batch_id)
        call = batch.call(call_id)
        values = {name: orjson.loads(orjson.dumps(value)) for name, value in fields.items()}
        status = values.pop("status", call.status)
        if not isinstance(status, str) or not status:
            raise ValueError("status must be a non-empty string")
        call.own_metadata()
        for name, value in values.items():
            if name in ITEM_FIELDS:
                setattr(call, name, value)
            else:
                call.extra = {**(call.extra or {}), name: value}
        if "external_id" in values:
            batch.external_ids_changed()
        if status != call.status:
            self._lifecycle.force_status(batch, call, status)
        batch.touch(call)

    def history(self, batch_id: str, call_id: str) -> list[tuple[int, str]]:
        """``(step, status)`` for every status the call has had, starting with its first."""
        batch = self._batch(batch_id)
        call = batch.call(call_id)
        return list(call.history or [(batch.created_step, PENDING)])

    def transitions(self) -> list[Transition]:
        """Every status change so far, in order."""
        return list(self._lifecycle.transitions)

    def is_finished(self, batch_id: str | None = None) -> bool:
        """True when every call (of one batch, or of all) is terminal and nothing is
        scheduled: no redial and no late field update pending. Nothing changes after."""
        batches = self._batches.values() if batch_id is None else [self._batch(batch_id)]
        return all(batch.open == 0 and batch.followups == 0 for batch in batches)

    def calls(self, batch_id: str) -> list[dict[str, Any]]:
        """The batch's current items, exactly as the API returns them, in creation order."""
        return [orjson.loads(item) for item in self.encoded_items(batch_id)]

    # -- used by the HTTP layer -------------------------------------------------
    def make_app(self) -> web.Application:
        """The List Batch Calls API plus ``GET /healthz``; it runs no background task."""
        return build_app(self)

    def has_batch(self, batch_id: str) -> bool:
        """Whether the batch exists (the API answers 404 otherwise)."""
        return batch_id in self._batches

    def count(
        self, batch_id: str, *, status: str | None = None, external_id: str | None = None
    ) -> int:
        """How many calls of the batch match the filters (the API's ``total``)."""
        return self._batch(batch_id).count(status, external_id)

    def encoded_items(
        self,
        batch_id: str,
        *,
        status: str | None = None,
        external_id: str | None = None,
        start: int = 0,
        stop: int | None = None,
    ) -> list[bytes]:
        """The JSON bytes of the matching items ``[start:stop]``, encoded once per change."""
        return self._batch(batch_id).encoded_items(status, external_id, start, stop)

    def record_request(self, received: float, path: str, status: int) -> None:
        """Append to `request_log`, keeping at most ``config.request_log_max`` entries."""
        log = self.request_log
        log.append((received, path, status))
        if len(log) > self.config.request_log_max:
            # Dropping the older half at once keeps trimming amortised O(1).
            del log[: len(log) // 2]

    # -- internals --------------------------------------------------------------
    def _batch(self, batch_id: str) -> BatchRecord:
        try:
            return self._batches[batch_id]
        except KeyError:
            raise KeyError(f"no batch {batch_id!r}") from None


def _base_url(host: str, addresses: Iterable[Any]) -> str:
    port = next(iter(addresses))[1]
    # A wildcard bind is reachable through loopback; hand out an address a client can dial.
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve(
    host: str,
    port: int,
    config: SimulatorConfig,
    *,
    step_seconds: float = 1.0,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve a new simulator on host:port and advance it every `step_seconds`.

    Runs until `stop` is set or the task is cancelled; `on_ready` gets the base URL
    once the socket listens (``port=0`` picks a free port).
    """
    if step_seconds <= 0:
        raise ValueError("step_seconds must be > 0")
    simulator = Simulator(config)
    stop = stop if stop is not None else asyncio.Event()
    runner = web.AppRunner(simulator.make_app(), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        url = _base_url(host, runner.addresses)
        logger.info(
            "simulator serving %d batches on %s",
            len(simulator.batch_ids),
            url,
            extra={"action": "simulator.start"},
        )
        if on_ready is not None:
            on_ready(url)
        await _run_clock(simulator, step_seconds, stop)
    finally:
        await runner.cleanup()


async def _run_clock(simulator: Simulator, step_seconds: float, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + step_seconds
    reported_finished = False
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                await stop.wait()
            return
        except TimeoutError:
            pass
        changed = simulator.advance()
        logger.debug(
            "simulator step %d: %d changes",
            simulator.step_count,
            len(changed),
            extra={"action": "simulator.step"},
        )
        if not reported_finished and simulator.is_finished():
            reported_finished = True
            logger.info("simulator: every batch finished", extra={"action": "simulator.finished"})
        deadline += step_seconds
        if deadline < loop.time():
            # A stalled loop resumes the cadence instead of replaying missed steps in a burst.
            deadline = loop.time() + step_seconds
