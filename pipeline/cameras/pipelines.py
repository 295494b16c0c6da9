"""Inference pipelines: camera streams whose results wait in the server until their client
reads them. Roboflow's stream API (``frontends.http_pipelines``) is their adapter.

Vocabulary:

- a **pipeline** is one camera stream per source (``CameraStreams.add``: the same streams as
  ``/v1/streams``, listed, limited and stopped with them), named ``<pipeline id>.<source
  index>``, each with a ``MemorySink`` of ``buffer`` results as its own sink (beside none
  other);
- **consume** takes the oldest waiting result of every source at once: a list with one
  message per source (None for a source with none waiting), or an empty list when none waits;
- **consumption timeout**: a pipeline nobody consumes for ``consumption_timeout_s`` ends
  itself (terminated, as by its client); every ``consume`` counts, one that finds nothing too;
- **terminate** removes its streams, whatever their sources are doing: a camera gone, a file
  ended, a stream removed already through ``/v1/streams``. Removing a stream waits on its
  source at most the source's own timeout, so a pipeline can always be terminated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import NotFoundError
from .sinks import MemorySink
from .spec import StreamSpec
from .streams import CameraStream, CameraStreams

LOG = logging.getLogger(__name__)


@dataclass
class Pipeline:
    """One pipeline: its streams and their memory sinks, in source order.

    reader: what the adapter that started it needs to read its results (Roboflow's: the
    workflow); consumption_timeout_s: None, or how long it may go unconsumed before it ends
    itself; consumed: ``time.monotonic()`` of the last ``consume`` (or of its start)."""

    id: str
    streams: list[CameraStream]
    memories: list[MemorySink]
    reader: Any = None
    consumption_timeout_s: float | None = None
    created: float = field(default_factory=time.time)
    consumed: float = field(default_factory=time.monotonic)

    def consume(self) -> list[bytes | None]:
        """The oldest waiting message of every source (None where a source has none), or []
        when none waits."""
        self.consumed = time.monotonic()
        taken = [memory.take() for memory in self.memories]
        return taken if any(message is not None for message in taken) else []

    def pause(self) -> None:
        for stream in self.streams:
            stream.pause()

    def resume(self) -> None:
        for stream in self.streams:
            stream.resume()


class Pipelines:
    """The pipelines a server runs (their streams count against ``--max-ingest-streams``)."""

    def __init__(self, streams: CameraStreams):
        self.streams = streams
        self._pipelines: dict[str, Pipeline] = {}
        self._expiries: dict[str, asyncio.Task] = {}

    async def start(self, specs: Sequence[StreamSpec], *, buffer: int, reader: Any = None,
                    consumption_timeout_s: float | None = None) -> Pipeline:
        """Start one stream per spec, each with a memory sink of ``buffer`` messages. If one
        cannot start, those started are removed and its error raised."""
        pipeline_id = str(uuid.uuid4())
        streams: list[CameraStream] = []
        memories = [MemorySink(f"{pipeline_id}.{i}", buffer) for i in range(len(specs))]
        try:
            for spec, memory in zip(specs, memories):
                streams.append(await self.streams.add(replace(spec, stream_id=memory.stream_id), [memory]))
        except BaseException:
            await asyncio.gather(*(self._remove(stream) for stream in streams))
            raise
        pipeline = self._pipelines[pipeline_id] = Pipeline(pipeline_id, streams, memories, reader,
                                                             consumption_timeout_s)
        if consumption_timeout_s is not None:
            self._expiries[pipeline_id] = asyncio.create_task(self._expire(pipeline), name=f"expire-{pipeline_id}")
        LOG.info("inference pipeline %s: %d streams", pipeline_id, len(streams))
        return pipeline

    def get(self, pipeline_id: str) -> Pipeline:
        try:
            return self._pipelines[pipeline_id]
        except KeyError:
            raise NotFoundError(f"no inference pipeline {pipeline_id!r}") from None

    def all(self) -> list[Pipeline]:
        return list(self._pipelines.values())

    async def terminate(self, pipeline_id: str) -> Pipeline:
        """Forget the pipeline and remove its streams. A second terminate meanwhile is
        NotFoundError at once."""
        pipeline = self._pipelines.pop(pipeline_id, None)
        if pipeline is None:
            raise NotFoundError(f"no inference pipeline {pipeline_id!r}")
        expiry = self._expiries.pop(pipeline_id, None)
        if expiry is not None and expiry is not asyncio.current_task():
            expiry.cancel()
        await asyncio.gather(*(self._remove(stream) for stream in pipeline.streams))
        LOG.info("inference pipeline %s terminated", pipeline_id)
        return pipeline

    async def _remove(self, stream: CameraStream) -> None:
        with contextlib.suppress(NotFoundError):  # removed already, through /v1/streams
            await self.streams.remove(stream.id)

    async def _expire(self, pipeline: Pipeline) -> None:
        """End the pipeline once nobody has consumed it for its consumption timeout."""
        timeout = pipeline.consumption_timeout_s
        while (left := pipeline.consumed + timeout - time.monotonic()) > 0:
            await asyncio.sleep(left)
        LOG.info("inference pipeline %s: not consumed for %g s; terminating it", pipeline.id, timeout)
        with contextlib.suppress(NotFoundError):
            await self.terminate(pipeline.id)

    def close(self) -> None:
        """Stop the consumption timers (the server's streams are closed with the server)."""
        for expiry in self._expiries.values():
            expiry.cancel()
        self._expiries.clear()
