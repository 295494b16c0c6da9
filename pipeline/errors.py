"""One root exception and a few meaningful children, each with the status it maps to.

Everything below the frontends raises these, never gRPC or HTTP errors. ``STATUS`` is the one
table from error kind to wire status; the gRPC and HTTP adapters read it and nothing else.
Errors that are not PipelineErrors are our own faults: INTERNAL / 500.
"""

from __future__ import annotations

import asyncio
import logging
from typing import NamedTuple

LOG = logging.getLogger(__name__)


class Status(NamedTuple):
    grpc: str  # a grpc.StatusCode name
    http: int


class PipelineError(Exception):
    """Root of every error this package raises on purpose."""


class BadInputError(PipelineError, ValueError):
    """The caller sent something we cannot use."""


class InvalidOptionError(BadInputError):
    """A request (or config.pbtxt) parameter has a value we cannot use; ``key`` names it."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class NotFoundError(PipelineError, LookupError):
    """An unknown model, version or stream."""


class AlreadyExistsError(PipelineError):
    """A name that is taken (a shared memory region registered twice)."""


class ConfigError(PipelineError):
    """A model repository or server setting is invalid: at start-up, or when a model is loaded
    at run time (that model alone is refused; FAILED_PRECONDITION / 400)."""


class OverloadedError(PipelineError):
    """A queue, a per-client limit or the bytes budget is full; the client should back off and retry."""


class LimitError(OverloadedError):
    """A count the operator capped is reached (camera streams): not a passing load, so HTTP
    says 429, not 503."""


class UnauthenticatedError(PipelineError):
    """A request without the server's token (health checks excepted)."""


class TooLargeError(PipelineError):
    """A message or body over the server's size limit; refused before it is read."""


class ModelError(PipelineError):
    """The model failed while running a batch."""


class UnavailableError(PipelineError):
    """A model that is not loaded now (unloaded, or a network it needs is)."""


class ShuttingDownError(PipelineError):
    """The server is draining and takes no new work."""


class DeadlineError(PipelineError):
    """A request waited past its queue timeout or its caller's deadline, or could not start
    within it; it was not run. retry_after_s: for one refused on arrival, about when a new
    request could start in time (streams are paused that long: see ``StreamWindow.hold``)."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


STATUS: dict[type[PipelineError], Status] = {
    BadInputError: Status("INVALID_ARGUMENT", 400),
    NotFoundError: Status("NOT_FOUND", 404),
    AlreadyExistsError: Status("ALREADY_EXISTS", 409),
    OverloadedError: Status("RESOURCE_EXHAUSTED", 503),
    LimitError: Status("RESOURCE_EXHAUSTED", 429),
    ShuttingDownError: Status("UNAVAILABLE", 503),
    UnavailableError: Status("UNAVAILABLE", 503),
    DeadlineError: Status("DEADLINE_EXCEEDED", 504),
    UnauthenticatedError: Status("UNAUTHENTICATED", 401),
    TooLargeError: Status("RESOURCE_EXHAUSTED", 413),
    ConfigError: Status("FAILED_PRECONDITION", 400),  # at run time: a load the repository cannot serve
    ModelError: Status("INTERNAL", 500),
}
INTERNAL = Status("INTERNAL", 500)


def status_of(error: BaseException) -> Status:
    """The wire status for any exception (subclasses map as their nearest listed parent)."""
    for kind in type(error).__mro__:
        if kind in STATUS:
            return STATUS[kind]
    return INTERNAL


def describe(error: BaseException) -> str:
    """The message a client sees: ours verbatim; our own faults logged and summarised."""
    if isinstance(error, PipelineError):
        return str(error)
    LOG.exception("unexpected error while serving", exc_info=error)
    return f"internal error: {type(error).__name__}: {error}"


def status_text(error: BaseException, cancelled: str = "stream closed") -> str:
    """An error answered inside a stream, "STATUS: message" (``INVALID_ARGUMENT: ...``), so a
    client tells a stale frame (DEADLINE_EXCEEDED) from a draining server (UNAVAILABLE) or bad
    input; a cancellation is "CANCELLED: " and ``cancelled``."""
    if isinstance(error, asyncio.CancelledError):
        return f"CANCELLED: {cancelled}"
    return f"{status_of(error).grpc}: {describe(error)}"
