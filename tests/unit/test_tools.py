"""The set-up tools' decisions: which runtime `make model` points the pipeline at, and how the
INT8 pipeline's agreement with FP32 is counted."""

from __future__ import annotations

from pipeline.tools.quantize import agreement
from pipeline.tools.runtimes import fastest, point_pipeline_at


def timings(**ms):
    return {name: {("square", 1): a, ("16:9", 1): b} for name, (a, b) in ms.items()}


def test_the_fastest_form_wins_by_more_than_the_margin_or_the_current_one_stays():
    measured = timings(ts=(140, 90), onnx=(130, 80), openvino=(150, 95))
    assert fastest(measured, "ts") == "onnx"  # 8% faster
    assert fastest(timings(ts=(140, 90), onnx=(136, 88)), "ts") == "ts"  # 2.6%: noise
    assert fastest(measured, None) == "onnx"


def test_pointing_the_pipeline_rewrites_its_network_and_nothing_else(tmp_path):
    config = tmp_path / "config.pbtxt"
    text = ('name: "p"\nparameters { key: "network" value: { string_value: "net" } }\n'
            'parameters { key: "confidence" value: { string_value: "0.25" } }\n')
    config.write_text(text)
    assert point_pipeline_at(config, "net_onnx") is True
    assert config.read_text() == text.replace('"net"', '"net_onnx"')
    assert point_pipeline_at(config, "net_onnx") is False


def prediction(cls, x, y, w, h, counts="0"):
    return {"class": cls, "x": x, "y": y, "width": w, "height": h, "confidence": 0.9,
            "rle": {"size": [4, 4], "counts": counts}}


def test_agreement_counts_matches_by_class_and_box_and_measures_their_masks():
    full, half = [0, 16], [0, 8, 8]
    reference = [{"predictions": [prediction("cat", 2, 2, 4, 4, full), prediction("dog", 2, 2, 4, 4, full),
                                  dict(prediction("cup", 2, 2, 4, 4), confidence=0.3)]}]
    candidate = [{"predictions": [prediction("cat", 2, 2, 4, 4, half), prediction("dog", 3, 2, 4, 4, full)]}]
    wanted, matched, ious = agreement(reference, candidate)
    assert (wanted, matched, ious) == (2, 1, [0.5])  # the cup is under 0.5; the dog's box IoU is 0.6


def test_an_int8_config_names_itself_and_openvinos_file_whatever_its_source_was():
    from pipeline.tools.quantize import int8_config

    source = ('name: "yolo26_onnx"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
              'default_model_filename: "yolo26n-seg.onnx"\n')
    config = int8_config(source, "yolo26_onnx", "yolo26_int8")
    assert 'name: "yolo26_int8"' in config and 'backend: "openvino"' in config
    assert "platform" not in config and "default_model_filename" not in config
    assert "max_batch_size: 8" in config
