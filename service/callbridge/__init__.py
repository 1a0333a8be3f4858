"""callbridge: real-time signed webhooks from a polling-only call platform API.

The pipeline, one module per stage, data flowing one way::

    upstream    List Batch Calls pages (budget, retries)        upstream.py
       |
    poller      scan -> diff -> fenced commit                   poller.py, diff.py
       |        (which batch when, by which replica)           scheduler.py
    store       snapshot + events + outbox, atomically          store/snapshots.py
       |
    relay       outbox -> subscription queues (idempotent)      relay.py
       |
    queue       due / in flight / dead, per subscription        store/queue.py
       |
    delivery    claim -> signed POST -> record the outcome      delivery.py, sender.py
       |        (keep-alive HTTP/1.1 client)                   http1.py, framing.py
       |
    api         probes, metrics, admin API                      api/

Pure pieces (no I/O): models, diff, signing, retry, schedule, framing. Wiring and
lifecycle: app.py; settings: config.py; the platform simulator: simulator/.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
