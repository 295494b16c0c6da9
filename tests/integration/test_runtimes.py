"""Bring your own model: TorchScript, ONNX Runtime and OpenVINO behind one runner.

The real yolov5s-seg in each of its three forms (`make model` writes them) finds the same
objects and masks as TorchScript on every bundled photo; the fake network in ONNX and
OpenVINO form is served from a config that names only its runtime (inputs and outputs read
from the file); and each way a network can be wrong is a clear error naming the file and
the field."""

from __future__ import annotations

import shutil
import sys

import pytest

from pipeline.engine import Pipeline
from pipeline.errors import ConfigError
from pipeline.rle import decode
from pipeline.tools.quantize import box_iou

from ..conftest import MODEL_REPOSITORY
from ..fakes import CLASSES, PIPELINE, fake_network_as, fake_repository, png, scene

FORMS = ("yolov5s_seg", "yolov5s_seg_onnx", "yolov5s_seg_openvino")


def pipeline_over(root, network: str, source=MODEL_REPOSITORY, name: str | None = None) -> str:
    """A pipeline model ``name`` in ``root`` like the source's default, over ``network``."""
    name = name or f"over_{network}"
    text = (source / PIPELINE / "config.pbtxt").read_text()
    text = text.replace(f'name: "{PIPELINE}"', f'name: "{name}"')
    network_line = next(ln for ln in text.splitlines() if 'key: "network"' in ln)
    text = text.replace(network_line, f'parameters {{ key: "network" value: {{ string_value: "{network}" }} }}')
    if "calibrate_batch_size" not in text:
        text += '\nparameters { key: "calibrate_batch_size" value: { string_value: "false" } }\n'
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "config.pbtxt").write_text(text)
    return name


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    """name -> Pipeline of the real model over each of its forms."""
    root = tmp_path_factory.mktemp("forms")
    for network in FORMS:
        assert (MODEL_REPOSITORY / network / "1").is_dir(), f"`make model` writes {network}"
        (root / network).symlink_to(MODEL_REPOSITORY / network)
    return {network: Pipeline.from_repository(root, model=pipeline_over(root, network), device="cpu")
            for network in FORMS}


def test_every_form_finds_what_torchscript_finds_on_every_photo(forms, samples):
    for name, rgb in samples.items():
        reference = forms["yolov5s_seg"].infer([rgb])[0]["predictions"]
        assert reference, name
        for network in FORMS[1:]:
            found = forms[network].infer([rgb])[0]["predictions"]
            assert len(found) == len(reference), (name, network)
            for p in reference:
                same = [q for q in found if q["class"] == p["class"]]
                best = max(same, key=lambda q: box_iou(p, q))
                assert box_iou(p, best) >= 0.99, (name, network, p["class"])
                a, b = decode(p["rle"])[0].astype(bool), decode(best["rle"])[0].astype(bool)
                assert (a & b).sum() / (a | b).sum() >= 0.99, (name, network, p["class"])


@pytest.fixture(scope="module")
def fake_forms(tmp_path_factory):
    root = fake_repository(tmp_path_factory.mktemp("fake_forms"))
    for form in ("onnx", "openvino"):
        fake_network_as(root / f"fake_{form}", form)  # config: name, runtime, batch bound only
        pipeline_over(root, f"fake_{form}", source=root)
    return root


@pytest.mark.parametrize("form", ["onnx", "openvino"])
def test_a_network_config_of_name_runtime_and_batch_bound_is_enough(fake_forms, form):
    picture = png(scene(240, 320, red=(20, 40, 100, 120), blue=(200, 100, 300, 200)))
    reference = Pipeline.from_repository(fake_forms, device="cpu").infer([picture])[0]
    pipe = Pipeline.from_repository(fake_forms, model=f"over_fake_{form}", device="cpu")
    assert pipe.class_names == CLASSES and pipe.info.stride == 32  # from the file's metadata
    config = pipe.network_entry.config
    assert [i.name for i in config.input] == ["images"] and {o.name for o in config.output} == {"pred", "proto"}
    found = pipe.infer([picture])[0]
    assert [(p["class"], p["rle"]) for p in found["predictions"]] == \
        [(p["class"], p["rle"]) for p in reference["predictions"]]


def broken(root, form: str, edit) -> object:
    """A copy of the fake ONNX or OpenVINO network broken by ``edit(folder)``."""
    folder = root / f"broken_{form}"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(root / f"fake_{form}", folder)
    (folder / "config.pbtxt").write_text((folder / "config.pbtxt").read_text().replace(
        f'name: "fake_{form}"', f'name: "broken_{form}"'))
    edit(folder)
    pipeline_over(root, f"broken_{form}", source=root)
    return folder


def declared(inputs: str, pred_dims: str = "[ -1, 40 ]"):
    def edit(folder):
        config = folder / "config.pbtxt"
        config.write_text(config.read_text() + f"""
input [ {{ name: "{inputs}", data_type: TYPE_FP32, dims: [ 3, -1, -1 ] }} ]
output [ {{ name: "pred", data_type: TYPE_FP32, dims: {pred_dims} }},
         {{ name: "proto", data_type: TYPE_FP32, dims: [ 32, -1, -1 ] }} ]
""")
    return edit


def corrupt(folder):
    model = next((folder / "1").glob("model.*"))
    model.write_bytes(b"this is no network" * 10)


def labelled(names: int):
    def edit(folder):
        config = folder / "config.pbtxt"
        config.write_text(config.read_text() + "\ninput [ { name: \"images\", data_type: TYPE_FP32, dims: [ 3, 320, 320 ] } ]\n"
                          "output [ { name: \"pred\", data_type: TYPE_FP32, dims: [ -1, 40 ], label_filename: \"labels.txt\" },\n"
                          "         { name: \"proto\", data_type: TYPE_FP32, dims: [ 32, -1, -1 ] } ]\n")
        (folder / "labels.txt").write_text("\n".join(f"c{i}" for i in range(names)) + "\n")
    return edit


@pytest.mark.parametrize("form", ["onnx", "openvino"])
@pytest.mark.parametrize("edit, words", [
    (corrupt, "not a loadable"),
    (declared("INPUT__0"), "field 'input[0].name': 'INPUT__0' is not in model"),
    (declared("images", "[ -1, 41 ]"), "field 'output[0].dims': pred [-1, 41] do not match"),
    (labelled(5), "fit no YOLO-seg head with 5 classes"),
], ids=["corrupt", "input name", "output dims", "no head"])
def test_a_network_that_does_not_fit_is_a_clear_error_naming_the_file(fake_forms, form, edit, words):
    folder = broken(fake_forms, form, edit)
    with pytest.raises(ConfigError) as info:
        Pipeline.from_repository(fake_forms, model=f"over_broken_{form}", device="cpu")
    assert folder.name in str(info.value) and words in str(info.value), str(info.value)


def test_a_missing_runtime_says_which_install_brings_it(fake_forms, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "pipeline.runners.onnx", raising=False)
    with pytest.raises(ConfigError, match=r"onnx models need the onnxruntime package.*rle-serving\[server\]"):
        Pipeline.from_repository(fake_forms, model="over_fake_onnx", device="cpu")


