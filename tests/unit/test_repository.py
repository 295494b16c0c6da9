"""config.pbtxt parsing and validation: bad files are refused naming the file and field, each
costing only its own model (and the pipelines that run it), never the repository."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from pipeline.errors import ConfigError, NotFoundError
from pipeline.repository import ModelRepository

from ..conftest import pointed_at

ROOT = Path(__file__).resolve().parents[2]

GOOD_NETWORK = (ROOT / "model_repository/yolov5s_seg/config.pbtxt").read_text()
# The shipped pipeline, on the TorchScript network (`make model` may point it at another form).
GOOD_PIPELINE = pointed_at("yolov5s_seg")((ROOT / "model_repository/instance_segmentation/config.pbtxt").read_text())


def make_repo(tmp_path, network=GOOD_NETWORK, pipeline=GOOD_PIPELINE):
    for name, text in (("yolov5s_seg", network), ("instance_segmentation", pipeline)):
        (tmp_path / name / "1").mkdir(parents=True)
        (tmp_path / name / "config.pbtxt").write_text(text)
    return tmp_path


def refusal(root, name: str) -> str:
    """Why the repository at ``root`` (which loads) refuses its model ``name``."""
    repository = ModelRepository.load(root)
    assert name in repository.unusable and name not in repository.models
    with pytest.raises(ConfigError) as info:
        repository.get(name)
    return str(info.value)


def test_the_shipped_repository_parses_into_tritons_model_config():
    repo = ModelRepository.load(ROOT / "model_repository")
    pipeline = repo.get("instance_segmentation")
    assert pipeline.config.max_batch_size == 8
    assert pipeline.config.dynamic_batching.max_queue_delay_microseconds == 5000
    assert pipeline.queue_size_limit() == 64
    # `make model` points it at the fastest form of the network here.
    assert pipeline.parameter("network") in ("yolov5s_seg", "yolov5s_seg_onnx", "yolov5s_seg_openvino")
    network = repo.get("yolov5s_seg")
    assert network.platform == "pytorch_libtorch"
    assert list(network.config.input[0].dims) == [3, -1, -1]
    assert len(network.labels()) == 80 and network.labels()[0] == "person"
    with pytest.raises(NotFoundError, match="unknown model 'nope'"):
        repo.get("nope")


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda t: t.replace("max_batch_size: 8", "max_batch_size: -1"), "max_batch_size"),
        (lambda t: t.replace('name: "yolov5s_seg"', 'name: "other"'), "name"),
        (lambda t: t.replace('platform: "pytorch_libtorch"', 'platform: "tensorflow_savedmodel"'), "platform"),
        (lambda t: t.replace("dims: [ 3, -1, -1 ]", "dims: [ 3, 0, 640 ]"), "input[0].dims"),
        (lambda t: t.replace("data_type: TYPE_FP32\n    dims: [ 3", "dims: [ 3"), "input[0].data_type"),
        (lambda t: t.replace('name: "OUTPUT__1"', 'name: "OUTPUT__0"'), "output[1].name"),
        (lambda t: t.replace("kind: KIND_CPU", "kind: KIND_MODEL"), "instance_group[0].kind"),
        (lambda t: t + "\ndynamic_batching { preferred_batch_size: [ 16 ] }\n", "dynamic_batching.preferred_batch_size"),
    ],
)
def test_invalid_network_configs_name_file_and_field(tmp_path, edit, field):
    repo = make_repo(tmp_path, network=edit(GOOD_NETWORK))
    message = refusal(repo, "yolov5s_seg")
    assert "yolov5s_seg/config.pbtxt" in message and f"'{field}'" in message
    # The pipeline on it cannot run either, and says why.
    assert refusal(repo, "instance_segmentation").startswith(
        f"{repo}/instance_segmentation/config.pbtxt: parameters.network names 'yolov5s_seg', which "
        f"cannot be loaded: {message}")


def test_syntax_errors_name_the_line(tmp_path):
    repo = make_repo(tmp_path, network=GOOD_NETWORK.replace("max_batch_size: 8", "max_batch_size 8 {"))
    assert re.search(r"yolov5s_seg/config.pbtxt: \d+:\d+", refusal(repo, "yolov5s_seg"))


def test_pipeline_must_name_an_existing_network(tmp_path):
    repo = make_repo(tmp_path, pipeline=GOOD_PIPELINE.replace('"yolov5s_seg" }', '"missing" }'))
    assert "parameters.network names 'missing'" in refusal(repo, "instance_segmentation")
    assert ModelRepository.load(repo).get("yolov5s_seg").platform == "pytorch_libtorch"  # still usable


@pytest.mark.parametrize("old, new, field, words", [
    ('"0.25"', '"high"', "parameters.confidence", "must be a number"),
    ('"0.25"', '"1.5"', "parameters.confidence", r"in \[0, 1\]"),
    ('"0.45"', '"-1"', "parameters.iou_threshold", r"in \[0, 1\]"),
    ('"300"', '"lots"', "parameters.max_detections", "whole number"),
    ('"300"', '"2.5"', "parameters.max_detections", "whole number"),
])
def test_pipeline_parameters_are_config_errors_naming_file_and_field(tmp_path, old, new, field, words):
    repo = make_repo(tmp_path, pipeline=GOOD_PIPELINE.replace(old, new))
    message = refusal(repo, "instance_segmentation")
    assert re.search(words, message)
    assert "instance_segmentation/config.pbtxt" in message and f"'{field}'" in message


def test_a_platform_we_cannot_run_is_refused_by_validation_naming_those_we_can(tmp_path):
    network = GOOD_NETWORK.replace('platform: "pytorch_libtorch"', 'platform: "tensorrt_plan"')
    assert re.search("'platform'.*tensorrt_plan.*pytorch_libtorch.*onnxruntime_onnx.*openvino",
                     refusal(make_repo(tmp_path, network=network), "yolov5s_seg"))


def test_dynamic_batching_needs_a_batch_dimension(tmp_path):
    repo = make_repo(tmp_path, pipeline=GOOD_PIPELINE.replace("max_batch_size: 8", "max_batch_size: 0"))
    assert "'dynamic_batching'" in refusal(repo, "instance_segmentation")


# Beside the good models, a folder "bad" with this config.pbtxt -> words its refusal has.
HOSTILE = {
    "binary": (bytes(range(128, 256)) * 32, "bad/config.pbtxt: not UTF-8 text (byte 0x80 at offset 0)"),
    "1e21 dim": (GOOD_NETWORK.replace('"yolov5s_seg"', '"bad"').replace("dims: [ 3, -1, -1 ]",
                                                                        "dims: [ 3, 1e21, -1 ]"),
                 "Couldn't parse integer: 1e21"),
    "20k-deep nesting": ("optimization " + "{ " * 20000 + "}" * 20000, "characters ...]"),
    "a 4 KB name": (f'name: "{"x" * 4096}"', "characters ...]"),
    "larger than 1 MiB": ("# a long comment\n" * 70000, "larger than 1024 KiB"),
    "a network of ../../etc": (GOOD_PIPELINE.replace('"instance_segmentation"', '"bad"')
                               .replace('"yolov5s_seg" }', '"../../etc" }'),
                               "parameters.network names '../../etc', which is not in the repository"),
    "a network that is a pipeline": (GOOD_PIPELINE.replace('"instance_segmentation"', '"bad"')
                                     .replace('"yolov5s_seg" }', '"instance_segmentation" }'),
                                     "names 'instance_segmentation', a Python-backend model, not a network"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_config_is_a_short_config_error_for_its_model_alone(tmp_path, name):
    text, words = HOSTILE[name]
    repo = make_repo(tmp_path)
    (repo / "bad").mkdir()
    (repo / "bad/config.pbtxt").write_bytes(text if isinstance(text, bytes) else text.encode())
    message = refusal(repo, "bad")
    assert words in message and len(message) < len(str(repo)) + 400, message
    assert sorted(ModelRepository.load(repo).models) == ["instance_segmentation", "yolov5s_seg"]


@pytest.mark.parametrize("call, words", [("open", "config.pbtxt: cannot be read: Permission denied"),
                                         ("iterdir", "yolov5s_seg: cannot be listed: Permission denied")])
def test_a_folder_that_cannot_be_read_is_refused_saying_so(tmp_path, monkeypatch, call, words):
    repo = make_repo(tmp_path)
    real = getattr(Path, call)

    def denied(self, *args, **kwargs):  # as for a server that does not run as root
        if "yolov5s_seg" in self.parts:
            raise PermissionError(13, "Permission denied")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, call, denied)
    assert refusal(repo, "yolov5s_seg").endswith(words)


def test_version_folders_are_ascii_numbers(tmp_path):
    repo = make_repo(tmp_path)
    for version in ("3", "²", "١٢", "latest"):
        (repo / "yolov5s_seg" / version).mkdir()
    assert ModelRepository.load(repo).get("yolov5s_seg").versions == (1, 3)


def test_a_repository_of_unusable_models_loads_and_says_so_and_an_empty_one_is_refused(tmp_path):
    repo = make_repo(tmp_path / "bad", network=GOOD_NETWORK.replace("max_batch_size: 8", "max_batch_size: -1"))
    assert not ModelRepository.load(repo).models
    assert "field 'max_batch_size'" in refusal(repo, "yolov5s_seg")
    (tmp_path / "empty" / "no_config").mkdir(parents=True)
    with pytest.raises(ConfigError, match="holds no <model>/config.pbtxt"):
        ModelRepository.load(tmp_path / "empty")


def test_missing_model_file_is_a_start_up_error_with_a_hint(tmp_path):
    from pipeline.engine import Pipeline

    repo = make_repo(tmp_path)
    with pytest.raises(ConfigError, match="model.pt: model file is missing.*make model"):
        Pipeline.from_repository(repo, device="cpu")


def test_gpu_asked_for_without_a_gpu_is_a_start_up_error(tmp_path):
    import torch

    from pipeline.engine import Pipeline

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    repo = make_repo(tmp_path, pipeline=GOOD_PIPELINE.replace("KIND_CPU", "KIND_GPU"))
    shutil.copy(ROOT / "model_repository/yolov5s_seg/1/model.pt", repo / "yolov5s_seg/1/model.pt")
    with pytest.raises(ConfigError, match="KIND_GPU.*no CUDA device"):
        Pipeline.from_repository(repo)


def test_network_outputs_must_match_the_config(tmp_path):
    from pipeline.engine import Pipeline

    repo = make_repo(tmp_path, network=GOOD_NETWORK.replace("dims: [ -1, 117 ]", "dims: [ -1, 85 ]"))
    shutil.copy(ROOT / "model_repository/yolov5s_seg/1/model.pt", repo / "yolov5s_seg/1/model.pt")
    with pytest.raises(ConfigError, match=r"output\[0\].*\[-1, 85\].*\[25200, 117\]"):
        Pipeline.from_repository(repo, device="cpu")


def test_a_network_exported_for_one_size_cannot_claim_any_size(tmp_path):
    import json

    import torch

    from pipeline.engine import Pipeline

    class FixedSize(torch.nn.Module):
        def forward(self, images):
            if images.shape[2] != 640 or images.shape[3] != 640:
                raise ValueError("traced for 640x640 only")
            b = images.shape[0]
            return torch.zeros(b, 25200, 117), torch.zeros(b, 32, 160, 160)

    repo = make_repo(tmp_path)
    meta = json.dumps({"names": [str(i) for i in range(80)], "input_size": 640, "stride": 32})
    torch.jit.save(torch.jit.script(FixedSize()), str(repo / "yolov5s_seg/1/model.pt"),
                   _extra_files={"meta.json": meta})
    with pytest.raises(ConfigError, match=r"does not run at 576x640.*declare dims \[3, S, S\]"):
        Pipeline.from_repository(repo, device="cpu")
    config = repo / "yolov5s_seg/config.pbtxt"
    square = config.read_text().replace("dims: [ 3, -1, -1 ]", "dims: [ 3, 640, 640 ]")
    config.write_text(square.replace("dims: [ 32, -1, -1 ]", "dims: [ 32, 160, 160 ]"))
    pipe = Pipeline.from_repository(repo, device="cpu")  # declared square: served as such
    assert pipe.info.stride is None and pipe.info.input_size == 640
