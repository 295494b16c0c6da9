"""The server's settings: flags or ``RLE_SERVING_<NAME>`` environment variables, checked once at
start-up (a setting that cannot work is a ConfigError naming it). Light on purpose: a bad
setting is reported before torch or a model is loaded."""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from ..errors import ConfigError
from ..serving.stream_window import POLICIES


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
    max_streams_per_client: int = 128  # a camera gateway's streams come from one address
    max_in_flight_per_client: int = 512
    max_bytes_in_flight_mb: int = 1024
    http_port: int = 8000
    http_header_timeout_s: float = 10.0
    http_idle_timeout_s: float = 30.0
    max_http_connections: int = 1000
    metrics_token_required: bool = False
    allow_image_urls: bool = False
    image_url_allow: tuple[str, ...] = ()
    max_tracked_streams: int = 256
    max_tracked_streams_per_client: int = 64
    tracker_idle_s: float = 60.0
    allow_shared_memory: bool = False
    max_shared_memory_regions: int = 64
    shared_memory_key_prefix: str = ""
    # Cameras on the server (pipeline/cameras): file sources only from this directory, network
    # sources only when allowed (and private addresses only where listed), as for image URLs.
    stream_source_dir: str | None = None
    allow_stream_urls: bool = False
    stream_url_allow: tuple[str, ...] = ()
    max_ingest_streams: int = 16
    sink_buffer: int = 1000
    sink_ca_file: str | None = None
    model_control_mode: str = "none"
    load_model: tuple[str, ...] = ()
    # Spread over a fleet: connections are re-made every max age, so clients re-resolve and
    # new replicas get their share (see _serve_grpc).
    grpc_keepalive_s: float = 20.0
    grpc_max_connection_age_s: float = 300.0
    grpc_max_connection_age_grace_s: float = 30.0

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
        if self.max_streams_per_client < 1 or self.max_in_flight_per_client < 1:
            raise ConfigError("per-client limits must be >= 1")
        if self.max_bytes_in_flight_mb < self.max_message_mb:
            raise ConfigError(f"max bytes in flight ({self.max_bytes_in_flight_mb} MB) must hold at least "
                              f"one largest message ({self.max_message_mb} MB)")
        if self.max_tracked_streams < 1 or self.max_tracked_streams_per_client < 1 or self.tracker_idle_s <= 0:
            raise ConfigError("max tracked streams (in all and per client) must be >= 1 and the "
                              "tracker idle time > 0")
        if self.max_shared_memory_regions < 1:
            raise ConfigError(f"max shared memory regions must be >= 1, got {self.max_shared_memory_regions}")
        if self.shared_memory_key_prefix and not self.allow_shared_memory:
            raise ConfigError("--shared-memory-key-prefix needs --allow-shared-memory")
        if self.stream_source_dir is not None and not Path(self.stream_source_dir).is_dir():
            raise ConfigError(f"--stream-source-dir {self.stream_source_dir} is not a directory")
        if self.max_ingest_streams < 0 or self.sink_buffer < 1:
            raise ConfigError("--max-ingest-streams must be >= 0 (0: no camera streams) and "
                              "--sink-buffer >= 1")
        if self.sink_ca_file is not None:
            _check_ca_file("--sink-ca-file", self.sink_ca_file)
        object.__setattr__(self, "stream_url_allow", tuple(self.stream_url_allow))
        if self.stream_url_allow and not self.allow_stream_urls:
            raise ConfigError("--stream-url-allow needs --allow-stream-urls")
        if self.model_control_mode not in ("none", "explicit"):
            raise ConfigError(f"model control mode must be none or explicit, got {self.model_control_mode!r}")
        if self.load_model and self.model_control_mode != "explicit":
            raise ConfigError("--load-model needs --model-control-mode explicit (in mode none every "
                              "pipeline model is loaded)")
        if self.http_port < -1:
            raise ConfigError(f"http port must be a port, 0 (any free one) or -1 (off), got {self.http_port}")
        if not (self.http_header_timeout_s > 0 and self.http_idle_timeout_s > 0):  # NaN fails too
            raise ConfigError("--http-header-timeout-s and --http-idle-timeout-s must be > 0 seconds")
        for flag, seconds in (("--grpc-keepalive-s", self.grpc_keepalive_s),
                              ("--grpc-max-connection-age-s", self.grpc_max_connection_age_s)):
            if not seconds >= 0.001:  # NaN fails too; gRPC counts whole milliseconds
                raise ConfigError(f"{flag} must be at least 0.001 seconds, got {seconds}")
        if not self.grpc_max_connection_age_grace_s >= 0:
            raise ConfigError("--grpc-max-connection-age-grace-s must be >= 0 seconds, got "
                              f"{self.grpc_max_connection_age_grace_s}")
        if self.max_http_connections < 1:
            raise ConfigError(f"max HTTP connections must be >= 1, got {self.max_http_connections}")
        if self.metrics_token_required and not self.token:
            raise ConfigError("--metrics-token-required needs --token (the token /metrics asks for)")
        object.__setattr__(self, "image_url_allow", tuple(self.image_url_allow))  # the flag's list
        for flag, entries in (("--image-url-allow", self.image_url_allow),
                              ("--stream-url-allow", self.stream_url_allow)):
            if entries:
                from ..serving.url_policy import AllowList

                try:
                    AllowList.parse(entries)
                except ValueError as exc:
                    raise ConfigError(f"{flag}: {exc}") from None

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
            convert = {"int": int, "float": float, "bool": _boolean, "tuple[str, ...]": _names}.get(kind)
            try:
                out[f.name] = convert(value) if convert else value
            except ValueError:
                what = {"int": "a whole number", "bool": "true or false"}.get(kind, "a number")
                raise ConfigError(f"{variable} must be {what}, got {value!r}") from None
        return out


def _check_ca_file(flag: str, path: str) -> None:
    """Load ``path`` as PEM CA certificates now, so a bad file stops the start, not a sink's
    first connection."""
    try:
        ssl.create_default_context(cafile=path)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ConfigError(f"{flag} {path}: not a file of PEM CA certificates ({exc})") from None


def _names(text: str) -> tuple[str, ...]:
    """A list in one variable: comma-separated (RLE_SERVING_LOAD_MODEL=a,b)."""
    return tuple(n.strip() for n in text.split(",") if n.strip())


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)
