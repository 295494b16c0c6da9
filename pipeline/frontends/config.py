"""The server's settings: flags or ``RLE_SERVING_<NAME>`` environment variables, checked once at
start-up (a setting that cannot work is a ConfigError naming it). Light on purpose: a bad
setting is reported before torch or a model is loaded.

Each field says all there is to say of its setting (help, choices, metavar): the ``serve`` flags
(``add_flags``) and docs/configuration.md (``python -m pipeline.frontends.config PATH``, which
``make docs`` runs) are generated from the fields, never restated."""

from __future__ import annotations

import argparse
import os
import ssl
import sys
from collections.abc import Callable, Mapping
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import TypeVar

from ..errors import ConfigError
from ..repository import MODEL_CONTROL_MODES
from ..serving.stream_window import POLICIES

T = TypeVar("T")
DEVICES = ("cpu", "cuda")
REPEATED = "tuple[str, ...]"  # a field set by a repeated flag, or one comma-separated variable


def setting(default: T, help: str, *, choices: tuple[str, ...] | None = None, metavar: str | None = None,
            default_means: str | None = None) -> T:
    """A field of ServerConfig with what its flag and its line in docs/configuration.md need.
    ``default_means``: what the default does where its value does not say (None: every core)."""
    return field(default=default, metadata={"help": help, "choices": choices, "metavar": metavar,
                                            "default_means": default_means})


@dataclass(frozen=True)
class ServerConfig:
    """Every setting, from flags or RLE_SERVING_<NAME> environment variables."""

    model_repository: str = setting("model_repository", "Triton-layout model repository", metavar="DIR")
    host: str = setting("0.0.0.0", "address to bind")
    grpc_port: int = setting(8001, "gRPC port, as Triton's: KServe v2, the video and camera APIs, "
                             "health, reflection; 0: any free port", metavar="PORT")
    metrics_port: int = setting(8002, "Prometheus /metrics port; 0: any free port", metavar="PORT")
    device: str | None = setting(None, "run the models here, whatever their instance_group says; a GPU "
                                 "asked for and absent is a start-up error", choices=DEVICES,
                                 default_means="from instance_group")
    stream_window: int = setting(8, "frames one stream may have in flight", metavar="FRAMES")
    stream_policy: str = setting("wait", "when a stream sends faster than the model serves: wait (reading "
                                 "stops until a slot frees: backpressure) or drop_oldest (the oldest "
                                 "waiting frames are dropped and reported)", choices=POLICIES)
    max_message_mb: int = setting(64, "largest gRPC message, MB; a bigger one is refused RESOURCE_EXHAUSTED",
                                  metavar="MB")
    grace_period_s: float = setting(30.0, "on SIGTERM, how long in-flight work may finish",
                                    metavar="SECONDS")
    tls_cert: str | None = setting(None, "server certificate, PEM; serves TLS, with --tls-key",
                                   metavar="PEM")
    tls_key: str | None = setting(None, "server private key, PEM", metavar="PEM")
    token: str | None = setting(None, "require the metadata or header 'authorization: Bearer TOKEN' "
                                "(health checks stay open for probes); prefer RLE_SERVING_TOKEN, as "
                                "flags show in the process list")
    network_threads: int | None = setting(None, "threads the network may use, the RLE codec's included", metavar="N",
                                          default_means="every core")
    worker_threads: int = setting(2, "threads decoding images and building responses, off the event loop",
                                  metavar="N")
    max_streams_per_client: int = setting(128, "streams one client (one address, however many "
                                          "connections: a camera gateway's streams share it) may keep "
                                          "open; beyond it a new one is refused RESOURCE_EXHAUSTED", metavar="N")
    max_in_flight_per_client: int = setting(512, "requests one client (one address) may have in flight, "
                                            "streams' included; beyond it a new one is refused RESOURCE_EXHAUSTED",
                                            metavar="N")
    max_bytes_in_flight_mb: int = setting(1024, "the server's budget for the images of all requests in "
                                          "flight, MB; beyond it requests are refused RESOURCE_EXHAUSTED / 503",
                                          metavar="MB")
    http_port: int = setting(8000, "HTTP port, as Triton's: Roboflow's inference API and KServe v2 REST; "
                             "0: any free port; -1: no HTTP", metavar="PORT")
    http_header_timeout_s: float = setting(10.0, "a new HTTP connection without complete request headers "
                                           "by then is closed; with TLS, the handshake counts too",
                                           metavar="SECONDS")
    http_idle_timeout_s: float = setting(30.0, "an idle keep-alive HTTP connection is closed after this",
                                         metavar="SECONDS")
    max_http_connections: int = setting(1000, "HTTP connections open at once, lowered to fit the open-file "
                                        "limit; beyond it a new connection is closed at once", metavar="N")
    no_dashboard: bool = setting(False, "turn off the live page /dashboard on the HTTP port and its "
                                 "endpoints (404); with --token it asks for the token and shows "
                                 "nothing without it")
    metrics_token_required: bool = setting(False, "require the --token bearer token on /metrics too; "
                                           "otherwise it is open, as Prometheus scrapes without one, "
                                           "and served over TLS when TLS is set")
    allow_image_urls: bool = setting(False, "let HTTP requests name images by URL for the server to fetch "
                                     "(server-side fetches are an SSRF risk)")
    image_url_allow: tuple[str, ...] = setting((), "with --allow-image-urls, a network (10.0.0.0/8, "
                                               "127.0.0.1) or host name whose loopback, private or "
                                               "link-local addresses may be fetched all the same; they "
                                               "are refused otherwise", metavar="CIDR_OR_HOST")
    max_tracked_streams: int = setting(256, "tracked streams and sequences alive at once; beyond it a "
                                       "new one is refused RESOURCE_EXHAUSTED", metavar="N")
    max_tracked_streams_per_client: int = setting(64, "tracked streams and sequences one client (one "
                                                  "address) may have alive at once", metavar="N")
    tracker_idle_s: float = setting(60.0, "a tracker unused this long is freed", metavar="SECONDS")
    allow_shared_memory: bool = setting(False, "offer Triton's system shared-memory extension to clients "
                                        "on this host: a frame is read from memory the client names, not "
                                        "sent; a client then names memory on the server's host")
    max_shared_memory_regions: int = setting(64, "shared memory regions registered at once; beyond it a "
                                             "new one is refused RESOURCE_EXHAUSTED", metavar="N")
    shared_memory_key_prefix: str = setting("", "with --allow-shared-memory, the prefix every shared memory "
                                            "key must have (e.g. rle_), so clients can name only objects "
                                            "made for this server", metavar="PREFIX", default_means="any key")
    # Cameras on the server (pipeline/cameras): file sources only from this directory, network
    # sources only when allowed (and private addresses only where listed), as for image URLs.
    stream_source_dir: str | None = setting(None, "cameras on the server: let streams play video files "
                                            "from DIR, where a relative source path points", metavar="DIR")
    allow_stream_urls: bool = setting(False, "cameras on the server: let streams pull rtsp://, rtsps:// and "
                                      "http(s):// (HLS) sources; the server then connects where a client "
                                      "says")
    stream_url_allow: tuple[str, ...] = setting((), "with --allow-stream-urls, a network (192.168.0.0/16) or "
                                                "host whose loopback, private or link-local addresses a "
                                                "stream may pull from; they are refused otherwise, and most "
                                                "cameras sit on private networks: list theirs", metavar="CIDR_OR_HOST")
    stream_ca_file: str | None = setting(None, "CA certificates that rtsps:// and https:// stream sources "
                                         "may chain to besides the system's (a camera's own self-signed "
                                         "certificate may be one); a source's certificate is always verified",
                                         metavar="PEM")
    max_ingest_streams: int = setting(16, "camera streams at once, stopped ones included until removed; "
                                      "beyond it adding one is refused RESOURCE_EXHAUSTED / 429; 0: no "
                                      "camera streams", metavar="N")
    sink_buffer: int = setting(1000, "results each sink holds while its target is away; beyond it the "
                               "oldest are dropped and counted; a file played with realtime false waits "
                               "instead",
                               metavar="N")
    sink_ca_file: str | None = setting(None, "CA certificates that https://, mqtts:// and rediss:// sinks "
                                       "trust besides the system's, for brokers with a private CA",
                                       metavar="PEM")
    sink_url_allow: tuple[str, ...] = setting((), "a network (10.0.0.0/8) or a host name sinks may reach; "
                                              "given, sinks reach what it lists and nothing else (a "
                                              "link-local or cloud metadata address too, if listed). Not "
                                              "given, sinks reach any address but link-local, cloud metadata "
                                              "(169.254.169.254, fd00:ec2::254, metadata.google.internal, "
                                              "...), multicast, reserved or unspecified ones: private and "
                                              "loopback ones included, where brokers live",
                                              metavar="CIDR_OR_HOST",
                                              default_means="all but link-local, metadata, multicast, reserved")
    model_control_mode: str = setting("none", "none: every pipeline model is loaded at start, for good; "
                                      "explicit: the --load-model ones, and the rest loaded and unloaded "
                                      "at run time: Triton's RepositoryModelLoad/Unload, "
                                      "/v2/repository/models/NAME/load", choices=MODEL_CONTROL_MODES)
    load_model: tuple[str, ...] = setting((), "with --model-control-mode explicit: a model to load at start",
                                          metavar="NAME")
    # Spread over a fleet: connections are re-made every max age, so clients re-resolve and
    # new replicas get their share (see _serve_grpc).
    grpc_keepalive_s: float = setting(20.0, "ping a gRPC connection idle this long, drop it if the ping is "
                                      "not answered within as long again; clients may ping every half of "
                                      "it", metavar="SECONDS")
    grpc_max_connection_age_s: float = setting(300.0, "after this (+-10%) a gRPC connection is asked to go "
                                               "(GOAWAY): clients reconnect and re-resolve, so replicas "
                                               "that joined get their share", metavar="SECONDS")
    grpc_max_connection_age_grace_s: float = setting(30.0, "how long calls on a connection past its age may "
                                                     "still run before it is closed; the client library "
                                                     "re-sends a cut stream's unanswered frames",
                                                     metavar="SECONDS")

    def __post_init__(self):
        for f in fields(self):  # a repeated flag's list
            if _kind(f) == REPEATED:
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        if self.stream_window < 1:
            raise ConfigError(f"stream window must be >= 1, got {self.stream_window}")
        if self.stream_policy not in POLICIES:
            raise ConfigError(f"stream policy must be one of {POLICIES}, got {self.stream_policy!r}")
        if self.device not in (None, *DEVICES):
            raise ConfigError(f"device must be {' or '.join(DEVICES)}, got {self.device!r}")
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
        if self.stream_ca_file is not None:
            _check_ca_file("--stream-ca-file", self.stream_ca_file)
        if self.stream_url_allow and not self.allow_stream_urls:
            raise ConfigError("--stream-url-allow needs --allow-stream-urls")
        if self.model_control_mode not in MODEL_CONTROL_MODES:
            raise ConfigError(f"model control mode must be {' or '.join(MODEL_CONTROL_MODES)}, got "
                              f"{self.model_control_mode!r}")
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
        for flag, entries in (("--image-url-allow", self.image_url_allow),
                              ("--stream-url-allow", self.stream_url_allow),
                              ("--sink-url-allow", self.sink_url_allow)):
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
            variable = _variable(f)
            value = environ.get(variable)
            if value is None or value == "":
                continue
            kind = _kind(f)
            try:
                out[f.name] = _FROM_TEXT[kind](value)
            except ValueError:
                what = {"int": "a whole number", "bool": "true or false"}.get(kind, "a number")
                raise ConfigError(f"{variable} must be {what}, got {value!r}") from None
        return out

    @classmethod
    def from_flags(cls, flags: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> ServerConfig:
        """The settings ``add_flags``' flags give, then the environment's, then the defaults."""
        given = {f.name: getattr(flags, f.name) for f in fields(cls) if getattr(flags, f.name) is not None}
        return cls(**{**cls.env_defaults(environ), **given})


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per field. Each flag's default is None, so what is not given on the command line
    comes from the environment, then the field (``ServerConfig.from_flags``)."""
    for f in fields(ServerConfig):
        kind = _kind(f)
        options = {"default": None, "help": _help(f).replace("%", "%%")}  # argparse formats help with %
        if kind == "bool":
            options["action"] = "store_true"
        else:
            options["type"] = {"int": int, "float": float}.get(kind, str)
            options.update({name: f.metadata[name] for name in ("choices", "metavar") if f.metadata[name]})
            if kind == REPEATED:
                options["action"] = "append"
        parser.add_argument(_flag(f), **options)


def reference() -> str:
    """docs/configuration.md: every setting's flag, variable, default and help, in Markdown."""
    lines = [
        "# Server configuration",
        "",
        "`python -m pipeline serve` takes each setting as a flag or as an `RLE_SERVING_<NAME>` "
        "environment variable (a flag wins over its variable); a list is a repeated flag or one "
        "comma-separated variable (`RLE_SERVING_LOAD_MODEL=a,b`), a switch's variable is `true` or "
        "`false`. Every setting is checked at start-up: one that cannot work stops the server with "
        "one line naming it, before a model is loaded.",
        "",
        "Generated from `ServerConfig` (`pipeline/frontends/config.py`) by `make docs`: edit the "
        "fields, not this page.",
        "",
        "| flag | environment variable | default | meaning |",
        "|---|---|---|---|",
    ]
    for f in fields(ServerConfig):
        repeats = "; repeatable" if _kind(f) == REPEATED else ""
        lines.append(f"| `{_usage(f)}` | `{_variable(f)}` | {_default(f, literal=lambda v: f'`{v}`')} | "
                     f"{f.metadata['help']}{repeats} |")
    return "\n".join(lines) + "\n"


def _flag(f: Field) -> str:
    return "--" + f.name.replace("_", "-")


def _usage(f: Field) -> str:
    """The flag as --help writes it: ``--grpc-port PORT``, ``--stream-policy {wait,drop_oldest}``."""
    choices = f.metadata["choices"]
    value = "{" + ",".join(choices) + "}" if choices else f.metadata["metavar"]
    return f"{_flag(f)} {value}" if value else _flag(f)


def _variable(f: Field) -> str:
    return f"RLE_SERVING_{f.name.upper()}"


def _kind(f: Field) -> str:
    """The field's type without its None ('int | None' is an int that may be left unset)."""
    return str(f.type).removesuffix(" | None")


def _default(f: Field, literal: Callable[[str], str] = str) -> str:
    """The default in words: its value (through ``literal``), or what leaving the setting unset does."""
    if f.metadata["default_means"]:
        return f.metadata["default_means"]
    if f.default is False:
        return "off"
    if f.default is None or f.default == ():
        return "none"
    return literal(f"{f.default:g}" if isinstance(f.default, float) else str(f.default))


def _help(f: Field) -> str:
    repeats = "repeatable; " if _kind(f) == REPEATED else ""
    return f"{f.metadata['help']} ({repeats}default {_default(f)})"


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


_FROM_TEXT: dict[str, Callable[[str], object]] = {"str": str, "int": int, "float": float, "bool": _boolean,
                                                   REPEATED: _names}

if __name__ == "__main__":  # make docs: python -m pipeline.frontends.config docs/configuration.md
    Path(sys.argv[1]).write_text(reference())
