"""A deterministic, fast simulator of the call platform's List Batch Calls API.

A product feature (``callbridge simulate``, demos, local development, users' own
integration tests), so it answers exactly as the API documents, field for field.
Time moves only through `Simulator.advance`, or every ``step_seconds`` under `serve`
(`run_clock`); `Timing` makes statuses last seconds of real time instead of steps.
Faults real platforms have (`FaultConfig`): 429s, 5xx, slow and malformed answers,
shifted and reordered pages, outages; the ground truth for checkers is
`Simulator.transitions`, `Simulator.spans` and `Simulator.outages`.

* `config`: `SimulatorConfig` and `FaultConfig` (imports nothing else of the simulator);
* `calls`: the call store with its cached JSON and filtered views;
* `lifecycle`: the rules moving calls from pending to an ending;
* `world`: the `Simulator` facade over batches, lifecycle and clock;
* `http`: the HTTP API and fault injection, built on the world (`make_app`);
* `serve`: the standalone server that advances the world on a clock.
"""

from callbridge.simulator.config import (
    DEFAULT_DWELL_SECONDS,
    MALFORMED_KINDS,
    OUTAGE_KINDS,
    SERVER_ERROR_STATUSES,
    FaultConfig,
    SimulatorConfig,
    Timing,
)
from callbridge.simulator.http import make_app
from callbridge.simulator.lifecycle import LEGAL_TRANSITIONS, StatusSpan, Transition
from callbridge.simulator.serve import run_clock, serve
from callbridge.simulator.world import Simulator

__all__ = [
    "DEFAULT_DWELL_SECONDS",
    "LEGAL_TRANSITIONS",
    "MALFORMED_KINDS",
    "OUTAGE_KINDS",
    "SERVER_ERROR_STATUSES",
    "FaultConfig",
    "Simulator",
    "SimulatorConfig",
    "StatusSpan",
    "Timing",
    "Transition",
    "make_app",
    "run_clock",
    "serve",
]
