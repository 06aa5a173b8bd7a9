"""Errors of the streaming layer."""

from sketchstream.models.errors import SketchstreamError

__all__ = ["ConfigError", "KafkaUnavailable", "StreamError"]


class StreamError(SketchstreamError):
    """Root of the streaming layer's errors."""


class ConfigError(StreamError, ValueError):
    """A setting is missing or has a value the system cannot use."""


class KafkaUnavailable(StreamError):
    """No broker answered at the configured bootstrap servers."""
