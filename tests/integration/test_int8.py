"""INT8, opt-in: `make model-int8` puts ``instance_segmentation_int8`` beside the default
pipeline, and a client picks it by model name, as in Triton. On photos it was not calibrated
on it finds what FP32 finds (the issue's goals: >= 90% of FP32's detections of confidence
>= 0.5 matched by class with box IoU >= 0.8, median mask IoU of the pairs >= 0.9)."""

from __future__ import annotations

import json
import statistics

import numpy as np
import tritonclient.grpc as triton

from pipeline.tools.quantize import agreement, evaluation_images

from ..conftest import MODEL_REPOSITORY

INT8 = "instance_segmentation_int8"


def documents(client, model: str, images) -> list[dict]:
    out = []
    for rgb in images:
        tensor = triton.InferInput("IMAGE", [1, *rgb.shape], "UINT8")
        tensor.set_data_from_numpy(np.ascontiguousarray(rgb[None]))
        out.append(json.loads(client.infer(model, [tensor]).as_numpy("DETECTIONS")[0, 0]))
    return out


def test_the_int8_pipeline_is_served_by_name_and_finds_what_fp32_finds(real_server):
    assert (MODEL_REPOSITORY / INT8 / "config.pbtxt").is_file(), "`make model-int8` writes it"
    client = triton.InferenceServerClient(real_server.address)
    assert client.is_model_ready(INT8) and client.is_model_ready("instance_segmentation")
    network = client.get_model_config(INT8).config.parameters["network"].string_value
    assert network.endswith("_int8")
    images = list(evaluation_images().values())
    fp32, int8 = documents(client, "instance_segmentation", images), documents(client, INT8, images)
    client.close()
    wanted, matched, mask_ious = agreement(fp32, int8)
    assert wanted >= 15 and matched >= 0.9 * wanted, (matched, wanted)
    assert statistics.median(mask_ious) >= 0.9
