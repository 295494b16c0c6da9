"""One bad config.pbtxt breaks only its own model (issue 35), with the official tritonclient.

Each hostile config sits beside the good models of a fake repository, in explicit mode: the
good ones load, unload and serve; the bad one's load is refused with its reason (a few hundred
characters at most, never the file's kilobytes), the index lists it UNAVAILABLE with that
reason, and a request for it is told it (UNAVAILABLE, never INTERNAL). At start, as Triton with
its default --exit-on-error: ``--load-model good`` serves whatever else is broken, while
``--load-model bad`` and mode none beside a bad folder refuse to start, naming it."""

from __future__ import annotations

import asyncio
import random
import shutil

import pytest
import tritonclient.grpc as triton
import tritonclient.http as triton_http

from pipeline.errors import ConfigError
from pipeline.frontends.config import ServerConfig
from pipeline.frontends.server import PipelineServer

from ..fakes import NETWORK, NETWORK_CONFIG, PIPELINE, fake_repository
from .conftest import running_server
from .test_model_control import detections, refused

MOST = 600  # characters a reason may have, the folder's path included


def pipeline_text(root, name: str, network: str = NETWORK) -> str:
    text = (root / PIPELINE / "config.pbtxt").read_text().replace(f'name: "{PIPELINE}"', f'name: "{name}"')
    return text.replace(f'string_value: "{NETWORK}"', f'string_value: "{network}"')


def network_text(name: str) -> str:
    return NETWORK_CONFIG.replace(f'name: "{NETWORK}"', f'name: "{name}"')


# folder -> (its config.pbtxt, words its reason has)
HOSTILE = {
    "negative_batch": (lambda root: pipeline_text(root, "negative_batch").replace("max_batch_size: 8",
                                                                                   "max_batch_size: -1"),
                       "field 'max_batch_size': must be >= 0, got -1"),
    "huge_dim": (lambda root: network_text("huge_dim").replace("dims: [ 3, -1, -1 ]", "dims: [ 3, 1e21, -1 ]"),
                 "Couldn't parse integer: 1e21"),
    "out_of_range": (lambda root: network_text("out_of_range").replace(
        "dims: [ 3, -1, -1 ]", "dims: [ 3, 1000000000000000000000, -1 ]"), "Value out of range"),
    "deep_nesting": (lambda root: pipeline_text(root, "deep_nesting") + "optimization "
                     + "{ " * 20000 + "}" * 20000, "characters ...]"),
    "escaping_network": (lambda root: pipeline_text(root, "escaping_network", "../../etc"),
                         "parameters.network names '../../etc', which is not in the repository"),
    "empty_network": (lambda root: pipeline_text(root, "empty_network", ""),
                      "parameters.network names '', which is not in the repository"),
    "slashed_network": (lambda root: pipeline_text(root, "slashed_network", f"{NETWORK}/1"),
                        f"parameters.network names '{NETWORK}/1', which is not in the repository"),
    "binary": (lambda root: random.Random(35).randbytes(4096), "not UTF-8 text"),
    "on_a_bad_network": (lambda root: pipeline_text(root, "on_a_bad_network", "huge_dim"),
                         "parameters.network names 'huge_dim', which cannot be loaded: "),
}


def hostile_repository(root):
    """The fake repository, a second good pipeline ``other``, and every HOSTILE folder."""
    fake_repository(root)
    for name, (config, _) in {"other": (lambda root: pipeline_text(root, "other"), ""), **HOSTILE}.items():
        (root / name).mkdir()
        text = config(root)
        path = root / name / "config.pbtxt"
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    return root


@pytest.fixture(scope="module")
def beside_bad(tmp_path_factory):
    """Explicit mode, ``--load-model`` the good pipeline, every hostile folder beside it."""
    root = hostile_repository(tmp_path_factory.mktemp("hostile"))
    with running_server(model_repository=str(root), model_control_mode="explicit",
                        load_model=(PIPELINE,)) as server:
        client = triton.InferenceServerClient(server.address)
        rest = triton_http.InferenceServerClient(f"127.0.0.1:{server.server.http_port}")
        yield server, client, rest
        client.close()
        rest.close()




def told(message: str, name: str, words: str) -> None:
    """A reason that names the model's config file and its fault, and stays short."""
    assert f"{name}/config.pbtxt" in message and words in message, message
    assert len(message) < MOST, len(message)


def test_the_good_model_named_at_start_serves_and_the_others_load_and_unload(beside_bad):
    server, client, rest = beside_bad
    assert client.is_model_ready(PIPELINE) and len(detections(client)) == 2
    client.load_model("other")
    assert len(detections(client, "other")) == 2
    rest.unload_model(PIPELINE)
    assert not client.is_model_ready(PIPELINE)
    rest.load_model(PIPELINE)
    client.unload_model("other")
    assert len(detections(client)) == 2 and not client.is_model_ready("other")


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_bad_model_is_refused_listed_and_answered_with_its_reason(beside_bad, name):
    server, client, rest = beside_bad
    words = HOSTILE[name][1]
    error = refused(lambda: client.load_model(name))
    assert error.status() == "StatusCode.FAILED_PRECONDITION"
    told(error.message(), name, words)
    error = refused(lambda: rest.load_model(name))  # the binary file's load answered 500 before
    assert error.status() == "400"
    told(error.message(), name, words)
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index[name].state == "UNAVAILABLE"
    told(index[name].reason, name, words)
    assert {m["name"]: m["state"] for m in rest.get_model_repository_index()}[name] == "UNAVAILABLE"
    error = refused(lambda: detections(client, name))
    assert error.status() == "StatusCode.UNAVAILABLE"
    assert error.message().startswith(f"model '{name}' cannot be loaded: ")
    told(error.message(), name, words)
    assert not client.is_model_ready(name)
    client.unload_model(name)  # as in Triton, unloading what does not serve changes nothing
    told({m.name: m.reason for m in client.get_model_repository_index().models}[name], name, words)


def test_a_request_for_a_bad_model_does_not_keep_what_it_sent(beside_bad):
    server, client, rest = beside_bad
    for _ in range(3):
        refused(lambda: detections(client, "binary"))
    # The answer is a copy of the stored error: raising the stored one would chain every
    # request's frames (and their locals: the images) onto its traceback.
    assert server.server.state.unavailable["binary"].__traceback__ is None


def test_a_model_whose_files_fail_is_listed_with_why(beside_bad):
    server, client, rest = beside_bad
    root = server.server.models.root
    (root / "broken_net" / "1").mkdir(parents=True)
    (root / "broken_net" / "config.pbtxt").write_text(network_text("broken_net"))
    (root / "broken_net" / "1" / "model.pt").write_bytes(b"not a network")
    (root / "on_broken_net").mkdir()
    (root / "on_broken_net" / "config.pbtxt").write_text(pipeline_text(root, "on_broken_net", "broken_net"))
    error = refused(lambda: client.load_model("on_broken_net"))
    assert "model.pt: not a loadable TorchScript file" in error.message()
    reason = {m.name: m.reason for m in client.get_model_repository_index().models}["on_broken_net"]
    assert reason.startswith("model 'on_broken_net' failed to load: ") and "not a loadable" in reason


def test_a_model_whose_config_breaks_while_it_serves_still_unloads(tmp_path):
    root = hostile_repository(tmp_path / "models")
    with running_server(model_repository=str(root), model_control_mode="explicit",
                        load_model=(PIPELINE,)) as server:
        client = triton.InferenceServerClient(server.address)
        config = root / PIPELINE / "config.pbtxt"
        config.write_text(config.read_text().replace("max_batch_size: 8", "max_batch_size: -8"))
        error = refused(lambda: client.load_model(PIPELINE))
        told(error.message(), PIPELINE, "field 'max_batch_size'")
        assert len(detections(client)) == 2  # the version that was serving still is
        client.unload_model(PIPELINE)
        assert not client.is_model_ready(PIPELINE)
        reason = {m.name: m.reason for m in client.get_model_repository_index().models}[PIPELINE]
        told(reason, PIPELINE, "field 'max_batch_size'")
        shutil.rmtree(root / "binary")  # a bad folder removed: the next reading forgets it
        refused(lambda: client.load_model(PIPELINE))
        assert "binary" not in {m.name for m in client.get_model_repository_index().models}
        assert refused(lambda: detections(client, "binary")).status() == "StatusCode.NOT_FOUND"
        client.close()


def start_refused(root, **settings) -> str:
    """Why a server over ``root`` refuses to start (ConfigError, having undone its start)."""
    config = ServerConfig(model_repository=str(root), host="127.0.0.1", grpc_port=0, http_port=-1,
                          metrics_port=0, device="cpu", **settings)
    with pytest.raises(ConfigError) as info:
        asyncio.run(PipelineServer(config).start(serve_metrics=False))
    return str(info.value)


def test_a_start_that_names_a_bad_model_or_serves_every_model_refuses_naming_them(tmp_path):
    root = hostile_repository(tmp_path / "models")
    told(start_refused(root, model_control_mode="explicit", load_model=("binary",)), "binary", "not UTF-8")
    message = start_refused(root)  # mode none: every model, as Triton with --exit-on-error
    assert "every model must load" in message
    for name, (_, words) in HOSTILE.items():
        assert f"{name}/config.pbtxt" in message and words in message, name
    assert len(message) < MOST * len(HOSTILE)
