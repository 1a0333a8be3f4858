"""The poll stage: from the platform's pages to committed events.

Owns reading List Batch Calls (the request budget, retries, the plan of each cycle),
diffing what it shows against the stored snapshot, and committing snapshot + events
in one fenced step. One cycle, top to bottom (`cycle.Poller.poll_once`)::

    load      the batch's snapshot, once per lease             store.snapshots
    plan      full read or the active plan                     planner
    read      pages, as they arrive                            reader -> full_read / active_read
    confirm   a second look at calls that moved backwards      second_look
    diff      candidates -> transitions -> events              candidates, diff
    commit    snapshot + events + outbox, in page groups       group_commit, store.snapshots
    fan out   hand the committed events on                     `EventSink` (the deliver stage)

Around it: `scheduler` decides which batch is polled when and by which replica,
`lifecycle` (pure) how often, `upstream_health` whether this replica reaches the
platform at all, `batch_cache` what a replica keeps of a batch between cycles.

May import: the shared core (config, models, errors, metrics, constants) and `store`.
Never `deliver`: committed events leave through the `EventSink` protocol, which the
wiring (`app`) fills with the relay.
"""
