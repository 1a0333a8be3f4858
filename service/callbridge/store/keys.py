"""The Redis key schema: every key is built here, under one configurable prefix.

Keys that one atomic step touches together
share a Redis Cluster hash slot through a hash tag:

* ``{b:<batch>}`` - everything a poll commit writes: snapshot, metadata, lease,
  timeline and the batch's outbox stream.
* ``{s:<subscription>}`` - everything a delivery step writes: the due set, the
  in-flight set, delivery records, dead letters and the endpoint state.

Global keys (batch registry, replica heartbeats) are single-key operations only.
"""

from __future__ import annotations

from dataclasses import dataclass

from callbridge.constants import DEFAULT_KEY_PREFIX


def _tag_safe(name: str) -> str:
    # Braces inside a hash tag would end it early and scatter a batch's keys.
    return name.replace("{", "(").replace("}", ")")


@dataclass(frozen=True, slots=True)
class Keys:
    """Builds every Redis key under one prefix."""

    prefix: str = DEFAULT_KEY_PREFIX

    # -- global ---------------------------------------------------------------
    def batches(self) -> str:
        """Hash batch_id -> JSON registration (source, options) of every known batch."""
        return f"{self.prefix}:batches"

    def replicas(self) -> str:
        """Sorted set replica_id -> last heartbeat (ms)."""
        return f"{self.prefix}:replicas"

    def replica_processes(self) -> str:
        """Hash "<replica id>|<nonce>" -> "<first>|<last> beat (ms)" of every live
        process (`presence`): two processes under one replica id are told apart."""
        return f"{self.prefix}:replica_procs"

    def subscriptions(self) -> str:
        """Hash subscription name -> when a replica whose config has it last said so (ms)."""
        return f"{self.prefix}:subscriptions"

    def subscription_pattern(self, subscription: str) -> str:
        """SCAN pattern matching every key of one subscription."""
        return f"{self._s(subscription)}:*"

    def upstream_budget(self) -> str:
        """Theoretical arrival time (ms) of the next upstream request (fleet-wide GCRA)."""
        return f"{self.prefix}:upstream:budget"

    # -- per batch (one slot) -------------------------------------------------
    def _b(self, batch_id: str) -> str:
        return f"{self.prefix}:{{b:{_tag_safe(batch_id)}}}"

    def snapshot(self, batch_id: str) -> str:
        """Hash call_id -> packed CallState."""
        return f"{self._b(batch_id)}:calls"

    def batch_meta(self, batch_id: str) -> str:
        """Hash of batch metadata: version, lifecycle, counts, timestamps."""
        return f"{self._b(batch_id)}:meta"

    def lease(self, batch_id: str) -> str:
        """String: the token of the replica that owns the batch, with a TTL."""
        return f"{self._b(batch_id)}:lease"

    def acked(self, batch_id: str) -> str:
        """String written just before a `WAIT` (`store.replication`), with a TTL: the write
        the replicas' acknowledgement is counted against, after the batch's commits."""
        return f"{self._b(batch_id)}:acked"

    def timeline(self, batch_id: str) -> str:
        """Hash call_id -> recent transitions (bounded)."""
        return f"{self._b(batch_id)}:timeline"

    def outbox(self, batch_id: str) -> str:
        """Stream of committed events not yet fanned out to subscriptions."""
        return f"{self._b(batch_id)}:outbox"

    # -- per subscription (one slot) ------------------------------------------
    def _s(self, subscription: str) -> str:
        return f"{self.prefix}:{{s:{_tag_safe(subscription)}}}"

    def due(self, subscription: str) -> str:
        """Sorted set delivery_id -> due time (ms)."""
        return f"{self._s(subscription)}:due"

    def parked(self, subscription: str) -> str:
        """Sorted set delivery_id -> enqueue time (ms): deliveries waiting for the first
        attempt of their call's previous event (never in `due` until released)."""
        return f"{self._s(subscription)}:parked"

    def inflight(self, subscription: str) -> str:
        """Sorted set delivery_id -> visibility deadline (ms) of a claimed attempt."""
        return f"{self._s(subscription)}:inflight"

    def dead(self, subscription: str) -> str:
        """Sorted set delivery_id -> time (ms) it was dead-lettered."""
        return f"{self._s(subscription)}:dead"

    def delivery(self, subscription: str, event_id: str) -> str:
        """Hash: one delivery's payload, state and attempt history."""
        return f"{self._s(subscription)}:d:{event_id}"

    def chain(self, subscription: str) -> str:
        """Hash call key -> last event id enqueued for that call (per-call ordering)."""
        return f"{self._s(subscription)}:chain"

    def endpoint(self, subscription: str) -> str:
        """Hash: endpoint health (disabled, breaker state, consecutive failures)."""
        return f"{self._s(subscription)}:endpoint"

    def ops(self, subscription: str) -> str:
        """Stream: the subscription's operational events (breaker opened, recovered,
        disabled, dead-lettered), written by the delivery scripts, handed on to the
        subscriptions that asked for them (`DeliveryQueue.ops_events`)."""
        return f"{self._s(subscription)}:ops"

    def recover_job(self, subscription: str, job_id: str) -> str:
        """Hash: an operator's recovery job of the subscription (recover.lua)."""
        return f"{self._s(subscription)}:recover:{job_id}"

    def recover_list(self, subscription: str, job_id: str, phase: str) -> str:
        """Sorted set: what a recovery job will look at in `phase` (dead | due), copied
        from the subscription's set when the job started."""
        return f"{self._s(subscription)}:recover:{job_id}:{phase}"

    def recover_jobs(self, subscription: str) -> str:
        """Sorted set job id -> created (ms): the subscription's recovery jobs."""
        return f"{self._s(subscription)}:recover_jobs"

    def record_prefix(self, subscription: str) -> str:
        """What every delivery record key of the subscription starts with: scripts that
        find records by id build their keys as ``record_prefix .. id`` (`delivery`)."""
        return self.delivery(subscription, "")

    def claim_receipt(self, subscription: str, token: str) -> str:
        """String: the ids one claim call took (claim.lua), so a call re-sent after a lost
        reply returns them instead of claiming more."""
        return f"{self._s(subscription)}:claim:{token}"
