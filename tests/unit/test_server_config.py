"""Server settings from flags and RLE_SERVING_* variables: bad values are clear start-up errors."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import pytest

from pipeline.errors import ConfigError
from pipeline.frontends.config import ServerConfig, add_flags, reference

from ..conftest import ROOT

CONFIGURATION_PAGE = ROOT / "docs/configuration.md"


def test_environment_settings_are_typed():
    env = {"RLE_SERVING_GRPC_PORT": "9001", "RLE_SERVING_GRACE_PERIOD_S": "2.5",
           "RLE_SERVING_STREAM_POLICY": "drop_oldest", "RLE_SERVING_TOKEN": "",
           "RLE_SERVING_NETWORK_THREADS": "4", "RLE_SERVING_ALLOW_IMAGE_URLS": "true",
           "RLE_SERVING_LOAD_MODEL": "a, b"}
    assert ServerConfig.env_defaults(env) == {"grpc_port": 9001, "grace_period_s": 2.5,
                                              "stream_policy": "drop_oldest", "network_threads": 4,
                                              "allow_image_urls": True, "load_model": ("a", "b")}


def serve_flags() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_flags(parser)
    return parser


def test_flags_win_over_the_environment_which_wins_over_the_fields():
    flags = serve_flags().parse_args(["--grpc-port", "9001", "--allow-image-urls", "--image-url-allow",
                                      "10.0.0.0/8", "--image-url-allow", "cameras.local",
                                      "--stream-policy", "drop_oldest", "--grace-period-s", "2.5"])
    config = ServerConfig.from_flags(flags, {"RLE_SERVING_GRPC_PORT": "7001", "RLE_SERVING_METRICS_PORT": "7002"})
    assert (config.grpc_port, config.metrics_port, config.http_port) == (9001, 7002, 8000)
    assert config.allow_image_urls and not config.allow_shared_memory
    assert config.image_url_allow == ("10.0.0.0/8", "cameras.local")
    assert (config.stream_policy, config.grace_period_s) == ("drop_oldest", 2.5)


@pytest.mark.parametrize("flags", [["--stream-policy", "fifo"], ["--model-control-mode", "lazy"],
                                   ["--device", "tpu"], ["--worker-threads", "two"]])
def test_a_flag_outside_its_choices_or_type_is_refused_by_the_parser(flags):
    with pytest.raises(argparse.ArgumentError):
        serve_flags().parse_args(flags)


def serve_help() -> str:
    return subprocess.run([sys.executable, "-m", "pipeline", "serve", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=True, env={**os.environ, "COLUMNS": "1000"}).stdout


def test_serve_help_gives_each_flag_its_fields_help_and_default():
    text = serve_help()
    assert re.search(r"--grpc-port PORT\s+gRPC port, as Triton's: .*\(default 8001\)\n", text)
    assert re.search(r"--stream-policy \{wait,drop_oldest\}\s+when a stream .*\(default wait\)\n", text)
    assert re.search(r"--load-model NAME\s+with --model-control-mode .*\(repeatable; default none\)\n", text)
    assert re.search(r"--grpc-max-connection-age-s SECONDS\s+after this \(\+-10%\) .*\(default 300\)\n", text)


def test_the_configuration_page_is_generated_from_the_fields():
    assert CONFIGURATION_PAGE.read_text() == reference(), "docs/configuration.md is stale: run `make docs`"


def test_the_configuration_page_has_every_flag_serve_help_prints():
    printed = set(re.findall(r"^  (--[a-z][a-z-]*)", serve_help(), re.MULTILINE)) - {"--help"}
    documented = set(re.findall(r"^\| `(--[a-z][a-z-]*)", CONFIGURATION_PAGE.read_text(), re.MULTILINE))
    assert len(printed) > 40 and printed == documented, printed ^ documented


@pytest.mark.parametrize("variable, value, words", [
    ("RLE_SERVING_GRPC_PORT", "eight-thousand", "RLE_SERVING_GRPC_PORT must be a whole number"),
    ("RLE_SERVING_GRACE_PERIOD_S", "soon", "RLE_SERVING_GRACE_PERIOD_S must be a number"),
])
def test_a_non_numeric_variable_is_a_config_error_naming_it(variable, value, words):
    with pytest.raises(ConfigError, match=words):
        ServerConfig.env_defaults({variable: value})


def test_serve_reports_a_bad_variable_without_a_traceback():
    run = subprocess.run([sys.executable, "-m", "pipeline", "serve"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={"RLE_SERVING_METRICS_PORT": "x", "PATH": ""})
    assert run.returncode == 2
    assert run.stderr.strip() == "error: RLE_SERVING_METRICS_PORT must be a whole number, got 'x'"


@pytest.mark.parametrize("settings, words", [
    ({"stream_window": 0}, "stream window"),
    ({"stream_policy": "fifo"}, "stream policy"),
    ({"tls_cert": "a.pem"}, "both --tls-cert and --tls-key"),
    ({"max_message_mb": 0}, "max message size"),
    ({"grpc_keepalive_s": 0}, "--grpc-keepalive-s must be at least 0.001 seconds, got 0"),
    ({"grpc_max_connection_age_s": -1}, "--grpc-max-connection-age-s must be at least 0.001 seconds"),
    ({"grpc_max_connection_age_s": float("nan")}, "--grpc-max-connection-age-s must be at least"),
    ({"grpc_max_connection_age_grace_s": -0.5}, "--grpc-max-connection-age-grace-s must be >= 0 seconds"),
    ({"sink_ca_file": "/nonexistent/ca.pem"}, "--sink-ca-file /nonexistent/ca.pem: not a file of PEM CA"),
    ({"sink_ca_file": __file__}, "--sink-ca-file .*: not a file of PEM CA certificates"),
])
def test_bad_settings_are_refused_at_start_up(settings, words):
    with pytest.raises(ConfigError, match=words):
        ServerConfig(**settings)


def test_client_limits_count_per_client_and_refuse_beyond_the_cap():
    from pipeline.errors import OverloadedError
    from pipeline.serving.state import ClientLimits, client_of

    assert client_of("ipv4:1.2.3.4:5") == client_of("ipv4:1.2.3.4:6") == "1.2.3.4"
    assert client_of("ipv6:[::1]:443") == "::1" and client_of("unix:/tmp/s") == "unix:/tmp/s"
    limits = ClientLimits(max_streams=1, max_in_flight=2, max_bytes=100)
    limits.acquire("streams", "1.2.3.4")
    with pytest.raises(OverloadedError, match="1 streams.*limit per client is 1"):
        limits.acquire("streams", "1.2.3.4")
    limits.acquire("streams", "1.2.3.5")  # another client has its own budget
    with limits.request("p"), limits.request("p"):
        with pytest.raises(OverloadedError, match="2 requests in flight"):
            with limits.request("p"):
                pass
    with limits.request("p"):  # released again
        pass
    limits.release("streams", "1.2.3.4")
    limits.release("streams", "1.2.3.5")
    assert not any(limits.held.values())
    with limits.holding(60):
        with pytest.raises(OverloadedError, match="the limit is 0 MB"):
            with limits.holding(41):
                pass
        with limits.holding(40):
            assert limits.bytes_held == 100
    assert limits.bytes_held == 0
