"""Everything that speaks Redis, one owner per concern.

* `keys`: the key schema (one prefix, hash tags per atomic step);
* `connection`: clients for Redis, Redis Cluster or the embedded server, and the
  persistence check;
* `snapshots`: per-batch snapshot, metadata, timeline and outbox, written by one
  fenced commit;
* `leases`: which replica polls which batch, and replica heartbeats;
* `queue`: the durable delivery queue of each subscription;
* `registry`: the watched batches, shared by the fleet;
* `ratelimit`: the fleet-wide upstream request budget;
* `embedded`: the Valkey server started when no Redis URL is configured;
* `scripts` + ``lua/``: the Lua scripts, one file each with a KEYS/ARGV/reply header.
"""
