"""One root exception and a few meaningful children. The gRPC service maps them to status
codes in one place; everything below it raises these, never grpc errors."""

from __future__ import annotations


class PipelineError(Exception):
    """Root of every error this package raises on purpose."""


class BadInputError(PipelineError, ValueError):
    """The caller sent something we cannot use (maps to INVALID_ARGUMENT)."""


class NotFoundError(PipelineError, LookupError):
    """An unknown model, version or stream (maps to NOT_FOUND)."""


class ConfigError(PipelineError):
    """A model repository or server setting is invalid; raised at start-up, never later."""


class OverloadedError(PipelineError):
    """The queue is full; the client should back off and retry (maps to RESOURCE_EXHAUSTED)."""


class ModelError(PipelineError):
    """The model failed while running a batch (maps to INTERNAL)."""


class ShuttingDownError(PipelineError):
    """The server is draining and takes no new work (maps to UNAVAILABLE)."""
