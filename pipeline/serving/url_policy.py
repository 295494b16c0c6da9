"""Fetching an image named by URL (the HTTP frontends, opt-in: ``--allow-image-urls``).

A fetch made by the server reaches whatever the server can reach (SSRF), so: http(s) only, any
port; the host is resolved once and refused when ANY of its addresses is not public (loopback,
private, link-local, multicast, reserved, unspecified, or one of those inside an IPv4-mapped,
6to4 or NAT64 address) unless ``--image-url-allow`` names the host or a network holding the
address; the connection goes to exactly the addresses checked (no second lookup that a
DNS-rebinding answer could change); at most ``MAX_REDIRECTS`` redirects, each checked the same
way; the body is bounded in bytes and the whole fetch in time (``TIMEOUT_S``).

Every failure is a BadInputError with generic text: the upstream's status, body or error never
reach the client (they would make a port-scan oracle). The operator gets one log line saying why.

Sinks (webhooks, MQTT, Redis: ``sink_addresses``) connect where a client says too, but their
brokers live on private networks, so private and loopback addresses stay open to them: what is
refused is link-local, cloud metadata (``CLOUD_METADATA``), multicast, reserved and unspecified
addresses, unless ``--sink-url-allow`` lists them; given at all, that list is the only place sinks
may go (``AllowList.sink_refusal``). The same one lookup, and the same pinning (``pinned_connector``
for aiohttp; the MQTT and Redis transports connect to the checked address themselves).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from ..errors import BadInputError, OverloadedError

log = logging.getLogger(__name__)

TIMEOUT_S = 10.0  # the whole fetch: every lookup, connection, redirect and the body
MAX_REDIRECTS = 3
# Fetches at once; beyond, OverloadedError. Lookups run on threads of their own: a name
# server that never answers holds those, not the workers that decode and build responses
# (a timed-out lookup's thread stays busy until the resolver gives up).
MAX_FETCHES = 8
_LOOKUPS = ThreadPoolExecutor(4, thread_name_prefix="image-url-lookup")
_fetching = 0  # fetches in progress (the event loop's only)
NOT_HTTP = "the image URL must be an http:// or https:// URL"
NOT_ALLOWED = ("the image URL's host is not allowed (private, loopback or link-local address); "
               "see --image-url-allow")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # a gateway maps these onto the IPv4 in the low bits
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)\Z")  # "_": container service names have them
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")  # Linux connects 0.0.0.0 to the host itself
# Cloud metadata services, one request away from the host's credentials: refused to sinks
# unless --sink-url-allow names them. Most addresses are link-local anyway; two are not, and
# naming them all makes the operator's log say what was asked for.
CLOUD_METADATA = ("169.254.169.254",  # AWS, GCP, Azure, Oracle, DigitalOcean, OpenStack
                  "169.254.170.2",  # AWS ECS task credentials
                  "fd00:ec2::254",  # AWS over IPv6 (a private address otherwise)
                  "100.100.100.200",  # Alibaba Cloud (carrier-grade NAT space otherwise)
                  "metadata.google.internal", "metadata.goog", "metadata",  # GCP's names
                  "instance-data.ec2.internal", "instance-data")  # AWS's
_METADATA_NAMES = frozenset(e for e in CLOUD_METADATA if not e[-1].isdigit() and ":" not in e)
_METADATA_ADDRESSES = frozenset(ipaddress.ip_address(e) for e in set(CLOUD_METADATA) - _METADATA_NAMES)
SINK_NOT_ALLOWED = ("its host is not allowed (link-local, cloud metadata, multicast, reserved or "
                    "unspecified address); see --sink-url-allow")
SINK_NOT_LISTED = "its host is not in --sink-url-allow, the only hosts sinks may reach on this server"


def not_fetched(max_body: int) -> str:
    """The one text for every failure past the address check (nothing of the upstream in it)."""
    return (f"the image URL could not be fetched (unreachable, not answered 200, more than "
            f"{MAX_REDIRECTS} redirects, or over {max_body} bytes)")


def not_public(address: Address) -> str | None:
    """Why ``address`` is not a public one ("loopback", "private", ...); None when it is."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # the IPv4 address is the one reached
            return not_public(address.ipv4_mapped)
        embedded = address.sixtofour or (
            ipaddress.IPv4Address(int(address) & 0xFFFFFFFF) if address in _NAT64 else None)
        if embedded is not None and not_public(embedded):
            return f"{not_public(embedded)} (embedded {embedded})"
    # Narrowest first, for the log: 169.254.169.254 is "private" too, but "link-local" says more.
    for kind in ("unspecified", "loopback", "link_local", "site_local", "multicast", "private", "reserved"):
        if getattr(address, f"is_{kind}", False):  # site-local: IPv6's deprecated fec0::/10
            return kind.replace("_", "-")
    if not address.is_global:  # e.g. 100.64.0.0/10, carrier-grade NAT
        return "not global"
    return None


def unsafe_for_sinks(address: Address) -> str | None:
    """Why a sink may not reach ``address`` unless --sink-url-allow lists it ("link-local",
    "cloud metadata", ...); None when it may: public, private and loopback addresses."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # the IPv4 address is the one reached
            return unsafe_for_sinks(address.ipv4_mapped)
        if address in _NAT64:
            return unsafe_for_sinks(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        if address.sixtofour is not None and unsafe_for_sinks(address.sixtofour):
            return f"{unsafe_for_sinks(address.sixtofour)} (embedded {address.sixtofour})"
    if address in _METADATA_ADDRESSES:
        return "cloud metadata"
    if address.is_loopback:  # before "reserved": Python counts ::1 in ::/8
        return None
    if address in _THIS_NETWORK:
        return "unspecified"
    for kind in ("unspecified", "link_local", "multicast", "reserved"):
        if getattr(address, f"is_{kind}"):
            return kind.replace("_", "-")
    return None


@dataclass(frozen=True)
class AllowList:
    """``--image-url-allow``: networks whose addresses may be fetched though not public, and host
    names (exact, case-insensitive) every address of which may be."""

    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    hosts: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AllowList:
        """Raises ValueError naming the first entry that is neither a CIDR (or one address) nor a
        host name."""
        networks, hosts = [], set()
        for entry in entries:
            text = entry.strip() if isinstance(entry, str) else ""
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
                continue
            except ValueError:
                pass
            name = _host_name(text)
            if name is None:
                raise ValueError(f"{entry!r} is neither a CIDR (10.0.0.0/8, 127.0.0.1) nor a host name")
            hosts.add(name)
        return cls(tuple(networks), frozenset(hosts))

    def permits(self, host: str, address: Address) -> bool:
        """Whether ``address``, one of ``host``'s, may be fetched."""
        return not_public(address) is None or self.lists(host, address)

    def lists(self, host: str, address: Address) -> bool:
        """Whether ``host`` is named here, or ``address`` (or the IPv4 address inside an
        IPv4-mapped one) lies in a network listed here."""
        if _host_name(host) in self.hosts:
            return True
        mapped = getattr(address, "ipv4_mapped", None)
        return any(a in net for net in self.networks for a in (address, mapped) if a is not None)

    def refusal(self, host: str, address: Address) -> str | None:
        """For an image or a camera: why ``address`` may not be fetched; None when it may."""
        return None if self.permits(host, address) else f"{address} is {not_public(address)}"

    def sink_refusal(self, host: str, address: Address) -> str | None:
        """For a sink, with this list as ``--sink-url-allow``: why ``address`` may not be
        reached; None when it may. An empty list refuses only what ``unsafe_for_sinks`` names;
        a list given narrows sinks to what it lists."""
        if self.lists(host, address):
            return None
        if self.networks or self.hosts:
            return f"{address} is not in --sink-url-allow"
        why = unsafe_for_sinks(address)
        return f"{address} is {why}" if why else None


async def fetch_image(url: object, *, max_body: int, allow: AllowList) -> bytes:
    """The body of a 200 answer to GET ``url``, at most ``max_body`` bytes.

    Raises BadInputError: NOT_HTTP, NOT_ALLOWED, or ``not_fetched`` for anything else."""
    if not isinstance(url, str) or not url.lower().startswith(("http://", "https://")):
        raise BadInputError(NOT_HTTP)
    global _fetching
    if _fetching >= MAX_FETCHES:
        raise OverloadedError(f"the server is fetching {MAX_FETCHES} image URLs already; retry later "
                              "or send the image itself")
    where = ["?"]  # the host being fetched, for the log line
    _fetching += 1
    try:
        return await asyncio.wait_for(_fetch(url, max_body, allow, where), TIMEOUT_S)
    except _Refused as exc:
        log.warning("image URL refused: host %r: %s", where[0], exc)
        raise BadInputError(NOT_ALLOWED) from None
    except (_Failed, aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, UnicodeError) as exc:
        log.info("image URL not fetched: host %r: %s: %.200s", where[0], type(exc).__name__, exc)
        raise BadInputError(not_fetched(max_body)) from None
    finally:
        _fetching -= 1


async def check_host(host: str, port: int | None, allow: AllowList, *, flag: str) -> None:
    """For a source the server will connect to itself (a camera): BadInputError unless ``host``
    resolves and every address of it is public or allowed by ``flag``'s list. The connection
    made later looks the name up again (FFmpeg's own resolver), so a name server that changes
    its answer in between is not caught: allow-list cameras by address where that matters."""
    try:
        await asyncio.wait_for(_vetted(host, port, allow.refusal), TIMEOUT_S)
    except _Refused as exc:
        log.warning("source refused: host %r: %s", host, exc)
        raise BadInputError(f"the source's host is not allowed (private, loopback or link-local "
                            f"address); see {flag}") from None
    except (OSError, asyncio.TimeoutError, UnicodeError, ValueError):
        raise BadInputError(f"the source's host {host!r} could not be resolved") from None


async def sink_addresses(host: str, port: int, allow: AllowList) -> list[ResolveResult]:
    """For a sink: ``host``'s addresses, looked up once, each allowed by ``allow`` as
    ``--sink-url-allow`` (``AllowList.sink_refusal``), for the transport to connect to and to
    nothing else. Raises BadInputError (SINK_NOT_ALLOWED, SINK_NOT_LISTED, or not resolved);
    the operator's log line says which address was refused and why."""
    name = _host_name(host)
    if name in _METADATA_NAMES and name not in allow.hosts:  # refused before any lookup
        log.warning("sink refused: host %r is a cloud metadata name", host)
        raise BadInputError(SINK_NOT_LISTED if allow.networks or allow.hosts else SINK_NOT_ALLOWED)
    try:
        return await asyncio.wait_for(_vetted(host, port, allow.sink_refusal), TIMEOUT_S)
    except _Refused as exc:
        log.warning("sink refused: host %r: %s", host, exc)
        raise BadInputError(SINK_NOT_LISTED if allow.networks or allow.hosts else SINK_NOT_ALLOWED) from None
    except (OSError, asyncio.TimeoutError, UnicodeError, ValueError):
        raise BadInputError(f"its host {host!r} could not be resolved") from None


def legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address ``host`` stands for when written in a legacy numeric form that the
    system's resolver still reads (2130706433, 0x7f000001, 0177.0.0.1, 127.1); None for a
    dotted quad as written, or a name."""
    try:
        address = ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):  # not a number inet_aton reads (ValueError: a NUL in it)
        return None
    return None if str(address) == host else address


def pinned_connector(host: str, addresses: list[ResolveResult]) -> aiohttp.TCPConnector:
    """An aiohttp connector whose connections to ``host`` go to ``addresses`` (checked by
    ``sink_addresses``), with no lookup of its own."""
    resolver = _PinnedResolver()
    resolver.pinned[host] = list(addresses)
    return aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False)


class _Refused(Exception):
    """A host with an address that is neither public nor allow-listed."""


class _Failed(Exception):
    """Any other reason the image could not be had (told to the log, not the client)."""


async def _fetch(url: str, max_body: int, allow: AllowList, where: list[str]) -> bytes:
    resolver = _PinnedResolver()
    # No proxies from the environment (trust_env off), no decompression (a small gzip body
    # would expand past max_body before the bound below could see it).
    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False),
            timeout=aiohttp.ClientTimeout(total=TIMEOUT_S), auto_decompress=False,
            headers={"Accept-Encoding": "identity"}) as session:
        current = URL(url)
        for _ in range(MAX_REDIRECTS + 1):
            host = current.raw_host
            where[0] = f"{host}:{current.port}"
            if current.scheme not in ("http", "https") or not host:
                raise _Failed(f"not an http(s) URL with a host: scheme {current.scheme!r}")
            resolver.pinned[host] = await _vetted(host, current.port, allow.refusal)
            async with session.get(current, allow_redirects=False) as response:
                if response.status in _REDIRECTS and "Location" in response.headers:
                    current = current.join(URL(response.headers["Location"]))
                    continue
                if response.status != 200:
                    raise _Failed(f"answered HTTP {response.status}")
                return await _read(response, max_body)
        raise _Failed(f"more than {MAX_REDIRECTS} redirects")


async def _vetted(host: str, port: int | None,
                  refusal: Callable[[str, Address], str | None]) -> list[ResolveResult]:
    """``host``'s addresses, every one checked; raises _Refused with the first ``refusal``."""
    infos = await asyncio.get_running_loop().run_in_executor(_LOOKUPS, lookup, host, port)
    vetted: list[ResolveResult] = []
    for family, _, proto, _, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0].partition("%")[0])  # fe80::1%eth0: its scope aside
        if why := refusal(host, address):
            raise _Refused(why)
        vetted.append({"hostname": host, "host": sockaddr[0], "port": port or 0, "family": family,
                       "proto": proto, "flags": socket.AI_NUMERICHOST | socket.AI_NUMERICSERV})
    return vetted


def lookup(host: str, port: int | None) -> list:
    """The name server's answer for ``host`` (blocking: run on ``_LOOKUPS``)."""
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)


async def _read(response: aiohttp.ClientResponse, max_body: int) -> bytes:
    if response.content_length is not None and response.content_length > max_body:
        raise _Failed(f"Content-Length {response.content_length} is over {max_body} bytes")
    chunks, size = [], 0
    async for chunk in response.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > max_body:
            raise _Failed(f"the body is over {max_body} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class _PinnedResolver(AbstractResolver):
    """aiohttp's resolver for one fetch: answers only with the addresses ``_vetted`` checked
    (aiohttp connects to IP literals without asking, and those were checked too)."""

    def __init__(self):
        self.pinned: dict[str, list[ResolveResult]] = {}

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        found = [r for r in self.pinned.get(host, ()) if not family or r["family"] == family]
        if not found:  # never expected: fail closed rather than look the name up again
            raise OSError(f"{host} was not checked")
        return found

    async def close(self) -> None:
        pass


def _host_name(text: str) -> str | None:
    """``text`` as a lower-case ASCII (IDNA) host name without the final dot; None when it is not
    one (an all-digit last label is an address, not a name)."""
    try:
        name = text.rstrip(".").encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None
    labels = name.split(".")
    if not name or len(name) > 253 or labels[-1].isdigit() or not all(map(_LABEL.match, labels)):
        return None
    return name
