"""Server settings from flags and RLE_SERVING_* variables: bad values are clear start-up errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.errors import ConfigError
from pipeline.frontends.config import ServerConfig

from ..conftest import ROOT


def test_environment_settings_are_typed():
    env = {"RLE_SERVING_GRPC_PORT": "9001", "RLE_SERVING_GRACE_PERIOD_S": "2.5",
           "RLE_SERVING_STREAM_POLICY": "drop_oldest", "RLE_SERVING_TOKEN": ""}
    assert ServerConfig.env_defaults(env) == {"grpc_port": 9001, "grace_period_s": 2.5,
                                              "stream_policy": "drop_oldest"}


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
