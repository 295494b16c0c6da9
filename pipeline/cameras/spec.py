"""A camera stream as a client asks for it, read once from either transport.

``StreamSpec.read(body, rules)`` reads the one plain form both transports meet in: HTTP's JSON
body of ``POST /v1/streams``, or gRPC's ``StreamSpec`` message turned into the same dict. Every
mistake is a BadInputError naming the field; nothing is started here.

A source is a network URL (``rtsp://``, ``rtsps://``, ``http(s)://`` for HLS playlists and
other streams FFmpeg reads) or a file. The server pulls it itself, so ``SourceRules`` holds
the operator's stance, the same as for images by URL: files only from ``--stream-source-dir``
(a relative path is inside it; an absolute one, after symbolic links are followed, must be);
URLs only with ``--allow-stream-urls``, and then a host with a loopback, private or
link-local address only where ``--stream-url-allow`` names it (``check_host``).

An error repeats at most ``SHOWN_CHARS`` of what the client sent (``_shown``), and never the
server's own paths: a mistake's answer and its log line stay short whatever was sent.
"""

from __future__ import annotations

import errno
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import BadInputError, InvalidOptionError
from ..postprocess import PostprocessOptions
from ..repository import DEFAULT_MODEL
from ..serving.url_policy import AllowList, check_host
from ..tracking import TrackerOptions
from .sink_targets import SinkTarget, parse_sink, redact

NETWORK_SCHEMES = ("rtsp", "rtsps", "http", "https")
MAX_FPS = 120.0  # above any camera's rate: a larger value is a mistake, not a wish
MAX_SINKS = 8
PARAMETERS = ("confidence", "iou_threshold", "max_detections", *TrackerOptions.KEYS)
FIELDS = ("source", "model", "max_fps", "track", "realtime", "sinks", "parameters", "stream_id")
_STREAM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")  # safe in a topic, key and path
# A source is a path (PATH_MAX) or a URL no camera serves longer: a longer one is a mistake,
# and would fill statuses and logs.
MAX_SOURCE_CHARS = 4096
MAX_HOST_CHARS = 253  # a DNS name's limit
MAX_MODEL_CHARS = 255  # a model is a folder of the repository (NAME_MAX)
SHOWN_CHARS = 100  # what an error repeats of a client's value: enough to recognise it


@dataclass(frozen=True)
class SourceRules:
    """Where the server may pull from: ``--stream-source-dir``, ``--allow-stream-urls``,
    ``--stream-url-allow``; and whom a TLS source may be: ``--stream-ca-file``."""

    source_dir: Path | None = None
    allow_urls: bool = False
    url_allow: AllowList = AllowList()
    ca_file: str | None = None

    def locate(self, source: str) -> tuple[str, bool]:
        """What the decoder opens for ``source`` and whether it is a network source."""
        scheme = source.split("://", 1)[0].lower() if "://" in source else ""
        if scheme in NETWORK_SCHEMES:
            if not self.allow_urls:
                raise BadInputError("network sources are off on this server (start it with "
                                    "--allow-stream-urls to pull cameras by URL)")
            try:
                parts = urlsplit(source)
                host, _ = parts.hostname, parts.port  # a bad port raises here, not later
            except ValueError:  # its text may hold the password (netloc '...' contains ...)
                raise BadInputError(f"source {_shown(redact(source))} is not a valid URL (a port that is "
                                    "no number from 0 to 65535, a [ left open, or a character no host "
                                    "may have)") from None
            if not host or len(host) > MAX_HOST_CHARS:
                raise BadInputError(f"source {_shown(redact(source))} names no valid host")
            return source, True
        if scheme and scheme != "file":
            raise BadInputError(f"unknown source scheme {_shown(scheme)}: use rtsp://, rtsps://, "
                                "http(s):// (HLS) or a file path")
        if self.source_dir is None:
            raise BadInputError("file sources are off on this server (start it with "
                                "--stream-source-dir DIR to play files from DIR)")
        root = self.source_dir.resolve()
        path = Path(urlsplit(source).path if scheme else source)
        try:
            resolved = (root / path).resolve()  # an absolute path replaces root
            inside = resolved.is_relative_to(root)
            is_file = inside and resolved.is_file()
        # A NUL byte (ValueError), a name or path too long, a link loop (RuntimeError from
        # Python 3.11's resolve, OSError from later ones): their texts name the server's folder.
        except (ValueError, OSError, RuntimeError) as exc:
            raise BadInputError(f"file source {_shown(source)} is not a usable path "
                                f"({_path_problem(exc)})") from None
        if not inside:
            raise BadInputError(f"file source {_shown(source)} is outside the stream source directory")
        if not is_file:
            raise BadInputError(f"file source {_shown(source)} is not a file in the stream source directory")
        return str(resolved), False

    async def check(self, location: str) -> None:
        """For a network source: every address of its host may be reached (BadInputError)."""
        parts = urlsplit(location)
        await check_host(parts.hostname or "", parts.port, self.url_allow, flag="--stream-url-allow")


@dataclass(frozen=True)
class StreamSpec:
    """One camera stream as asked for.

    source: as given (``display`` redacts it); location: what the decoder opens (a URL, or the
    resolved file path); network: a URL rather than a file. max_fps: frames sampled per second
    (None: every frame). realtime: a file plays at its own rate (dropping frames the model
    cannot take), or, False, as fast as the model and the sinks take them (nothing dropped).
    parameters: post-processing and tracker knobs by their wire names (as StreamFrames'
    ``InferOptions``), as given; read once, here, into ``options`` (the post-processing
    overrides every frame's ``InferRequest`` carries) and ``tracker`` (the tracker's knobs).
    stream_id: the client's name for it, or "" for one made up.
    """

    source: str
    location: str
    network: bool
    model: str = DEFAULT_MODEL
    max_fps: float | None = None
    track: bool = False
    realtime: bool = True
    sinks: tuple[SinkTarget, ...] = ()
    parameters: Mapping[str, Any] = field(default_factory=dict)
    stream_id: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)
    tracker: TrackerOptions = field(default_factory=TrackerOptions)

    @property
    def display(self) -> str:
        return redact(self.source)

    @classmethod
    def read(cls, body: Any, rules: SourceRules) -> StreamSpec:
        if not isinstance(body, Mapping):
            raise BadInputError("a stream is a JSON object: {\"source\": ..., \"model\": ..., ...}")
        unknown = sorted(set(body) - set(FIELDS))
        if unknown:
            raise BadInputError(f"unknown field(s) {_shown(unknown)}; a stream has {', '.join(FIELDS)}")
        source = body.get("source")
        if not isinstance(source, str) or not source.strip():
            raise BadInputError("'source' must be an rtsp://, rtsps://, http(s):// URL or a file path")
        if len(source) > MAX_SOURCE_CHARS:
            raise BadInputError(f"'source' {_shown(redact(source))} is {len(source)} characters long; "
                                f"a source has at most {MAX_SOURCE_CHARS}")
        location, network = rules.locate(source.strip())
        parameters = _parameters(body)
        realtime = _flag(body, "realtime", True)
        if network and "realtime" in body:
            raise BadInputError("'realtime' is for file sources: a network source plays as it comes")
        return cls(source.strip(), location, network, model=_model(body), max_fps=_max_fps(body),
                   track=_flag(body, "track", False), realtime=realtime, sinks=_sinks(body),
                   parameters=parameters, stream_id=_stream_id(body),
                   options=PostprocessOptions.overrides(parameters),
                   tracker=TrackerOptions.from_params(dict(parameters)))


def _model(body: Mapping) -> str:
    model = body.get("model") or DEFAULT_MODEL
    if not isinstance(model, str) or len(model) > MAX_MODEL_CHARS:
        raise BadInputError(f"'model' must be a model's name, got {_shown(model)}")
    return model


def _flag(body: Mapping, key: str, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise BadInputError(f"{key!r} must be true or false, got {_shown(value)}")
    return value


def _max_fps(body: Mapping) -> float | None:
    value = body.get("max_fps")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_FPS:
        # NaN fails the range too
        raise InvalidOptionError("max_fps", f"'max_fps' must be a number in (0, {MAX_FPS:g}], got {_shown(value)}")
    return float(value)


def _sinks(body: Mapping) -> tuple[SinkTarget, ...]:
    sinks = body.get("sinks") or []
    if not isinstance(sinks, list) or not all(isinstance(s, str) for s in sinks):
        raise BadInputError("'sinks' must be a list of URLs (http(s)://, mqtt(s)://, redis(s)://)")
    if len(sinks) > MAX_SINKS:
        raise BadInputError(f"at most {MAX_SINKS} sinks per stream, got {len(sinks)}")
    return tuple(parse_sink(url) for url in sinks)


def _parameters(body: Mapping) -> dict[str, Any]:
    params = body.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise BadInputError("'parameters' must be an object, e.g. {\"confidence\": 0.4}")
    unknown = sorted(set(params) - set(PARAMETERS))
    if unknown:
        raise BadInputError(f"unknown parameter(s) {_shown(unknown)}; known: {', '.join(PARAMETERS)}")
    for key, value in params.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidOptionError(key, f"parameter {key!r} must be a finite number, got {_shown(value)}")
    return dict(params)


def _stream_id(body: Mapping) -> str:
    value = body.get("stream_id") or ""
    if not isinstance(value, str) or (value and not _STREAM_ID.match(value)):
        raise BadInputError(f"'stream_id' must be 1-64 letters, digits, '_', '.' or '-' (starting with "
                            f"a letter or digit), got {_shown(value)}")
    return value


def _shown(value: object) -> str:
    """``repr(value)`` for an error message, cut to ``SHOWN_CHARS`` and "...": the answer to a
    20 MB value, and its log line, stay short."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}..."


def _path_problem(exc: BaseException) -> str:
    """Why a path cannot be used, in words that do not repeat it (an OSError's text names the
    path, the server's folder included)."""
    if isinstance(exc, ValueError):
        return "it holds a NUL byte"
    if isinstance(exc, RuntimeError):  # Python 3.11's resolve says "Symlink loop from <path>"
        return os.strerror(errno.ELOOP)
    return os.strerror(exc.errno) if getattr(exc, "errno", None) else "the system cannot look it up"
