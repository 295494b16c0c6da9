"""Model control: which models serve, loaded at start and, in Triton's ``explicit`` mode, loaded
and unloaded at run time (Triton's repository extension; gRPC ``RepositoryModelLoad`` /
``RepositoryModelUnload`` and HTTP ``/v2/repository/models/{name}/load|unload``).

- ``none`` (the default): every pipeline model of the repository is loaded at start, and the
  set never changes; load and unload are refused.
- ``explicit``: the ``--load-model`` ones are loaded at start; the rest on request.

Loading reads the model's config.pbtxt and files afresh and builds the new version beside the
serving one, in a worker thread: if it fails, the version that was serving keeps serving and
the caller hears why. If it succeeds, new requests go to the new version at once while the
old one finishes what it had accepted, then is freed. A network is loaded or unloaded with
the pipelines that use it: while a network is unloaded, its pipelines answer UNAVAILABLE
saying so. Unloading frees the memory: the old version's batcher drains, nothing refers to
it any more, and the allocator gives the pages back (``memory.trim``). A model a stream is
using is not unloaded (end the stream first).

A model whose folder cannot be used (``ModelRepository.unusable``: its config.pbtxt, or its
network's) fails only itself, as in Triton: its load is refused with the reason, the index
lists it UNAVAILABLE with the reason, a request for it is told the reason, and every other
model loads and unloads as before. At start we follow Triton's default ``--exit-on-error``
(true): a model the start must serve that cannot be served stops the server (mode none:
every model of the repository; explicit: the ``--load-model`` ones).
"""

from __future__ import annotations

import asyncio
import gc
import logging
from pathlib import Path

from .. import memory
from ..engine import Pipeline
from ..errors import ConfigError, NotFoundError, PipelineError, UnavailableError
from ..repository import MODEL_CONTROL_MODES, ModelRepository, is_pipeline
from ..runners import resolve_device
from ..telemetry import Ledger
from .state import ServingState

LOG = logging.getLogger(__name__)


class ModelControl:
    """Loads and unloads the repository's models into a ServingState; one change at a time."""

    def __init__(self, state: ServingState, root: str | Path, *, mode: str = "none",
                 device: str | None = None, ledger: Ledger | None = None):
        if mode not in MODEL_CONTROL_MODES:
            raise ConfigError(f"model control mode must be one of {MODEL_CONTROL_MODES}, got {mode!r}")
        self.state, self.root, self.mode, self.device = state, Path(root), mode, device
        self.ledger = ledger or state.ledger
        self.stopped: dict[str, str] = {}  # pipeline -> why it stopped serving (or never started)
        self._changing = asyncio.Lock()

    # At start ---------------------------------------------------------------------------

    async def load_at_start(self, names: tuple[str, ...] = ()) -> None:
        """Every pipeline (mode none) or the named models (explicit), built in worker threads
        while the server already answers: a request for one meanwhile is told it is loading.
        They start serving together, once the last is built and warmed, so a server that
        says ready has every model. ConfigError if a model the start needs cannot be served
        (mode none: any model of the repository, all of them named), or (mode none) there is
        no pipeline; a broken model the start does not name (explicit) only stays unloaded."""
        async with self._changing:  # a RepositoryModelLoad meanwhile waits for these
            repository = await asyncio.to_thread(ModelRepository.load, self.root)
            if self.mode == "none":
                # Triton's default (--exit-on-error true) stops a start that cannot load every
                # model: a replica short of a model must not join a fleet and say ready, and
                # mode none offers no load to bring the model in once it is fixed.
                if repository.unusable:
                    raise ConfigError(
                        f"{self.root}: in model control mode none every model must load (as in Triton "
                        "with --exit-on-error); fix or remove these, or serve the others with "
                        "--model-control-mode explicit --load-model NAME: "
                        + "; ".join(str(error) for error in repository.unusable.values()))
                names = tuple(n for n, entry in repository.models.items() if is_pipeline(entry))
                if not names:
                    raise ConfigError(f"{self.root}: no pipeline model to serve "
                                      "(a Python-backend model with a 'network' parameter)")
            pipelines = list(dict.fromkeys(p for name in names for p in self._pipelines_of(repository, name)))
            for pipeline in pipelines:
                self.state.unavailable[pipeline] = UnavailableError(
                    f"model {pipeline!r} is loading (the server is starting); retry shortly")
            built = {}
            for pipeline in pipelines:
                built[pipeline] = await asyncio.to_thread(self._build, repository, pipeline)
            for pipeline, pipe in built.items():
                self.state.pipelines[pipeline] = pipe
                del self.state.unavailable[pipeline]
            self._describe_the_rest(repository)

    # At run time -------------------------------------------------------------------------

    async def load(self, name: str) -> None:
        """(Re)load a pipeline, or a network with the pipelines that use it. On failure the
        serving versions stay; the error says why (and the index, for one not serving)."""
        self._check_mode("load")
        async with self._changing:
            repository = await asyncio.to_thread(ModelRepository.load, self.root)
            try:
                await self._load(repository, name)
            finally:  # the index tells what this reading found, whether or not the load took
                self._describe_the_rest(repository)

    async def unload(self, name: str) -> None:
        """Stop serving a pipeline, or a network and the pipelines that use it, and free them."""
        self._check_mode("unload")
        async with self._changing:
            repository = await asyncio.to_thread(ModelRepository.load, self.root)
            try:
                await self._unload(repository, name)
            finally:
                self._describe_the_rest(repository)

    # Inside ----------------------------------------------------------------------------

    async def _load(self, repository: ModelRepository, name: str) -> None:
        built = {}
        for pipeline in self._pipelines_of(repository, name):  # every new version before any swap
            try:
                built[pipeline] = await asyncio.to_thread(self._build, repository, pipeline)
            except BaseException as error:
                for pipe in built.values():
                    await pipe.close(drain=False)
                if isinstance(error, PipelineError):
                    self.stopped[pipeline] = f"model {pipeline!r} failed to load: {error}"
                raise
        for pipeline, pipe in built.items():
            old = self.state.pipelines.get(pipeline)
            self.state.pipelines[pipeline] = pipe  # new requests: the new version
            self.state.unavailable.pop(pipeline, None)
            self.stopped.pop(pipeline, None)
            if old is not None:
                await self._retire(old)  # the old one finishes what it accepted
            LOG.info("model %s is READY (loaded%s)", pipeline, " again" if old else "")

    async def _unload(self, repository: ModelRepository, name: str) -> None:
        # What serves decides, not the files: a model whose config.pbtxt broke after it
        # loaded still unloads.
        if name in self.state.pipelines:
            pipelines, reason = [name], "model {} is unloaded (load it with RepositoryModelLoad)"
        else:
            pipelines = [p for p, pipe in self.state.pipelines.items() if pipe.network_entry.name == name]
            reason = f"model {{}} cannot run: its network {name!r} is unloaded"
            if not pipelines and name not in repository.unusable:
                repository.get(name)  # NotFoundError if the repository has no such model; else nothing to do
        busy = {p: n for p in pipelines if (n := self.state.ledger.streams_using(p))}
        if busy:
            raise ConfigError("; ".join(f"model {p!r} is in use by {n} open stream(s)"
                                        for p, n in busy.items())
                              + ": end them before unloading")
        for pipeline in pipelines:
            pipe = self.state.pipelines.pop(pipeline)
            self.stopped[pipeline] = reason.format(repr(pipeline))
            await self._retire(pipe)
            LOG.info("model %s is unloaded", pipeline)

    def _check_mode(self, what: str) -> None:
        if self.mode != "explicit":
            raise ConfigError(f"cannot {what} models: model control mode is {self.mode!r} "
                              "(start the server with --model-control-mode explicit)")

    def _pipelines_of(self, repository: ModelRepository, name: str) -> list[str]:
        """The pipelines a load or unload of ``name`` concerns: itself, or a network's users."""
        entry = repository.get(name)  # NotFoundError names what the repository has
        if is_pipeline(entry):
            return [name]
        users = repository.pipelines_running(name)
        if not users:
            raise NotFoundError(f"model {name!r} is neither a pipeline model nor a network one "
                                "of them uses; nothing to load")
        loaded = [u for u in users if u in self.state.pipelines or u in self.state.unavailable]
        return loaded or users

    def _build(self, repository: ModelRepository, name: str) -> Pipeline:
        entry = repository.get(name)
        return Pipeline(repository, entry, repository.network_of(entry), resolve_device(self.device, entry),
                        self.ledger)

    async def _retire(self, pipe: Pipeline) -> None:
        """Let a replaced or unloaded version answer the requests it holds, then free it."""
        while pipe.held:
            await asyncio.sleep(0.01)
        await pipe.close(drain=True)
        del pipe
        await asyncio.to_thread(_free)

    def _describe_the_rest(self, repository: ModelRepository) -> None:
        """What a request for each model of the repository that is not serving is told (and
        the index says): why it cannot be loaded, why it stopped, or that it is not loaded."""
        for gone in [n for n in self.state.unavailable if n not in repository.models and n not in repository.unusable]:
            del self.state.unavailable[gone]  # its folder was removed: an unknown model now
        for name, error in repository.unusable.items():
            if name not in self.state.pipelines:
                self.state.unavailable[name] = UnavailableError(f"model {name!r} cannot be loaded: {error}")
        for name, entry in repository.models.items():
            if name in self.state.pipelines:
                continue
            if is_pipeline(entry):
                self.state.unavailable[name] = UnavailableError(self.stopped.get(
                    name, f"model {name!r} is not loaded (load it with RepositoryModelLoad)"))
                continue
            users = [p for p, pipe in self.state.pipelines.items() if pipe.network_entry.name == name]
            why: PipelineError = NotFoundError(
                f"model {name!r} is not served directly: " +
                (f"a network used inside {', '.join(users)}" if users else "not a pipeline model"))
            self.state.unavailable[name] = why


def _free() -> None:
    gc.collect()
    memory.trim()
