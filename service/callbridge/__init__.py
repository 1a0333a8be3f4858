"""callbridge: real-time signed webhooks from a polling-only call platform API."""

__version__ = "0.1.0"

__all__ = ["__version__"]
