"""Network families' heads: what turns a batch's network outputs into the detections each
image keeps, and how the family's images are prepared.

Vocabulary:

- **outputs**: a batch's network outputs as torch tensors, by name (the file's names; a file
  that names none gives ``output0``, ``output1``, ... in its order);
- **head**: a family's decoder, ``select(outputs, options, input_hw) -> Kept``
  (``postprocess.Kept``: boxes in input pixels, scores, class ids, ``MaskLogits``), with its
  ``name`` and ``num_classes``;
- **family defaults**: the ``Preprocess`` a family's networks expect, before the file's
  metadata and config.pbtxt's ``parameters`` say otherwise (``preprocess_for``).

The heads, one module each (``HEADS``):

- ``yolo`` (YOLOv5/v7-seg, YOLOv8/11-seg): dense candidates, class-aware NMS, prototype
  masks cut to their boxes;
- ``yolo_end2end`` (YOLO26-seg): at most N ranked rows, no NMS, prototype masks cut to boxes;
- ``detr`` (RF-DETR-Seg, and the same layout from other exporters): top-k over every query's
  sigmoid class scores, normalised boxes, a mask per query over the whole image.

Which head a network has is read from its outputs' shapes and names (``find_head``);
config.pbtxt's ``parameters.head`` decides where they cannot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from ..errors import ConfigError
from ..images import RESIZES, Preprocess
from ..postprocess import Kept, PostprocessOptions

HEADS = ("yolo", "yolo_end2end", "detr")
# Older names of ``yolo``'s two layouts, still taken in parameters.head.
LAYOUTS = {"yolov5": "yolo", "yolov8": "yolo"}
# The conventional input of a family whose file says nothing: ultralytics' default scale
# and stride.
DEFAULT_SCALE, DEFAULT_STRIDE = 640, 32
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "yolo": {"resize": "letterbox", "pad_value": 114.0},
    "detr": {"resize": "stretch", "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
}
PREPROCESS_PARAMETERS = ("resize", "mean", "std", "pad_value", "input_scale", "stride")


class Head(Protocol):
    name: str
    num_classes: int

    def select(self, outputs: Mapping[str, Any], options: Sequence[PostprocessOptions],
               input_hw: tuple[int, int]) -> Kept:
        """The detections each image keeps, best first (see ``postprocess.Kept``)."""


def family_of(output_count: int, declared: str | None, where) -> str:
    """The family a network belongs to before it has run (which input it wants): config's
    ``head``, else three outputs (boxes, class logits, masks) are a DETR's, two a YOLO's."""
    if declared is not None:
        name = _declared(declared, where)
        return "detr" if name == "detr" else "yolo"
    return "detr" if output_count == 3 else "yolo"


def _declared(declared: str, where) -> str:
    name = LAYOUTS.get(declared, declared)
    if name not in HEADS:
        raise ConfigError(f"{where}: field 'parameters.head': {declared!r} is not a head we know "
                          f"(use one of: {', '.join(HEADS)})")
    return name


def find_head(shapes: Mapping[str, Sequence[int]], num_classes: int | None, declared: str | None,
              where, end2end: bool = False) -> Head:
    """The head of a network from its outputs' shapes by name (batch dimension first).

    num_classes: from the class names, when known. declared: config.pbtxt's ``head``
    parameter, if any. end2end: the file's metadata says its rows are ranked already
    (ultralytics' ``end2end``). ConfigError naming the file and the shapes when they fit no
    head."""
    from . import detr, yolo, yolo_end2end

    name = _declared(declared, where) if declared is not None else None
    ranks = sorted(len(s) for s in shapes.values())
    if name == "detr" or (name is None and ranks == [3, 3, 4]):
        return detr.find(shapes, num_classes, where)
    if ranks == [3, 4]:
        if name == "yolo_end2end" or (name is None and (end2end or yolo_end2end.fits(shapes))):
            return yolo_end2end.find(shapes, num_classes, where)
        return yolo.find(shapes, num_classes, declared, where)
    described = ", ".join(f"{k} {list(v)}" for k, v in shapes.items())
    raise ConfigError(
        f"{where}: outputs {described} fit no head we know: yolo (detections (B, A, 5 + C + M) "
        "or (B, 4 + C + M, A) and prototypes (B, M, h, w)), yolo_end2end ((B, N, 6 + M) and "
        "prototypes), detr (boxes (B, Q, 4), class logits (B, Q, C), masks (B, Q, h, w))")


def preprocess_for(family: str, params: Mapping[str, str], meta_size: int | None,
                   meta_stride: int | None, dims: Sequence[int], where) -> tuple[Preprocess, list[str]]:
    """A network's Preprocess and what set each part (for the load log).

    family: ``family_of``. params: config.pbtxt's parameters (``PREPROCESS_PARAMETERS``
    override everything). meta_size, meta_stride: from the file's metadata. dims: the input's
    declared (3, h, w), -1 for any size."""
    said: list[str] = []
    values: dict[str, Any] = dict(FAMILY_DEFAULTS[family])
    fixed = len(dims) == 3 and dims[1] > 0 and dims[1] == dims[2]
    if fixed:
        size, stride = int(dims[1]), None
        said.append(f"scale {size} from the input's dims")
    elif meta_size and meta_stride:
        size, stride = meta_size, meta_stride
        said.append(f"scale {size}, stride {stride} from the file's metadata")
    else:
        size, stride = DEFAULT_SCALE, DEFAULT_STRIDE
        said.append(f"scale {size}, stride {stride}: the {family} family's defaults, as the "
                    "file says neither (config parameters input_scale and stride override them)")
    if params.get("input_scale") is not None:
        size = _whole(params, "input_scale", where)
    if params.get("stride") is not None:
        stride = _whole(params, "stride", where) or None
    for key in ("resize", "mean", "std", "pad_value"):
        if params.get(key) is not None:
            values[key] = _parameter(params, key, where)
    if any(params.get(k) is not None for k in PREPROCESS_PARAMETERS):
        said.append("config parameters " + ", ".join(k for k in PREPROCESS_PARAMETERS
                                                       if params.get(k) is not None))
    if values["resize"] == "stretch":
        stride = None
    if fixed and (size != dims[1] or stride):
        raise ConfigError(f"{where}: field 'parameters': the input's dims {list(dims)} fix its "
                          f"size; input_scale {size} and stride {stride} cannot change it")
    return Preprocess(size, stride, **values), said


def _whole(params: Mapping[str, str], key: str, where) -> int:
    try:
        value = int(params[key])
    except ValueError:
        raise ConfigError(f"{where}: field 'parameters.{key}': {params[key]!r} is not a whole "
                          "number") from None
    if value < 0 or (key == "input_scale" and value < 32):
        raise ConfigError(f"{where}: field 'parameters.{key}': {value} is too small")
    return value


def _parameter(params: Mapping[str, str], key: str, where) -> Any:
    text = params[key].strip()
    bad = ConfigError(f"{where}: field 'parameters.{key}': {text!r} is not "
                      + {"resize": f"one of {', '.join(RESIZES)}",
                         "pad_value": "a pixel value in [0, 255]"}.get(key, "three numbers (R, G, B)"))
    if key == "resize":
        if text not in RESIZES:
            raise bad
        return text
    try:
        numbers = [float(v) for v in text.strip("[]()").replace(",", " ").split()]
    except ValueError:
        raise bad from None
    if key == "pad_value":
        if len(numbers) != 1 or not 0 <= numbers[0] <= 255:
            raise bad
        return numbers[0]
    if len(numbers) != 3 or (key == "std" and min(numbers) <= 0):
        raise bad
    return tuple(numbers)
