"""Reading Roboflow workflows (``frontends.roboflow_workflows``): the one shape we run, its
parameters by block version, and a 400 for the rest. The model lookup is a fake."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import BadInputError, NotFoundError
from pipeline.frontends.roboflow_workflows import Workflow


class Served:
    """ServingState's lookup, for one model: instance_segmentation, version 1."""

    def lookup(self, name, version=""):
        if (name, version) != ("instance_segmentation", "1"):
            raise NotFoundError(f"no model {name!r} version {version!r}")


def spec(step_type="roboflow_core/roboflow_instance_segmentation_model@v2", inputs=(), outputs=None, **step):
    return {"version": "1.0", "inputs": [{"type": "InferenceImage", "name": "image"}, *inputs],
            "steps": [{"type": step_type, "name": "model", "images": "$inputs.image",
                       "model_id": "instance_segmentation/1", **step}],
            "outputs": outputs or [{"type": "JsonField", "name": "predictions", "selector": "$steps.model.predictions"}]}


def test_v1_under_its_old_name_with_the_blocks_defaults():
    workflow = Workflow.read(spec("RoboflowInstanceSegmentationModel"), Served())
    assert (workflow.model, workflow.version, workflow.class_filter) == ("instance_segmentation", 1, None)
    assert workflow.parameters == {"confidence": 0.4, "iou_threshold": 0.3, "max_detections": 300}


def test_parameters_from_inputs_and_confidence_modes():
    inputs = [{"type": "WorkflowParameter", "name": "conf", "default_value": 0.7},
              {"type": "WorkflowParameter", "name": "model"}]
    workflow = Workflow.read(spec("roboflow_core/roboflow_instance_segmentation_model@v3", inputs,
                                  confidence_mode="custom", custom_confidence="$inputs.conf", model_id="$inputs.model"),
                             Served(), values={"model": "instance_segmentation/1"})
    assert workflow.parameters["confidence"] == 0.7 and workflow.model_id == "instance_segmentation/1"
    best = Workflow.read(spec("roboflow_core/roboflow_instance_segmentation_model@v4"), Served())
    assert "confidence" not in best.parameters  # "best": the model's own threshold
    with pytest.raises(BadInputError, match="no parameter input"):
        Workflow.read(spec(confidence="$inputs.missing"), Served())


def test_outputs_by_name_class_filter_and_masks_per_version():
    message = json.dumps({"stream_id": "s", "frame_index": 0, "timestamp": 0.0, "image": {"width": 4, "height": 3},
                          "predictions": [
                              {"x": 1.5, "y": 1.5, "width": 1.0, "height": 1.0, "confidence": 0.9, "class": "red",
                               "class_id": 0, "detection_id": "a", "rle": {"size": [3, 4], "counts": "417"},
                               "mask_format": "rle"},
                              {"x": 1.0, "y": 1.0, "width": 2.0, "height": 2.0, "confidence": 0.8, "class": "blue",
                               "class_id": 2, "detection_id": "b", "rle": {"size": [3, 4], "counts": "417"},
                               "mask_format": "rle"}]}).encode()
    outputs = [{"type": "JsonField", "name": "all", "selector": "$steps.model.*"},
               {"type": "JsonField", "name": "id", "selector": "$steps.model.inference_id"}]
    v2 = Workflow.read(spec(outputs=outputs, class_filter=["red"]), Served())
    out = v2.outputs_of(message)
    assert set(out) == {"all", "id"} and set(out["all"]) == {"inference_id", "predictions", "model_id"}
    (red,) = out["all"]["predictions"]["predictions"]
    assert red["class"] == "red" and red["points"] == [{"x": 1.0, "y": 1.0}] and "rle_mask" not in red
    assert set(v2.outputs_of(message, frozenset({"all"}))) == {"id"}
    v4 = Workflow.read(spec("roboflow_core/roboflow_instance_segmentation_model@v4", outputs=outputs), Served())
    masks = [p["rle_mask"] for p in v4.outputs_of(message)["all"]["predictions"]["predictions"]]
    assert masks == [{"size": [3, 4], "counts": "417"}] * 2


@pytest.mark.parametrize(("workflow", "words"), [
    ({"steps": []}, "one step"),
    (spec(images="$inputs.other"), "the image input"),
    (spec(mask_decode_mode="fast"), "mask_decode_mode"),
    (spec(unknown_knob=1), "unknown_knob"),
    (spec(confidence_mode="custom"), "confidence_mode"),  # v2 has confidence, not modes
    (spec(outputs=[{"type": "JsonField", "name": "a", "selector": "$steps.other.predictions"}]), "selects"),
    (spec(inputs=[{"type": "WorkflowBatchInput", "name": "x"}]), "input type"),
])
def test_other_workflows_are_refused_saying_what_is_supported(workflow, words):
    with pytest.raises(BadInputError, match=words):
        Workflow.read(workflow, Served())
