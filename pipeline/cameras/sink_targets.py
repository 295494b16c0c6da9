"""Sink URLs: where a camera stream's results go, read once (``parse_sink``) into a
``SinkTarget``, then, when the stream is added, checked against the server's address policy
(``checked``); every mistake a BadInputError that says what is wrong.

URL forms (``{stream_id}`` in a topic or key is replaced by the stream's id):

    http(s)://[user:pass@]host[:port]/path[?query]   webhook: POST, Content-Type
        application/json, one message per request; user:pass as HTTP Basic authentication
    mqtt(s)://[user:pass@]host[:1883|:8883][/topic]  MQTT 3.1.1 PUBLISH at QoS 1 (acknowledged);
        no topic: "rle-serving/{stream_id}"; a topic without "{stream_id}" gets
        "/{stream_id}" appended (one topic per stream); "+", "#" and NUL are refused, and so
        is a topic over MAX_TOPIC_BYTES (utf-8, the stream's id in it: MQTT's own limit)
    redis(s)://[user:pass@]host[:6379][/key][?maxlen=N&db=D]   Redis Streams: XADD key MAXLEN ~ N
        (default 10000, at most MAX_MAXLEN) with fields stream_id, frame_index, document;
        default key "rle-serving:{stream_id}"; the path is the key, so the database is ``?db=``
        (0 to MAX_DB)
    kafka(s)://host[:9092][/topic]   Kafka: one record per result, its key the stream's id (so
        a stream's results share a partition, in order), its value the document; default
        topic "rle-serving"; a topic is Kafka's: letters, digits, ".", "_", "-", at most
        MAX_KAFKA_TOPIC characters (the stream's id in it). No user:pass (SASL is not built).

The "s" schemes (https, mqtts, rediss, kafkas) speak TLS (``transports.tls_context``).

A sink's host is looked up once, when its stream is added (``checked``: the server's
``--sink-url-allow`` policy, ``url_policy.sink_addresses``), and its transport connects to those
addresses only (``SinkTarget.addresses``), on every reconnect too: a name whose addresses change
later is not followed, which is the point (no second answer to trust); an operator whose brokers
move lists them by name and re-adds the streams.

Credentials in a URL (``user:pass@``) are used to connect but shown nowhere: ``redact`` takes
them out of the status's URL, every log line and every error (a webhook's query values too,
where tokens often travel).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from urllib.parse import parse_qsl, unquote, urlsplit

from aiohttp.abc import ResolveResult

from ..errors import BadInputError
from ..serving.url_policy import AllowList, legacy_ipv4, sink_addresses

KINDS = {"http": "webhook", "https": "webhook", "mqtt": "mqtt", "mqtts": "mqtt",  # scheme -> kind
         "redis": "redis", "rediss": "redis", "kafka": "kafka", "kafkas": "kafka"}
DEFAULT_PORTS = {"http": 80, "https": 443, "mqtt": 1883, "mqtts": 8883, "redis": 6379, "rediss": 6379,
                 "kafka": 9092, "kafkas": 9092}
TLS_SCHEMES = frozenset({"https", "mqtts", "rediss", "kafkas"})
STREAM_ID = "{stream_id}"
DEFAULT_TOPIC = f"rle-serving/{STREAM_ID}"
DEFAULT_KEY = f"rle-serving:{STREAM_ID}"
DEFAULT_KAFKA_TOPIC = "rle-serving"  # one topic: the record's key says the stream
DEFAULT_MAXLEN = 10_000
REDIS_OPTIONS = ("maxlen", "db")
MAX_TOPIC_BYTES = 65_535  # MQTT's: a topic's length is two bytes on the wire
MAX_KAFKA_TOPIC = 249  # Kafka's own limit on a topic's name
_KAFKA_TOPIC = re.compile(r"[A-Za-z0-9._-]+\Z")  # Kafka's legal characters (and stream ids are made of them)
MAX_DB = 15  # redis-server's default "databases 16"; more is rare, and a typo retried forever
MAX_MAXLEN = 10_000_000  # entries: days of a camera's results, gigabytes; more outgrows a Redis
SHOWN_CHARS = 100  # of a sink's URL that its errors repeat: enough to recognise it


@dataclass(frozen=True)
class SinkTarget:
    """One sink URL, read: where to connect and what to name.

    kind: "webhook", "mqtt", "redis" or "kafka". url: as given, credentials and all (never
    shown: its repr is off); redacted: the same without them, for statuses, logs and errors.
    tls: the scheme is https, mqtts, rediss or kafkas. name: the MQTT or Kafka topic or the
    Redis key, "{stream_id}" still in it ("" for a webhook). maxlen, db: Redis only.
    addresses: where to connect, the host's addresses as ``checked`` found and allowed them
    (empty until then: a transport refuses an unchecked target)."""

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
    addresses: tuple[ResolveResult, ...] = field(default=(), repr=False, compare=False)

    def name_for(self, stream_id: str) -> str:
        """The topic or key for ``stream_id``."""
        return self.name.replace(STREAM_ID, stream_id)


async def checked(target: SinkTarget, stream_id: str, allow: AllowList) -> SinkTarget:
    """``target`` for the stream ``stream_id``, its host looked up once and every address allowed
    by ``allow`` (the server's ``--sink-url-allow``), in ``addresses``. BadInputError naming the
    sink: an MQTT or Kafka topic too long for this stream's id, a host refused or not resolved."""
    shown = _shown(target.redacted)
    if target.kind == "mqtt" and len(target.name_for(stream_id).encode()) > MAX_TOPIC_BYTES:
        raise BadInputError(f"sink {shown}: the MQTT topic is {len(target.name_for(stream_id).encode())} "
                            f"bytes (utf-8, with the stream id in it); MQTT allows at most {MAX_TOPIC_BYTES}")
    if target.kind == "kafka" and len(target.name_for(stream_id)) > MAX_KAFKA_TOPIC:
        raise BadInputError(f"sink {shown}: the Kafka topic is {len(target.name_for(stream_id))} characters "
                            f"(with the stream id in it); Kafka allows at most {MAX_KAFKA_TOPIC}")
    try:
        addresses = await sink_addresses(target.host, target.port, allow)
    except BadInputError as exc:
        raise BadInputError(f"sink {shown}: {exc}") from None
    return replace(target, addresses=tuple(addresses))


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


def _shown(text: str) -> str:
    """``text`` quoted for an error, its first ``SHOWN_CHARS`` at most: a URL of any length
    makes a short message."""
    return repr(text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "...")


def _authority(url: str) -> tuple[str, str, str]:
    """(scheme, userinfo, everything after the "@"); userinfo "" when there is none. For
    mqtt, redis and kafka, where nothing after the host may hold an "@", the last "@" ends the
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
    redacted = redact(url)
    shown = _shown(redacted)
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in KINDS:
        got = f"unknown scheme {_shown(scheme)}" if scheme else "no scheme"
        raise BadInputError(f"sink {shown}: {got}; known: {', '.join(f'{s}://' for s in KINDS)}")
    if any(c.isspace() or not c.isprintable() for c in url):
        raise BadInputError(f"sink {shown}: a URL has no spaces or control characters")
    try:
        parts = urlsplit(url)
    except ValueError:  # "Invalid IPv6 URL"
        raise BadInputError(f"sink {shown}: the host is not a valid name or [IPv6] address") from None
    if KINDS[scheme] in ("mqtt", "redis", "kafka") and "@" in url.partition("://")[2][len(parts.netloc):]:
        raise BadInputError(f"sink {shown}: a user name or password with / ? # or @ in it must be "
                            "percent-encoded (%2F %3F %23 %40)")
    if not parts.hostname:
        raise BadInputError(f"sink {shown}: no host (e.g. {scheme}://broker.example:"
                            f"{DEFAULT_PORTS[scheme]}/...)")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:  # also what urlsplit refused: not a number, or out of range
        raise BadInputError(f"sink {shown}: the port must be a number from 1 to 65535")
    if (address := legacy_ipv4(parts.hostname)) is not None:  # e.g. 2130706433: the resolver's, not a name
        raise BadInputError(f"sink {shown}: the host {parts.hostname!r} is the IPv4 address {address} "
                            "written as a number; write it as the address")
    if "#" in url:  # a fragment is never sent; in an MQTT topic it would be a wildcard
        raise BadInputError(f"sink {shown}: a sink URL has no # (a fragment, or an MQTT wildcard)")
    target = {"kind": KINDS[scheme], "url": url, "redacted": redacted, "host": parts.hostname,
              "port": port or DEFAULT_PORTS[scheme], "tls": scheme in TLS_SCHEMES,
              "username": unquote(parts.username) if parts.username else None,
              "password": unquote(parts.password) if parts.password else None}
    if KINDS[scheme] == "mqtt":
        return SinkTarget(**target, name=_topic(parts.path, parts.query, shown))
    if KINDS[scheme] == "redis":
        return SinkTarget(**target, **_redis(parts.path, parts.query, shown))
    if KINDS[scheme] == "kafka":
        if target["username"] is not None or target["password"] is not None:
            raise BadInputError(f"sink {shown}: a Kafka sink takes no user name or password (SASL is not "
                                "supported); reach the broker on a listener without authentication")
        return SinkTarget(**target, name=_kafka_topic(parts.path, parts.query, shown))
    return SinkTarget(**target)


def _topic(path: str, query: str, shown: str) -> str:
    if query:
        raise BadInputError(f"sink {shown}: an MQTT sink takes no ?options (QoS is 1)")
    try:  # the first "/" separates; a topic may itself start with one
        topic = unquote(path[1:], errors="strict")
    except UnicodeDecodeError:
        raise BadInputError(f"sink {shown}: an MQTT topic is UTF-8 text; its %-escapes are not") from None
    if not topic:
        return DEFAULT_TOPIC
    if "\0" in topic:
        raise BadInputError(f"sink {shown}: an MQTT topic has no NUL character (%00)")
    if any(c in topic for c in "+#"):
        raise BadInputError(f"sink {shown}: an MQTT topic to publish to has no wildcards (+, #)")
    return topic if STREAM_ID in topic else f"{topic.rstrip('/')}/{STREAM_ID}"


def _kafka_topic(path: str, query: str, shown: str) -> str:
    if query:
        raise BadInputError(f"sink {shown}: a Kafka sink takes no ?options")
    topic = unquote(path[1:]) or DEFAULT_KAFKA_TOPIC
    if not _KAFKA_TOPIC.match(topic.replace(STREAM_ID, "x")) or topic.replace(STREAM_ID, "") in (".", ".."):
        raise BadInputError(f"sink {shown}: a Kafka topic is letters, digits, '.', '_' and '-' "
                            f"(and {STREAM_ID}), not '.' or '..'")
    if len(topic.replace(STREAM_ID, "")) > MAX_KAFKA_TOPIC:
        raise BadInputError(f"sink {shown}: a Kafka topic is at most {MAX_KAFKA_TOPIC} characters")
    return topic


def _redis(path: str, query: str, shown: str) -> dict:
    key = unquote(path[1:]) or DEFAULT_KEY
    if key.isdigit():
        raise BadInputError(f"sink {shown}: the path of a Redis sink is the stream key, not a "
                            f"database number; write ?db={key} for a database")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise BadInputError(f"sink {shown}: the query must be name=value pairs joined by &") from None
    options: dict[str, int] = {}
    for name, value in pairs:
        if name not in REDIS_OPTIONS or name in options:
            problem = "repeated" if name in options else "unknown"
            raise BadInputError(f"sink {shown}: {problem} option {_shown(name)}; known: {', '.join(REDIS_OPTIONS)}")
        least, most = (1, MAX_MAXLEN) if name == "maxlen" else (0, MAX_DB)
        # The length first: int() of thousands of digits is refused (ValueError) or slow.
        if not (value.isascii() and value.isdigit() and len(value) <= len(str(most))
                and least <= int(value) <= most):
            raise BadInputError(f"sink {shown}: {name} must be a whole number from {least} to {most}, "
                                f"got {value[:20]!r}")
        options[name] = int(value)
    return {"name": key, **options}

