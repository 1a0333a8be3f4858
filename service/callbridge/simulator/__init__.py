"""A deterministic, fast simulator of the call platform's List Batch Calls API.

A product feature (``callbridge simulate``, demos, local development, users' own
integration tests), so it answers exactly as the API documents, field for field.
Time moves only through `Simulator.advance`, or every ``step_seconds`` under `serve`.

* `config`: `SimulatorConfig` and `FaultConfig` (imports nothing else of the simulator);
* `calls`: the call store with its cached JSON and filtered views;
* `lifecycle`: the rules moving calls from pending to an ending;
* `world`: the `Simulator` facade over batches, lifecycle and clock;
* `http`: the HTTP API and fault injection, built on the world (`make_app`);
* `serve`: the standalone server that advances the world on a clock.
"""

from callbridge.simulator.config import (
    MALFORMED_KINDS,
    SERVER_ERROR_STATUSES,
    FaultConfig,
    SimulatorConfig,
)
from callbridge.simulator.http import make_app
from callbridge.simulator.lifecycle import LEGAL_TRANSITIONS, Transition
from callbridge.simulator.serve import serve
from callbridge.simulator.world import Simulator

__all__ = [
    "LEGAL_TRANSITIONS",
    "MALFORMED_KINDS",
    "SERVER_ERROR_STATUSES",
    "FaultConfig",
    "Simulator",
    "SimulatorConfig",
    "Transition",
    "make_app",
    "serve",
]
