"""The server process: loads the repository's pipelines and serves them over gRPC and HTTP.

gRPC on one port: Triton/KServe v2 (``grpc_kserve``), the typed video API (``grpc_video``),
the standard health service (``grpc.health.v1``, which Kubernetes' native gRPC probes call)
and server reflection. HTTP on a second port: Roboflow's inference API (``http_roboflow``) and
KServe v2 REST (``http_kserve``), in the same process and event loop, on the same engine and
batcher. Prometheus metrics on a third. The cores are split once (``apply_thread_budget``)
before anything loads. A server that cannot start undoes what it started and raises
ConfigError. SIGTERM drains: health turns NOT_SERVING, new requests and streams are refused
(UNAVAILABLE / 503), HTTP takes no new connection, work in flight finishes within the grace
period, then whatever is still open is closed, whatever its client does, and the process
exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tritonclient.grpc import service_pb2, service_pb2_grpc

from .. import memory, rle
from ..cameras.pipelines import Pipelines
from ..cameras.spec import SourceRules
from ..cameras.streams import CameraStreams
from ..errors import ConfigError, ShuttingDownError
from ..proto import video_pb2, video_pb2_grpc
from ..runners import cores
from ..serving.control import ModelControl
from ..serving.shared_memory import SharedMemory
from ..serving.state import ClientLimits, ServingState
from ..serving.url_policy import AllowList
from ..telemetry import Ledger
from ..tracking import Tracks
from . import grpc_kserve, http_cameras, http_kserve, http_pipelines, http_roboflow, metrics
from .auth import Token, TokenInterceptor
from .config import ServerConfig
from .dashboard import PAGES, Dashboard
from .grpc_calls import MessageGuard
from .grpc_cameras import CameraService
from .grpc_kserve import InferenceService
from .grpc_video import VideoService
from .http_app import middlewares
from .http_listener import HTTPServer

LOG = logging.getLogger(__name__)
INFERENCE_SERVICE = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
VIDEO_SERVICE = video_pb2.DESCRIPTOR.services_by_name["VideoSegmentation"].full_name
CAMERA_SERVICE = video_pb2.DESCRIPTOR.services_by_name["CameraStreams"].full_name
# The health service name for liveness probes: SERVING from the moment the port opens, models
# loaded or not, draining or not. The readiness ones: the server ("") and its services.
LIVENESS_SERVICE = "liveness"
READINESS_SERVICES = ("", INFERENCE_SERVICE, VIDEO_SERVICE, CAMERA_SERVICE)


@dataclass(frozen=True)
class ThreadBudget:
    """The split ``apply_thread_budget`` made: the network's (and the codec's) threads, the
    workers that decode images and build responses, and whether the allocator's arenas were
    capped (glibc only)."""

    network: int
    workers: int
    arenas_capped: bool


def apply_thread_budget(cfg: ServerConfig, loop: asyncio.AbstractEventLoop) -> ThreadBudget:
    """One explicit split of the cores, before anything loads: the network's intra-op threads
    (also the codec's, which runs between network calls), and a small pool for decoding,
    letterboxing and building responses (the loop's default executor), so nothing heavy runs
    on the event loop. The allocator's arenas are capped first (``memory.tune``), before
    those threads exist."""
    import torch

    budget = ThreadBudget(cfg.network_threads or cores(), cfg.worker_threads, memory.tune())
    torch.set_num_threads(budget.network)
    rle.set_threads(budget.network)
    loop.set_default_executor(ThreadPoolExecutor(budget.workers, thread_name_prefix="rle-worker"))
    LOG.info("threads: network %d, workers %d (on %d cores); malloc arenas capped: %s",
             budget.network, budget.workers, cores(), "yes" if budget.arenas_capped else "no (not glibc)")
    return budget


class PipelineServer:
    """Start with ``await start()``; stop with ``await drain()``."""

    def __init__(self, config: ServerConfig, ledger: Ledger | None = None):
        self.config = config
        self.ledger = ledger or Ledger()
        self.state: ServingState | None = None
        self.models: ModelControl | None = None
        self.cameras: CameraStreams | None = None
        self.threads: ThreadBudget | None = None
        self.grpc_port: int | None = None
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self._http: HTTPServer | None = None
        self._metrics = None
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self.started = time.time()

    async def start(self, serve_metrics: bool = True) -> PipelineServer:
        """Listen, load, then report SERVING; on any failure undo what was started and raise.

        While the models load (minutes, for a large one) the ports answer: health says
        NOT_SERVING for the server and its services, SERVING for ``LIVENESS_SERVICE``; HTTP
        ``/v2/health/live`` 200, ``/v2/health/ready`` 400; KServe ServerLive true,
        ServerReady false. A probe that found the port closed could not tell a loading
        server from a dead one."""
        try:
            await self._start(serve_metrics)
        except BaseException:
            await self._close(grace_s=0)
            raise
        return self

    async def _start(self, serve_metrics: bool) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        self.threads = apply_thread_budget(cfg, loop)
        self.state = ServingState(
            {}, {}, self.ledger, stream_window=cfg.stream_window, stream_policy=cfg.stream_policy,
            limits=ClientLimits(cfg.max_streams_per_client, cfg.max_in_flight_per_client,
                                cfg.max_bytes_in_flight_mb * 2**20),
            tracks=Tracks(cfg.max_tracked_streams, cfg.tracker_idle_s,
                          cfg.max_tracked_streams_per_client),
            shared_memory=SharedMemory(cfg.allow_shared_memory, cfg.max_shared_memory_regions,
                                       cfg.shared_memory_key_prefix))
        self.models = ModelControl(self.state, cfg.model_repository, mode=cfg.model_control_mode,
                                   device=cfg.device, ledger=self.ledger)
        rules = SourceRules(Path(cfg.stream_source_dir) if cfg.stream_source_dir else None,
                            cfg.allow_stream_urls, AllowList.parse(cfg.stream_url_allow), cfg.stream_ca_file)
        self.cameras = CameraStreams(self.state, rules, max_streams=cfg.max_ingest_streams,
                                     sink_buffer=cfg.sink_buffer, sink_ca_file=cfg.sink_ca_file,
                                     sink_allow=AllowList.parse(cfg.sink_url_allow))
        for service in READINESS_SERVICES:  # "" is SERVING by default
            await self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        token = Token(cfg.token) if cfg.token else None
        await self._serve_grpc(token)
        if cfg.http_port >= 0:
            await self._serve_http(token)
        if serve_metrics:
            self._metrics, self.metrics_port = metrics.serve(
                self.ledger, cfg.metrics_port, cfg.host,
                tls=(cfg.tls_cert, cfg.tls_key) if cfg.tls_cert else None,
                token=token if cfg.metrics_token_required else None)
        LOG.info("listening for gRPC on %s:%d%s; metrics on :%s; loading the models",
                 cfg.host, self.grpc_port, " (TLS)" if cfg.tls_cert else "", self.metrics_port)
        await self.models.load_at_start(cfg.load_model)
        for service in READINESS_SERVICES:
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        for name in self.state.pipelines:
            LOG.info("model %s is READY", name)
        for name, why in self.state.unavailable.items():
            LOG.info("model %s is not served: %s", name, why)

    async def _serve_grpc(self, token: Token | None) -> None:
        cfg = self.config
        limit = cfg.max_message_mb * 1024 * 1024

        def ms(seconds: float) -> int:  # gRPC takes a C int: a longer time means "never"
            return min(round(seconds * 1000), 2**31 - 1)

        keepalive_ms = ms(cfg.grpc_keepalive_s)
        options = [("grpc.max_receive_message_length", limit),
                   ("grpc.max_send_message_length", limit),
                   ("grpc.so_reuseport", 0),
                   # A peer that stops answering pings is dropped (its streams and limits freed);
                   # gRPC arms its ping_timeout (default 60 s), not keepalive_timeout, so set both.
                   ("grpc.keepalive_time_ms", keepalive_ms),
                   ("grpc.keepalive_timeout_ms", keepalive_ms),
                   ("grpc.http2.ping_timeout_ms", keepalive_ms),
                   ("grpc.keepalive_permit_without_calls", 1),
                   # Clients may ping as often as every keepalive/2 (timer jitter) even when idle:
                   # gRPC's default refuses pings under 5 min apart with GOAWAY too_many_pings.
                   ("grpc.http2.min_ping_interval_without_data_ms", keepalive_ms // 2),
                   # GOAWAY after the (jittered) age: clients reconnect and re-resolve, so load
                   # spreads onto replicas that joined; streams still open after the grace are
                   # cut UNAVAILABLE and the client library re-sends their unanswered frames.
                   ("grpc.max_connection_age_ms", ms(cfg.grpc_max_connection_age_s)),
                   ("grpc.max_connection_age_grace_ms", ms(cfg.grpc_max_connection_age_grace_s))]
        server = grpc.aio.server(options=options,
                                 interceptors=[*([TokenInterceptor(token)] if token else []),
                                               MessageGuard(grpc_kserve.READERS)])
        self._server = server
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceService(self.state, self.models), server)
        video_pb2_grpc.add_VideoSegmentationServicer_to_server(VideoService(self.state), server)
        video_pb2_grpc.add_CameraStreamsServicer_to_server(CameraService(self.cameras), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [INFERENCE_SERVICE, VIDEO_SERVICE, CAMERA_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME],
            server)
        address = f"{cfg.host}:{cfg.grpc_port}"
        try:
            if cfg.tls_cert:
                credentials = grpc.ssl_server_credentials(
                    [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())])
                self.grpc_port = server.add_secure_port(address, credentials)
            else:
                self.grpc_port = server.add_insecure_port(address)
        except RuntimeError:  # grpc raises where it cannot bind
            self.grpc_port = 0
        if not self.grpc_port:
            raise ConfigError(f"cannot listen for gRPC on {address} (in use?)")
        await server.start()

    async def _serve_http(self, token: Token | None) -> None:
        """Roboflow's API on the root app (its paths share no prefix), KServe v2 REST at /v2."""
        cfg = self.config
        max_body = cfg.max_message_mb * 1024 * 1024
        page = None if cfg.no_dashboard else Dashboard(self.state, self.cameras, threads=self.threads,
                                                       started=self.started)
        app = web.Application(client_max_size=max_body,
                              middlewares=middlewares(self.state, max_body=max_body, token=token,
                                                      open_pages=PAGES if page else frozenset()))
        app.add_subapp("/v1/streams", http_cameras.app(self.cameras))  # before Roboflow's catch-all
        app.add_subapp(http_pipelines.PREFIX, http_pipelines.app(Pipelines(self.cameras), self.state, token))
        if page is not None:
            page.add_routes(app)
        http_roboflow.add_routes(app, self.state, token=token, max_body=max_body,
                                 allow_image_urls=cfg.allow_image_urls,
                                 image_url_allow=cfg.image_url_allow)
        app.add_subapp("/v2", http_kserve.app(self.state, self.models))
        ssl_context = None
        if cfg.tls_cert:
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(cfg.tls_cert, cfg.tls_key)
        self._http = HTTPServer(app, header_timeout_s=cfg.http_header_timeout_s,
                                idle_timeout_s=cfg.http_idle_timeout_s,
                                max_connections=cfg.max_http_connections)
        try:
            self.http_port = await self._http.start(cfg.host, cfg.http_port, ssl_context)
        except OSError as exc:
            raise ConfigError(f"cannot listen for HTTP on {cfg.host}:{cfg.http_port} ({exc})") from None
        LOG.info("listening for HTTP on %s:%d%s (Roboflow inference API, KServe v2 REST)",
                 cfg.host, self.http_port, " (TLS)" if cfg.tls_cert else "")

    async def drain(self, grace_s: float | None = None) -> None:
        """Refuse new work, let work in flight finish (up to the grace period), stop."""
        grace = self.config.grace_period_s if grace_s is None else grace_s
        if self.state is None or self._server is None:
            return
        if self.cameras is not None:  # before draining: no camera frame is started only to be refused
            self.cameras.stop_reading()
        self.state.draining = True
        if self._http is not None:  # open connections stay: each request on them is answered
            self._http.stop_accepting()
        for service in READINESS_SERVICES:  # liveness stays SERVING: the pod is not hung
            await self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        for window in list(self.state.streams):  # answer what they read, then end them
            window.stop(ShuttingDownError("server is shutting down; reconnect to another replica"))
        deadline = time.monotonic() + grace
        if self.cameras is not None:  # sources stopped, frames read answered, sinks flushed
            await self.cameras.close(deadline)
        while self.state.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.state.active:
            LOG.warning("grace period over with %d requests/streams still open", self.state.active)
        await self._close(max(0.0, deadline - time.monotonic()))
        LOG.info("stopped")

    async def _close(self, grace_s: float) -> None:
        """Stop whatever was started: cameras, gRPC and HTTP (both within ``grace_s``, then
        cut, whatever their clients do), metrics, the batchers."""
        deadline = time.monotonic() + grace_s
        if self.cameras is not None:
            await self.cameras.close(time.monotonic())
        if self._server is not None:
            await self._server.stop(grace_s)
        if self._http is not None:
            await self._http.stop(deadline)
        if self._metrics is not None:  # its loop notices within half a second: do not wait
            metrics_server = self._metrics

            def stop_metrics():
                metrics_server.shutdown()
                metrics_server.server_close()

            threading.Thread(target=stop_metrics, name="metrics-stop", daemon=True).start()
        for pipe in (self.state.pipelines.values() if self.state is not None else ()):
            await pipe.close(drain=False)


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
