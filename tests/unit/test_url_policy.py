"""Fetching images by URL: which addresses are refused, the allow-list, and that every failure is
a 400 with generic text. No network: lookups are faked, and what is refused is never connected."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket

import pytest

from pipeline.errors import BadInputError, ConfigError
from pipeline.frontends.config import ServerConfig
from pipeline.serving import url_policy
from pipeline.serving.url_policy import NOT_ALLOWED, NOT_HTTP, AllowList, fetch_image, not_public

NOBODY = AllowList()


@pytest.mark.parametrize("address, kind", [
    ("127.0.0.1", "loopback"), ("10.1.2.3", "private"), ("172.16.0.1", "private"),
    ("192.168.1.1", "private"), ("169.254.169.254", "link-local"), ("::1", "loopback"),
    ("fe80::1", "link-local"), ("::ffff:127.0.0.1", "loopback"), ("0.0.0.0", "unspecified"),
    ("::", "unspecified"), ("224.0.0.1", "multicast"), ("fd00::1", "private"), ("fec0::1", "site-local"),
    ("100.64.0.1", "not global"),  # carrier-grade NAT
    ("2002:7f00:1::", "loopback (embedded 127.0.0.1)"),  # 6to4 around 127.0.0.1
    ("::ffff:169.254.169.254", "link-local"),
])
def test_non_public_addresses_are_refused(address, kind):
    assert not_public(ipaddress.ip_address(address)) == kind
    assert not NOBODY.permits("example.com", ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946",
                                     "::ffff:93.184.216.34", "2002:5db8:d822::1"])
def test_public_addresses_pass(address):
    assert not_public(ipaddress.ip_address(address)) is None
    assert NOBODY.permits("example.com", ipaddress.ip_address(address))


def test_the_allow_list_admits_its_networks_and_host_names():
    allow = AllowList.parse(["127.0.0.1", "10.0.0.0/8", " Images.Internal. "])
    ip = ipaddress.ip_address
    assert allow.permits("anything", ip("127.0.0.1"))
    assert allow.permits("anything", ip("::ffff:127.0.0.1"))  # the same address, IPv4-mapped
    assert allow.permits("anything", ip("10.200.0.7"))
    assert not allow.permits("anything", ip("127.0.0.2"))
    assert not allow.permits("anything", ip("169.254.169.254"))
    # a host name admits every address of that host (exact name, any case), and only of it
    assert allow.permits("images.internal", ip("169.254.169.254"))
    assert allow.permits("IMAGES.internal.", ip("192.168.0.9"))
    assert not allow.permits("evil.images.internal", ip("192.168.0.9"))


@pytest.mark.parametrize("entry", ["10.0.0.0/33", "1.2.3", "-bad.example", "a..b", "", "http://x", "a b"])
def test_a_bad_allow_list_entry_is_a_config_error(entry):
    with pytest.raises(ValueError, match="neither a CIDR"):
        AllowList.parse([entry])
    with pytest.raises(ConfigError, match="--image-url-allow: .* is neither a CIDR"):
        ServerConfig(image_url_allow=("127.0.0.1", entry))


def test_the_allow_list_setting_from_flag_and_environment():
    assert ServerConfig(image_url_allow=["10.0.0.0/8"]).image_url_allow == ("10.0.0.0/8",)  # append's list
    env = {"RLE_SERVING_IMAGE_URL_ALLOW": "10.0.0.0/8, images.internal"}
    assert ServerConfig.env_defaults(env) == {"image_url_allow": ("10.0.0.0/8", "images.internal")}


def fetch(url, allow=NOBODY):
    return asyncio.run(fetch_image(url, max_body=1000, allow=allow))


@pytest.fixture
def dns(monkeypatch):
    """Fake lookups: host -> addresses; every call recorded."""
    answers, calls = {}, []

    def getaddrinfo(host, port):
        calls.append(host)
        try:  # an IP literal is itself, as the real one answers
            answers.setdefault(host, [str(ipaddress.ip_address(host))])
        except ValueError:
            pass
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (a, port)) for a in answers[host]]

    monkeypatch.setattr(url_policy, "lookup", getaddrinfo)
    return answers, calls


def test_a_name_is_refused_when_any_of_its_addresses_is_not_public(dns, caplog):
    answers, calls = dns
    answers["mixed.example"] = ["93.184.216.34", "10.0.0.1"]
    with caplog.at_level(logging.INFO, logger=url_policy.__name__):
        with pytest.raises(BadInputError) as info:
            fetch("http://mixed.example:8080/cat.jpg")
    assert str(info.value) == NOT_ALLOWED and calls == ["mixed.example"]
    # the operator is told which host and address, in one line; the client is not
    assert [r.getMessage() for r in caplog.records] == [
        "image URL refused: host 'mixed.example:8080': 10.0.0.1 is private"]


@pytest.mark.parametrize("url", ["http://127.0.0.1/", "http://localhost:22/", "https://[::1]:8443/x",
                                 "http://169.254.169.254/latest/meta-data/", "http://0x7f000001/",
                                 "http://[::ffff:127.0.0.1]/", "http://0.0.0.0:6379/"])
def test_local_urls_are_refused_before_connecting(url, dns):
    answers, _ = dns
    answers.update({"localhost": ["127.0.0.1"], "0x7f000001": ["127.0.0.1"]})
    with pytest.raises(BadInputError) as info:
        fetch(url)
    assert str(info.value) == NOT_ALLOWED


@pytest.mark.parametrize("url", ["ftp://example.com/x.jpg", "file:///etc/passwd", "gopher://x", 42, None])
def test_only_http_urls(url):
    with pytest.raises(BadInputError) as info:
        fetch(url)
    assert str(info.value) == NOT_HTTP


@pytest.mark.parametrize("url", ["http://[::1", "http://1.2.3.4:99999/", "http:///no-host",
                                 "http://" + "a" * 64 + ".example/"])  # bad IDNA: label too long
def test_a_malformed_url_is_a_generic_400(url, caplog):
    with caplog.at_level(logging.INFO, logger=url_policy.__name__):
        with pytest.raises(BadInputError) as info:
            fetch(url)
    assert str(info.value) == url_policy.not_fetched(1000)
    assert len(caplog.records) == 1


def test_an_unknown_name_is_a_generic_400(dns):
    with pytest.raises(BadInputError) as info:
        fetch("http://nowhere.example/x.jpg")
    assert str(info.value) == url_policy.not_fetched(1000) and "nowhere" not in str(info.value)


def test_the_pinned_resolver_answers_only_for_checked_hosts():
    resolver = url_policy._PinnedResolver()
    checked = {"hostname": "a.example", "host": "93.184.216.34", "port": 80, "family": socket.AF_INET,
               "proto": 6, "flags": 0}
    resolver.pinned["a.example"] = [checked]
    assert asyncio.run(resolver.resolve("a.example", 80, family=0)) == [checked]
    assert asyncio.run(resolver.resolve("a.example", 80, family=socket.AF_INET)) == [checked]
    with pytest.raises(OSError, match="not checked"):  # fails closed, never looks up again
        asyncio.run(resolver.resolve("b.example", 80))


def test_fetches_at_once_are_bounded(monkeypatch):
    """Beyond MAX_FETCHES in progress a fetch is refused at once (RESOURCE_EXHAUSTED), not
    queued behind name servers that may never answer."""
    from pipeline.errors import OverloadedError

    monkeypatch.setattr(url_policy, "_fetching", url_policy.MAX_FETCHES)
    with pytest.raises(OverloadedError, match="image URLs already"):
        fetch("http://93.184.216.34/cat.jpg")
    assert url_policy._fetching == url_policy.MAX_FETCHES  # a refused fetch takes no slot
