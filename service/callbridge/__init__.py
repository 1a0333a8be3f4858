"""callbridge: real-time signed webhooks from a polling-only call platform API.

The pipeline, data flowing one way; each stage a subpackage::

    platform -pages-> poll/ -commit-> store/ (Redis) <-claim/outcome- deliver/ -POST-> receivers
                      read, diff      snapshot + outbox,             relay, sign, send,
                      (planner,       delivery queues,               retry, dead letters
                      second looks)   leases, registry

Allowed imports (import-linter's contract in pyproject.toml, `lint-imports` in CI)::

    cli -> demo -> app -> api -> operations | janitor -> poll | deliver -> store -> core

`poll` and `deliver` never import each other: committed events leave the poll stage
through `poll.fanout.EventSink`, which `app` fills with `deliver.relay.Relay`. The
shared core (`config`, `metrics`, `tracing`, `catalog`, `events`, `models`, `constants`,
`errors`) imports no stage: `events` models the webhook bodies, `catalog` publishes them (JSON
Schemas, examples; `api.webhooks` adds them to openapi.json as its `webhooks`).
The platform simulator (`simulator/`) stands beside the pipeline and imports only
`models`, `constants` and `errors`.

Pure pieces (no I/O): models, events, catalog, poll.diff, poll.planner, poll.lifecycle,
deliver.signing, deliver.retry, deliver.framing. Wiring and lifecycle: app; operator
actions: operations, janitor; the command line: cli/.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
