"""The server: loads the repository's pipelines and serves them over gRPC and HTTP.

gRPC on one port: Triton/KServe v2 (``inference.GRPCInferenceService``), the typed video API
(``rleserving.v1.VideoSegmentation``), the standard health service (``grpc.health.v1``, which
Kubernetes' native gRPC probes call) and server reflection. HTTP on a second port (Roboflow's
inference API and KServe v2 REST, ``pipeline.http``), in the same process and event loop, on
the same engine and batcher. Prometheus metrics on a third. SIGTERM drains: health turns
NOT_SERVING, new requests and streams are refused (UNAVAILABLE / 503), work in flight
finishes within the grace period, then the process exits 0.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import signal
import ssl
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tritonclient.grpc import service_pb2, service_pb2_grpc

from . import metrics
from .engine import Pipeline
from .errors import ConfigError, ShuttingDownError
from .http import HTTPFrontend
from .proto import video_pb2, video_pb2_grpc
from .repository import ModelRepository
from .runner import resolve_device
from .service import InferenceService
from .serving import ConnectionLimits, ServingState
from .stream_window import POLICIES
from .streaming import VideoService
from .telemetry import Ledger
from .tracking import Tracks

LOG = logging.getLogger(__name__)
INFERENCE_SERVICE = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
VIDEO_SERVICE = video_pb2.DESCRIPTOR.services_by_name["VideoSegmentation"].full_name
OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")  # probes carry no token


@dataclass(frozen=True)
class ServerConfig:
    """Every setting, from flags or RLE_SERVING_<NAME> environment variables."""

    model_repository: str = "model_repository"
    host: str = "0.0.0.0"
    grpc_port: int = 8001
    metrics_port: int = 8002
    device: str | None = None
    stream_window: int = 8
    stream_policy: str = "wait"
    max_message_mb: int = 64
    grace_period_s: float = 30.0
    tls_cert: str | None = None
    tls_key: str | None = None
    token: str | None = None
    network_threads: int | None = None
    worker_threads: int = 2
    max_streams_per_connection: int = 32
    max_in_flight_per_connection: int = 256
    http_port: int = 8000
    allow_image_urls: bool = False
    max_tracked_streams: int = 256
    tracker_idle_s: float = 60.0

    def __post_init__(self):
        if self.stream_window < 1:
            raise ConfigError(f"stream window must be >= 1, got {self.stream_window}")
        if self.stream_policy not in POLICIES:
            raise ConfigError(f"stream policy must be one of {POLICIES}, got {self.stream_policy!r}")
        if self.device not in (None, "cpu", "cuda"):
            raise ConfigError(f"device must be cpu or cuda, got {self.device!r}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("TLS needs both --tls-cert and --tls-key")
        for path in (self.tls_cert, self.tls_key):
            if path and not Path(path).is_file():
                raise ConfigError(f"TLS file {path} does not exist")
        if self.max_message_mb < 1:
            raise ConfigError("max message size must be >= 1 MB")
        if self.network_threads is not None and self.network_threads < 1:
            raise ConfigError(f"network threads must be >= 1, got {self.network_threads}")
        if self.worker_threads < 1:
            raise ConfigError(f"worker threads must be >= 1, got {self.worker_threads}")
        if self.max_streams_per_connection < 1 or self.max_in_flight_per_connection < 1:
            raise ConfigError("per-connection limits must be >= 1")
        if self.max_tracked_streams < 1 or self.tracker_idle_s <= 0:
            raise ConfigError("max tracked streams must be >= 1 and the tracker idle time > 0")
        if self.http_port < -1:
            raise ConfigError(f"http port must be a port, 0 (any free one) or -1 (off), got {self.http_port}")

    @classmethod
    def env_defaults(cls, environ: Mapping[str, str] = os.environ) -> dict:
        """Settings found in the environment (RLE_SERVING_GRPC_PORT=8001, ...).

        Raises ConfigError naming the variable when a number is not a number."""
        out = {}
        for f in fields(cls):
            variable = f"RLE_SERVING_{f.name.upper()}"
            value = environ.get(variable)
            if value is None or value == "":
                continue
            kind = f.type if isinstance(f.type, str) else f.type.__name__
            convert = {"int": int, "float": float, "bool": _boolean}.get(kind)
            try:
                out[f.name] = convert(value) if convert else value
            except ValueError:
                what = {"int": "a whole number", "bool": "true or false"}.get(kind, "a number")
                raise ConfigError(f"{variable} must be {what}, got {value!r}") from None
        return out


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def apply_thread_budget(cfg: ServerConfig, loop: asyncio.AbstractEventLoop) -> None:
    """One explicit split of the cores: the network's intra-op threads (also the codec's, which
    runs between network calls), and a small pool for decoding, letterboxing and building
    responses (the loop's default executor), so nothing heavy runs on the event loop."""
    import torch

    from . import memory, rle

    memory.tune()
    network = cfg.network_threads or cores()
    torch.set_num_threads(network)
    rle.set_threads(network)
    loop.set_default_executor(ThreadPoolExecutor(cfg.worker_threads, thread_name_prefix="rle-worker"))
    LOG.info("threads: network %d, workers %d (on %d cores)", network, cfg.worker_threads, cores())


class _TokenCheck(grpc.aio.ServerInterceptor):
    """Bearer-token authentication for everything but health checks and reflection."""

    def __init__(self, token: str):
        self.expected = f"Bearer {token}"

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHODS):
            return handler
        metadata = dict(details.invocation_metadata or ())
        given = str(metadata.get("authorization", ""))
        if hmac.compare_digest(given.encode(), self.expected.encode()):  # constant time
            return handler

        async def deny(request_or_iterator, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong bearer token (metadata 'authorization: Bearer <token>')")

        async def deny_stream(request_or_iterator, context):
            await deny(request_or_iterator, context)
            yield  # pragma: no cover - abort raises first

        kinds = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }
        make = kinds[(handler.request_streaming, handler.response_streaming)]
        return make(deny_stream if handler.response_streaming else deny,
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)


class PipelineServer:
    """Start with ``await start()``; stop with ``await drain()``."""

    def __init__(self, config: ServerConfig, ledger: Ledger | None = None):
        self.config = config
        self.ledger = ledger or Ledger()
        self.state: ServingState | None = None
        self.grpc_port: int | None = None
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self._http: HTTPFrontend | None = None
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._stopped = asyncio.Event()

    async def start(self, serve_metrics: bool = True) -> PipelineServer:
        cfg = self.config
        loop = asyncio.get_running_loop()
        pipelines, unavailable = await loop.run_in_executor(None, self._load)
        self.state = ServingState(
            cfg.model_repository, pipelines, unavailable, self.ledger,
            stream_window=cfg.stream_window, stream_policy=cfg.stream_policy,
            limits=ConnectionLimits(cfg.max_streams_per_connection, cfg.max_in_flight_per_connection),
            tracks=Tracks(cfg.max_tracked_streams, cfg.tracker_idle_s))
        limit = cfg.max_message_mb * 1024 * 1024
        options = [("grpc.max_receive_message_length", limit),
                   ("grpc.max_send_message_length", limit),
                   ("grpc.so_reuseport", 0)]
        interceptors = [_TokenCheck(cfg.token)] if cfg.token else []
        server = grpc.aio.server(options=options, interceptors=interceptors)
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(self.state), server)
        video_pb2_grpc.add_VideoSegmentationServicer_to_server(VideoService(self.state), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [INFERENCE_SERVICE, VIDEO_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        address = f"{cfg.host}:{cfg.grpc_port}"
        if cfg.tls_cert:
            credentials = grpc.ssl_server_credentials(
                [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())])
            self.grpc_port = server.add_secure_port(address, credentials)
        else:
            self.grpc_port = server.add_insecure_port(address)
        if not self.grpc_port:
            raise ConfigError(f"cannot listen on {address} (in use?)")
        await server.start()
        self._server = server
        if cfg.http_port >= 0:
            self._http = HTTPFrontend(self.state, max_body_mb=cfg.max_message_mb, token=cfg.token,
                                      allow_image_urls=cfg.allow_image_urls)
            ssl_context = None
            if cfg.tls_cert:
                ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                ssl_context.load_cert_chain(cfg.tls_cert, cfg.tls_key)
            try:
                self.http_port = await self._http.start(cfg.host, cfg.http_port, ssl_context)
            except OSError as exc:
                raise ConfigError(f"cannot listen for HTTP on {cfg.host}:{cfg.http_port} ({exc})") from None
            LOG.info("listening for HTTP on %s:%d%s (Roboflow inference API, KServe v2 REST)",
                     cfg.host, self.http_port, " (TLS)" if cfg.tls_cert else "")
        if serve_metrics:
            self.metrics_port = metrics.serve(self.ledger, cfg.metrics_port, cfg.host)
        for service in ("", INFERENCE_SERVICE, VIDEO_SERVICE):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        LOG.info("listening for gRPC on %s:%d%s; metrics on :%s", cfg.host, self.grpc_port,
                 " (TLS)" if cfg.tls_cert else "", self.metrics_port)
        for name in pipelines:
            LOG.info("model %s is READY", name)
        for name, why in unavailable.items():
            LOG.info("model %s is not served directly: %s", name, why)
        return self

    def _load(self):
        repository = ModelRepository.load(self.config.model_repository)
        pipelines, unavailable = {}, {}
        for name, entry in repository.models.items():
            if entry.platform == "python" and entry.parameter("network"):
                network = repository.get(entry.parameter("network"))
                device = resolve_device(self.config.device, entry)
                pipelines[name] = Pipeline(repository, entry, network, device, self.ledger)
        for name in repository.models:
            if name not in pipelines:
                users = [p for p, pipe in pipelines.items() if pipe.network_entry.name == name]
                unavailable[name] = (f"a network used inside {', '.join(users)}" if users
                                     else "not a pipeline model")
        if not pipelines:
            raise ConfigError(f"{self.config.model_repository}: no pipeline model to serve "
                              "(a Python-backend model with a 'network' parameter)")
        return pipelines, unavailable

    async def drain(self, grace_s: float | None = None) -> None:
        """Refuse new work, let work in flight finish (up to the grace period), stop."""
        grace = self.config.grace_period_s if grace_s is None else grace_s
        if self.state is None or self._server is None:
            return
        self.state.draining = True
        await self._health.enter_graceful_shutdown()  # every service -> NOT_SERVING
        for window in list(self.state.streams):  # answer what they read, then end them
            window.stop(ShuttingDownError("server is shutting down; reconnect to another replica"))
        deadline = time.monotonic() + grace
        while self.state.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.state.active:
            LOG.warning("grace period over with %d requests/streams still open", self.state.active)
        await self._server.stop(max(0.0, deadline - time.monotonic()))
        if self._http is not None:
            await self._http.stop()
        for pipe in self.state.pipelines.values():
            await pipe.close(drain=False)
        self._stopped.set()
        LOG.info("stopped")

    async def wait(self) -> None:
        await self._stopped.wait()


async def serve(config: ServerConfig) -> int:
    """Run until SIGTERM / SIGINT, then drain; returns the exit code."""
    server = PipelineServer(config)
    await server.start()
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    LOG.info("signal received: draining (grace %.0f s)", config.grace_period_s)
    await server.drain()
    return 0
