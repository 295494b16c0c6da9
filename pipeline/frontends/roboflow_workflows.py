"""The one kind of Roboflow workflow this server runs, read and answered as Roboflow's are.

A workflow is accepted when it is a single instance-segmentation model step,
``roboflow_core/roboflow_instance_segmentation_model@v1`` (or its old names ``RoboflowInstance
SegmentationModel``, ``InstanceSegmentationModel``), ``@v2``, ``@v3`` or ``@v4``, on the
workflow's image input; ``model_id`` one of our models as ``<repository model>/<version>``
(as Roboflow's v0 and v1 routes take it, ``http_roboflow.repository_model``); outputs
``JsonField``s selecting the step's ``predictions``, ``inference_id``, ``model_id`` (v2 on) or
``*`` (all of them). A step's value may be a literal or ``$inputs.<name>`` of a
``WorkflowParameter`` (its ``workflows_parameters`` value, else its ``default_value``).
Anything else is a BadInputError (400) that says what is supported.

Parameters, with the block's own defaults: v1, v2 ``confidence`` (0.4); v3, v4
``confidence_mode`` "custom" with ``custom_confidence`` (0.4), or "best" / "default" (the
model's own threshold: this server has no F1-optimal one); every version ``iou_threshold``
(0.3), ``max_detections`` (300) and ``class_filter`` (class names kept). Roboflow's knobs we
do not have are accepted at their default values only (``class_agnostic_nms`` false,
``max_candidates`` 3000, ``mask_decode_mode`` "accurate": our masks are always exact,
``tradeoff_factor`` 0); ``disable_active_learning`` and ``active_learning_target_dataset``
are accepted and mean nothing here (no data leaves the server).

Masks as the block version gives them: v1 to v3 declare Roboflow's instance-segmentation kind,
which its server serialises as a polygon (``points``, the outer contour of the mask's largest
part: ``serialise_sv_detections``); v4 declares the RLE kind, serialised as ``rle_mask``
(COCO RLE ``{"size": [H, W], "counts": "..."}``, the exact mask: ``serialise_rle_sv_detections``).
So the SDK's own workflow (v2) gets polygons, and a client that wants exact masks asks for v4.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .. import rle, schema
from ..errors import BadInputError
from ..serving.state import ServingState
from .http_roboflow import repository_model

STEP_TYPE = re.compile(r"roboflow_core/roboflow_instance_segmentation_model@v([1-4])\Z")
V1_NAMES = ("RoboflowInstanceSegmentationModel", "InstanceSegmentationModel")
SUPPORTED = ("a workflow of one step, roboflow_core/roboflow_instance_segmentation_model@v1..v4, on "
             "the image input, its outputs JsonFields of $steps.<step>.predictions, .inference_id, "
             ".model_id or .*")
IMAGE_INPUTS = ("InferenceImage", "WorkflowImage")
PARAMETER_INPUTS = ("InferenceParameter", "WorkflowParameter")
VIDEO_METADATA_INPUTS = ("WorkflowVideoMetadata",)  # given to every frame by Roboflow; used by no step here
DEFAULTS = {"confidence": 0.4, "custom_confidence": 0.4, "iou_threshold": 0.3, "max_detections": 300}
# Roboflow's knobs this server does not have, accepted at the values that leave a result as ours is.
ONLY_DEFAULT = {"class_agnostic_nms": (False,), "max_candidates": (3000,), "mask_decode_mode": ("accurate",),
                "tradeoff_factor": (0,)}
MEANINGLESS = ("disable_active_learning", "active_learning_target_dataset")
STEP_FIELDS = {"type", "name", "images", "model_id", "iou_threshold", "max_detections", "class_filter",
               *ONLY_DEFAULT, *MEANINGLESS}
VERSION_FIELDS = {1: {"confidence"}, 2: {"confidence"}, 3: {"confidence_mode", "custom_confidence"},
                  4: {"confidence_mode", "custom_confidence"}}
STEP_OUTPUTS = {1: ("inference_id", "predictions"), 2: ("inference_id", "predictions", "model_id")}


@dataclass(frozen=True)
class Workflow:
    """A workflow as this server runs it.

    model: the repository's model; model_id: as the workflow named it; version: the block's
    (1-4); parameters: StreamSpec parameters (confidence, iou_threshold, max_detections; a
    confidence left out: the model's own); class_filter: the class names kept, or None for
    all; outputs: output name -> what of the step it selects ("predictions", "inference_id",
    "model_id" or "*")."""

    model: str
    model_id: str
    version: int
    parameters: Mapping[str, float]
    class_filter: tuple[str, ...] | None
    outputs: Mapping[str, str]

    @classmethod
    def read(cls, spec: Any, state: ServingState, *, image_input: str = "image",
             values: Mapping[str, Any] | None = None) -> Workflow:
        """``spec``: the workflow specification; ``image_input``: the input the frames go to;
        ``values``: ``workflows_parameters``."""
        if not isinstance(spec, Mapping):
            raise BadInputError(f"workflow_specification must be an object: {SUPPORTED}")
        inputs = _inputs(spec.get("inputs"), image_input, values or {})
        steps = spec.get("steps")
        if not isinstance(steps, list) or len(steps) != 1 or not isinstance(steps[0], Mapping):
            count = len(steps) if isinstance(steps, list) else "no"
            raise BadInputError(f"this server runs {SUPPORTED}; this workflow has {count} steps")
        step = steps[0]
        version = _version(step.get("type"))
        unknown = sorted(set(step) - STEP_FIELDS - VERSION_FIELDS[version])
        if unknown:
            raise BadInputError(f"step field(s) {unknown} are not supported by this server (known: "
                                f"{sorted(STEP_FIELDS | VERSION_FIELDS[version])}")
        if step.get("images") != f"$inputs.{image_input}":
            raise BadInputError(f"the step's images must be the image input, '$inputs.{image_input}', "
                                f"got {step.get('images')!r}")

        def value(key: str, default: Any = None) -> Any:
            given = step.get(key, default)
            if isinstance(given, str) and given.startswith("$inputs."):
                name = given[len("$inputs."):]
                if name not in inputs:
                    raise BadInputError(f"step field {key!r} names {given!r}, which is no parameter input "
                                        "with a value (workflows_parameters or default_value)")
                return inputs[name]
            return given

        model_id = value("model_id")
        model = repository_model(state, model_id)
        for key, accepted in ONLY_DEFAULT.items():
            if value(key) not in (None, *accepted):
                raise BadInputError(f"step field {key!r} is supported only at Roboflow's default "
                                    f"{accepted[0]!r}, got {value(key)!r}")
        parameters = {key: value(key, DEFAULTS[key]) for key in ("iou_threshold", "max_detections")}
        confidence = _confidence(version, value)
        if confidence is not None:
            parameters["confidence"] = confidence
        class_filter = value("class_filter")
        if class_filter is not None and (not isinstance(class_filter, list)
                                         or not all(isinstance(c, str) for c in class_filter)):
            raise BadInputError(f"class_filter must be a list of class names, got {class_filter!r}")
        outputs = _outputs(spec.get("outputs"), step.get("name"), STEP_OUTPUTS.get(version, STEP_OUTPUTS[2]))
        return cls(model, model_id, version, parameters,
                   None if class_filter is None else tuple(class_filter), outputs)

    def outputs_of(self, message: bytes, excluded: frozenset[str] = frozenset()) -> dict:
        """One frame's outputs, by the workflow's output names (those in ``excluded`` left
        out), from its stream's message (``streams.CameraCall``: Roboflow's document, masks
        as ``rle``). CPU work (polygons are traced): call it off the event loop."""
        doc = json.loads(message)
        step = {"inference_id": str(uuid.uuid4()), "predictions": self._detections(doc), "model_id": self.model_id}
        if self.version == 1:
            del step["model_id"]
        return {name: (dict(step) if part == "*" else step[part])
                for name, part in self.outputs.items() if name not in excluded}

    def _detections(self, doc: dict) -> dict:
        """``doc``'s predictions as Roboflow's workflows serialise a block's detections
        (``serialise_sv_detections``, or ``serialise_rle_sv_detections`` for v4)."""
        out = []
        for p in doc["predictions"]:
            if self.class_filter is not None and p["class"] not in self.class_filter:
                continue
            detection = {key: p[key] for key in ("width", "height", "x", "y", "confidence", "class_id")}
            if self.version == 4:
                detection["rle_mask"] = p["rle"]
            else:
                size, runs = rle.parse(p["rle"])
                box = (p["x"] - p["width"] / 2, p["y"] - p["height"] / 2,
                       p["x"] + p["width"] / 2, p["y"] + p["height"] / 2)
                detection["points"] = schema.outline(runs, size, box)
            if "tracker_id" in p:
                detection["tracker_id"] = p["tracker_id"]
            detection["class"] = p["class"]
            detection["detection_id"] = p["detection_id"]
            out.append(detection)
        return {"image": doc["image"], "predictions": out}


def _version(step_type: Any) -> int:
    if step_type in V1_NAMES:
        return 1
    match = STEP_TYPE.match(step_type) if isinstance(step_type, str) else None
    if match is None:
        raise BadInputError(f"step type {step_type!r} is not supported: this server runs {SUPPORTED}")
    return int(match.group(1))


def _inputs(inputs: Any, image_input: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The parameter inputs' values, once the inputs are the image input (named
    ``image_input``), parameters and video metadata."""
    if not isinstance(inputs, list) or not all(isinstance(i, Mapping) for i in inputs):
        raise BadInputError(f"the workflow's inputs must be a list of objects: {SUPPORTED}")
    images = [i.get("name") for i in inputs if i.get("type") in IMAGE_INPUTS]
    if images != [image_input]:
        raise BadInputError(f"the workflow must have one image input (InferenceImage or WorkflowImage) "
                            f"named {image_input!r} (image_input_name), got {images}")
    found = {}
    for i in inputs:
        if i.get("type") in PARAMETER_INPUTS:
            name = i.get("name")
            if name in values:
                found[name] = values[name]
            elif i.get("default_value") is not None:
                found[name] = i["default_value"]
        elif i.get("type") not in IMAGE_INPUTS + VIDEO_METADATA_INPUTS:
            raise BadInputError(f"input type {i.get('type')!r} is not supported (inputs: "
                                f"{', '.join(IMAGE_INPUTS + PARAMETER_INPUTS + VIDEO_METADATA_INPUTS)})")
    return found


def _confidence(version: int, value) -> Any:
    """The step's confidence threshold, or None for the model's own."""
    if version <= 2:
        return value("confidence", DEFAULTS["confidence"])
    mode = value("confidence_mode", "best")
    if mode == "custom":
        return value("custom_confidence", DEFAULTS["custom_confidence"])
    if mode in ("best", "default"):
        return None
    raise BadInputError(f"confidence_mode must be 'best', 'default' or 'custom', got {mode!r}")


def _outputs(outputs: Any, step_name: Any, parts: tuple[str, ...]) -> dict[str, str]:
    if not isinstance(outputs, list) or not outputs or not all(isinstance(o, Mapping) for o in outputs):
        raise BadInputError(f"the workflow's outputs must be a list of JsonFields: {SUPPORTED}")
    found: dict[str, str] = {}
    for output in outputs:
        name, selector = output.get("name"), output.get("selector")
        if output.get("type") != "JsonField" or not isinstance(name, str) or not isinstance(selector, str):
            raise BadInputError(f"output {output!r} is not supported: outputs are JsonFields with a name "
                                "and a selector")
        prefix = f"$steps.{step_name}."
        part = selector[len(prefix):] if selector.startswith(prefix) else None
        if part not in (*parts, "*"):
            raise BadInputError(f"output {name!r} selects {selector!r}; this server's outputs select "
                                f"{', '.join(prefix + p for p in (*parts, '*'))}")
        if name in found:
            raise BadInputError(f"two outputs are named {name!r}")
        found[name] = part
    return found
