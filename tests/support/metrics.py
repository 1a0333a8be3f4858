"""Reading metrics as Prometheus would: through the registry's public samples."""

from __future__ import annotations

from callbridge.metrics import Metrics


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    """The value of sample `name` (``callbridge_`` prefix implied) with `labels`, or None."""
    return metrics.registry.get_sample_value(f"callbridge_{name}", labels)
