"""Sink URLs: where a camera stream's results go, read once (``parse_sink``) into a
``SinkTarget``; every mistake a BadInputError that says what is wrong and which schemes are
known.

URL forms (``{stream_id}`` in a topic or key is replaced by the stream's id):

    http(s)://[user:pass@]host[:port]/path[?query]   webhook: POST, Content-Type
        application/json, one message per request; user:pass as HTTP Basic authentication
    mqtt(s)://[user:pass@]host[:1883|:8883][/topic]  MQTT 3.1.1 PUBLISH at QoS 1 (acknowledged);
        no topic: "rle-serving/{stream_id}"; a topic without "{stream_id}" gets
        "/{stream_id}" appended (one topic per stream); "+" and "#" are refused
    redis(s)://[user:pass@]host[:6379][/key][?maxlen=N&db=D]   Redis Streams: XADD key MAXLEN ~ N
        (default 10000) with fields stream_id, frame_index, document; default key
        "rle-serving:{stream_id}"; the path is the key, so the database is ``?db=``

The "s" schemes (https, mqtts, rediss) speak TLS (``transports.tls_context``).

Credentials in a URL (``user:pass@``) are used to connect but shown nowhere: ``redact`` takes
them out of the status's URL, every log line and every error (a webhook's query values too,
where tokens often travel); ``SinkTarget.scrub`` takes them out of any text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlsplit

from ..errors import BadInputError

KINDS = {"http": "webhook", "https": "webhook", "mqtt": "mqtt", "mqtts": "mqtt",  # scheme -> kind
         "redis": "redis", "rediss": "redis"}
DEFAULT_PORTS = {"http": 80, "https": 443, "mqtt": 1883, "mqtts": 8883, "redis": 6379, "rediss": 6379}
TLS_SCHEMES = frozenset({"https", "mqtts", "rediss"})
STREAM_ID = "{stream_id}"
DEFAULT_TOPIC = f"rle-serving/{STREAM_ID}"
DEFAULT_KEY = f"rle-serving:{STREAM_ID}"
DEFAULT_MAXLEN = 10_000
REDIS_OPTIONS = ("maxlen", "db")


@dataclass(frozen=True)
class SinkTarget:
    """One sink URL, read: where to connect and what to name.

    kind: "webhook", "mqtt" or "redis". url: as given, credentials and all (never shown: its
    repr is off); redacted: the same without them, for statuses, logs and errors. tls: the
    scheme is https, mqtts or rediss. name: the MQTT topic or Redis key, "{stream_id}" still
    in it ("" for a webhook). maxlen, db: Redis only."""

    kind: str
    url: str = field(repr=False)
    redacted: str
    host: str
    port: int
    tls: bool = False
    username: str | None = field(default=None, repr=False)  # a lone "token@" is a secret too
    password: str | None = field(default=None, repr=False)
    name: str = ""
    maxlen: int = DEFAULT_MAXLEN
    db: int = 0

    def name_for(self, stream_id: str) -> str:
        """The topic or key for ``stream_id``."""
        return self.name.replace(STREAM_ID, stream_id)

    def scrub(self, text: str) -> str:
        """``text`` (an error's) with this URL's secrets taken out: the URL as given or without
        its userinfo becomes the redacted one; a password (or a lone token) anywhere, raw or
        percent-decoded, becomes "***"."""
        scheme, userinfo, rest = _authority(self.url)
        text = text.replace(self.url, self.redacted).replace(f"{scheme}://{rest}", self.redacted)
        secret = userinfo.partition(":")[2] if ":" in userinfo else userinfo
        for each in (secret, unquote(secret)):
            if each:
                text = text.replace(each, "***")
        return text


def redact(url: str) -> str:
    """``url`` without credentials: "user:pass@" becomes "user:***@", a lone "token@" becomes
    "***@", and every query value but a Redis URL's becomes "***". Works on text that is not a
    valid URL too (error messages quote what was given)."""
    scheme, userinfo, rest = _authority(url)
    if userinfo:
        user, colon, _ = userinfo.partition(":")
        url = f"{scheme}://{user}:***@{rest}" if colon else f"{scheme}://***@{rest}"
    if "?" in url and KINDS.get(scheme.lower()) != "redis":  # redis' query is ours (maxlen, db); others carry tokens
        head, _, query = url.partition("?")
        query = query.partition("#")[0]
        url = head + "?" + "&".join(f"{pair.partition('=')[0]}=***" for pair in query.split("&"))
    return url


def _authority(url: str) -> tuple[str, str, str]:
    """(scheme, userinfo, everything after the "@"); userinfo "" when there is none. For
    mqtt and redis, where nothing after the host may hold an "@", the last "@" ends the
    userinfo, so a password with an unescaped "/" is still found whole."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "", "", url
    end = len(rest)
    if KINDS.get(scheme.lower()) == "webhook":
        end = min((i for i in map(rest.find, "/?#") if i >= 0), default=end)
    at = rest.rfind("@", 0, end)
    if at < 0:
        return scheme, "", rest
    return scheme, rest[:at], rest[at + 1:]


def parse_sink(url: object) -> SinkTarget:
    """``url`` read as a sink target; BadInputError naming what is wrong (see the module's URL
    forms)."""
    if not isinstance(url, str):
        raise BadInputError(f"a sink is a URL such as mqtt://broker:1883/cameras, got {type(url).__name__}")
    if not url.strip():
        raise BadInputError("a sink is a URL such as mqtt://broker:1883/cameras, got an empty one")
    shown = redact(url)
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in KINDS:
        got = f"unknown scheme {scheme!r}" if scheme else "no scheme"
        raise BadInputError(f"sink {shown!r}: {got}; known: {', '.join(f'{s}://' for s in KINDS)} "
                            "(Kafka is not supported)")
    if any(c.isspace() or not c.isprintable() for c in url):
        raise BadInputError(f"sink {shown!r}: a URL has no spaces or control characters")
    try:
        parts = urlsplit(url)
    except ValueError:  # "Invalid IPv6 URL"
        raise BadInputError(f"sink {shown!r}: the host is not a valid name or [IPv6] address") from None
    if KINDS[scheme] in ("mqtt", "redis") and "@" in url.partition("://")[2][len(parts.netloc):]:
        raise BadInputError(f"sink {shown!r}: a user name or password with / ? # or @ in it must be "
                            "percent-encoded (%2F %3F %23 %40)")
    if not parts.hostname:
        raise BadInputError(f"sink {shown!r}: no host (e.g. {scheme}://broker.example:"
                            f"{DEFAULT_PORTS[scheme]}/...)")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:  # also what urlsplit refused: not a number, or out of range
        raise BadInputError(f"sink {shown!r}: the port must be a number from 1 to 65535")
    if "#" in url:  # a fragment is never sent; in an MQTT topic it would be a wildcard
        raise BadInputError(f"sink {shown!r}: a sink URL has no # (a fragment, or an MQTT wildcard)")
    target = {"kind": KINDS[scheme], "url": url, "redacted": shown, "host": parts.hostname,
              "port": port or DEFAULT_PORTS[scheme], "tls": scheme in TLS_SCHEMES,
              "username": unquote(parts.username) if parts.username else None,
              "password": unquote(parts.password) if parts.password else None}
    if KINDS[scheme] == "mqtt":
        return SinkTarget(**target, name=_topic(parts.path, parts.query, shown))
    if KINDS[scheme] == "redis":
        return SinkTarget(**target, **_redis(parts.path, parts.query, shown))
    return SinkTarget(**target)


def _topic(path: str, query: str, shown: str) -> str:
    if query:
        raise BadInputError(f"sink {shown!r}: an MQTT sink takes no ?options (QoS is 1)")
    topic = unquote(path[1:])  # the first "/" separates; a topic may itself start with one
    if not topic:
        return DEFAULT_TOPIC
    if any(c in topic for c in "+#\0"):
        raise BadInputError(f"sink {shown!r}: an MQTT topic to publish to has no wildcards (+, #)")
    return topic if STREAM_ID in topic else f"{topic.rstrip('/')}/{STREAM_ID}"


def _redis(path: str, query: str, shown: str) -> dict:
    key = unquote(path[1:]) or DEFAULT_KEY
    if key.isdigit():
        raise BadInputError(f"sink {shown!r}: the path of a Redis sink is the stream key, not a "
                            f"database number; write ?db={key} for a database")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise BadInputError(f"sink {shown!r}: the query must be name=value pairs joined by &") from None
    options: dict[str, int] = {}
    for name, value in pairs:
        if name not in REDIS_OPTIONS or name in options:
            problem = "repeated" if name in options else "unknown"
            raise BadInputError(f"sink {shown!r}: {problem} option {name!r}; known: {', '.join(REDIS_OPTIONS)}")
        least = 1 if name == "maxlen" else 0
        if not (value.isascii() and value.isdigit()) or int(value) < least:
            raise BadInputError(f"sink {shown!r}: {name} must be a whole number from {least}, got {value!r}")
        options[name] = int(value)
    return {"name": key, **options}

