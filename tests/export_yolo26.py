"""Export an untrained YOLO26n-seg (ultralytics' own yaml: no weights, no download) NMS-free
("end2end") to ONNX and OpenVINO IR, the way its users export theirs, and write ultralytics' own
``predict()`` on the same weights as the reference for the YOLO26 head's tests.

    .venv-ultralytics/bin/python tests/export_yolo26.py OUT_FOLDER

Reads OUT_FOLDER/reference-images/ (``python -m tests.reference_images``). Writes
OUT_FOLDER/yolo26n-seg.onnx (dynamic batch and size), yolo26n-seg_openvino_model/ (ultralytics'
OpenVINO export, its metadata in model.xml's rt_info), yolo26n-seg-reference.json (per image:
its size and predict()'s top 30), yolo26n-seg-raw.npz (one image's letterboxed input and the
ONNX file's raw outputs, for decoding tests on real tensors) and, last, yolo26n-seg.json
(shapes, what predict() does, and how the weights were made). Runs in .venv-ultralytics (AGPL:
never imported by the package or its tests)."""

import json
import os
import shutil
import sys
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime  # noqa: E402
import pycocotools.mask  # noqa: E402
import torch  # noqa: E402
from ultralytics import YOLO  # noqa: E402
from ultralytics.data.augment import LetterBox  # noqa: E402

SEED = 0
TOP = 30
SIZE = 640
NAME = "yolo26n-seg"
RAW_IMAGE = "bus.jpg"
# ultralytics' own random init is degenerate: every Conv+BN+SiLU shrinks its input ~8x (BN's
# running statistics are the untrained mean 0, variance 1), so the head sees ~1e-8 and every
# score is sigmoid(class bias) = 0.00016, one value, class 0, boxes a grid. BatchNorm's running
# statistics are therefore recomputed (momentum None: a plain average) from one train-mode pass
# over the reference images' letterboxes; no weight is changed.
CALIBRATION = ("BatchNorm2d running_mean/var reset, momentum=None, one train-mode forward of the "
               f"reference images letterboxed to {SIZE} (RGB / 255), then eval(); weights untouched")


def letterboxed(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The image as predict() feeds it: (BGR as read, (1, 3, SIZE, SIZE) float32 RGB / 255)."""
    bgr = cv2.imread(str(path))
    padded = LetterBox((SIZE, SIZE))(image=bgr)
    return bgr, (padded[..., ::-1].transpose(2, 0, 1)[None] / np.float32(255)).astype(np.float32)


def images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in (".jpg", ".png"))


def build(folder: Path) -> YOLO:
    torch.manual_seed(SEED)
    model = YOLO(f"{NAME}.yaml")
    net = model.model
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    batch = torch.from_numpy(np.concatenate([letterboxed(p)[1] for p in images(folder)]))
    net.train()
    with torch.no_grad():
        net(batch)
    net.eval()
    return model


def untrained_summary(folder: Path) -> dict:
    """What predict() gives with ultralytics' init as it is, on the first reference image."""
    torch.manual_seed(SEED)
    path = images(folder)[0]
    boxes = YOLO(f"{NAME}.yaml").predict(str(path), conf=0.0, nms=False, rect=False, imgsz=SIZE,
                                         verbose=False)[0].boxes
    return {"image": path.name, "detections": len(boxes),
            "distinct_scores": len(np.unique(boxes.conf.numpy())),
            "score_range": [float(boxes.conf.min()), float(boxes.conf.max())],
            "distinct_classes": len(np.unique(boxes.cls.numpy()))}


def rle(mask: np.ndarray) -> dict:
    """COCO RLE of a full-image (H, W) mask, counts as str (pycocotools' own encoder)."""
    encoded = pycocotools.mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def reference(model: YOLO, folder: Path) -> dict:
    out = {}
    for path in images(folder):
        # nms=False: the one-to-one head, as exported; rect=False: the square letterbox the exported
        # file is fed (predict's default, rect=True, pads only to a multiple of 32 for a .pt or a
        # dynamic export); retina_masks: masks at the image's size.
        found = model.predict(str(path), conf=0.0, nms=False, rect=False, imgsz=SIZE, retina_masks=True,
                              verbose=False)[0]
        boxes, masks = found.boxes, found.masks.data.numpy()
        scores = boxes.conf.numpy().astype(np.float64)
        logits = np.log(scores / (1.0 - scores))
        height, width = found.orig_shape
        out[path.name] = {
            "width": int(width),
            "height": int(height),
            # Rows predict() kept of the 300 (it drops rows whose cropped mask is empty).
            "rows_kept": len(boxes),
            "min_logit_gap_top31": float(np.min(logits[:TOP] - logits[1 : TOP + 1])),
            "detections": [
                {"class_id": int(boxes.cls[i]), "score": float(boxes.conf[i]),
                 "box": [float(v) for v in boxes.xyxy[i]], "mask": rle(masks[i])}
                for i in range(min(TOP, len(boxes)))
            ],
        }
    return out


def export(model: YOLO, form: str, out: Path) -> Path:
    # nms=False is ultralytics' current spelling of end2end=True (which it warns is deprecated).
    exported = Path(model.export(format=form, nms=False, dynamic=True, imgsz=SIZE))
    if exported.parent != out:
        shutil.move(str(exported), out / exported.name)
    return out / exported.name


def openvino_summary(folder: Path) -> dict:
    import openvino

    model = openvino.Core().read_model(str(folder / f"{NAME}.xml"))
    info = model.get_rt_info()["model_info"]
    return {
        "what": "ultralytics' own OpenVINO export of the same weights (torch -> OpenVINO directly, FP32), "
                "metadata.yaml beside it",
        # Its outputs carry no names (the ONNX file's are output0, output1): take them by index.
        "inputs": [{"names": sorted(p.get_names()), "shape": str(p.get_partial_shape())} for p in model.inputs],
        "outputs": [{"index": i, "names": sorted(p.get_names()), "shape": str(p.get_partial_shape())}
                    for i, p in enumerate(model.outputs)],
        "rt_info model_info": {key: info[key].astype(str) for key in info},
    }


def shapes(session: onnxruntime.InferenceSession, runs: list[np.ndarray]) -> dict:
    return {
        "inputs": [{"name": i.name, "declared_shape": i.shape} for i in session.get_inputs()],
        "outputs": [{"name": o.name, "declared_shape": o.shape, "shape_at_batch_2": list(r.shape)}
                    for o, r in zip(session.get_outputs(), runs)],
        "metadata_props": session.get_modelmeta().custom_metadata_map,
    }


PREPROCESS = {
    "source": "ultralytics 8.4.190 engine/predictor.py pre_transform + data/augment.py LetterBox",
    "read": "cv2.imread (BGR), converted to RGB after the letterbox",
    "letterbox": f"r = min({SIZE}/h, {SIZE}/w) (scale up allowed); new size (round(w*r), round(h*r)); "
                 "cv2.resize INTER_LINEAR (no antialias); padding (SIZE - new) / 2 each side, "
                 "top = round(dh - 0.1), bottom = round(dh + 0.1) (same for left/right); pad value "
                 f"114; square {SIZE} x {SIZE} as the reference was made (rect=False). NB predict()'s own "
                 "default is rect=True: for a .pt or a dynamic export it pads only up to a multiple of 32 "
                 f"(bus.jpg 810x1080 -> 480x{SIZE} input, not {SIZE}x{SIZE})",
    "scale": "/ 255, no mean/std",
    "layout": "NCHW float32 RGB",
}
POSTPROCESS = {
    "source": "ultralytics 8.4.190 utils/nms.py non_max_suppression(end2end=True), "
              "models/yolo/segment/predict.py, utils/ops.py",
    "rows": "output0 [B, 300, 38] = x1, y1, x2, y2 (letterboxed input pixels), score (already "
            "sigmoid), class id (0-based, as a float), 32 mask coefficients; rows come ranked by "
            "score (the head's top-k over anchors x classes); no NMS",
    "threshold": "score > conf (strict), then the first max_det rows (300)",
    "boxes": "minus the padding (left, top), divided by r, clipped to the image",
    "masks (retina_masks=True, the reference)": "coefficients @ prototypes output1 [B, 32, 160, 160] -> "
        "160 x 160 logits (ops.process_mask_native); upsampled bilinear (align_corners=False) by f in "
        "{1, 2, 4}, the smallest that puts the letterbox padding on whole pixels (f = 4 // gcd(4, pad "
        "| pad // 2), pad = (640 - round(H*g)) | (640 - round(W*g)), g = min(640/H, 640/W)); the "
        "padding cropped at that size (ops.scale_masks: top = round(pad_h - 0.1), left = round(pad_w - "
        "0.1), extent round(H*g'), round(W*g'), g' = min(160f/H, 160f/W)); resized bilinear to the "
        "image's H x W; > 0; then zeroed outside the box (pixel columns x1 <= x < x2, rows y1 <= y < "
        "y2, box in image pixels); rows whose mask is then empty are DROPPED from the result",
    "masks (retina_masks=False, predict's default)": "the same at the letterboxed input's 640 x 640 "
        "(upsample to 640, > 0, crop to the box in input pixels), not in image pixels",
    "class_ids": "0-based COCO-80 index as the row gives it: no shift",
}


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    folder = out / "reference-images"
    os.chdir(out)  # ultralytics writes beside the working folder
    untrained = untrained_summary(folder)
    model = build(folder)
    onnx_file = export(model, "onnx", out)
    openvino_folder = export(model, "openvino", out)

    (out / f"{NAME}-reference.json").write_text(json.dumps(reference(model, folder), indent=1) + "\n")
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    bgr, raw_input = letterboxed(folder / RAW_IMAGE)
    raw = session.run(None, {session.get_inputs()[0].name: raw_input})
    np.savez_compressed(out / f"{NAME}-raw.npz", input=raw_input, output0=raw[0], output1=raw[1],
                        image_height=bgr.shape[0], image_width=bgr.shape[1])
    pair = session.run(None, {session.get_inputs()[0].name: np.concatenate([raw_input, raw_input])})

    summary = {
        "model": f"YOLO26n-seg, ultralytics' YOLO('{NAME}.yaml') (untrained), exported with nms=False",
        "versions": {name: version(name) for name in ("ultralytics", "torch", "onnx", "openvino")},
        "seed": SEED,
        "untrained_predict": untrained,
        "calibration": CALIBRATION,
        "input_size": SIZE,
        "files": {
            onnx_file.name: shapes(session, pair),
            openvino_folder.name: openvino_summary(openvino_folder),
            f"{NAME}-raw.npz": f"{RAW_IMAGE}: input (1, 3, {SIZE}, {SIZE}) float32 as predict() letterboxes "
                               "it, output0 and output1 from onnxruntime on it, image_height, image_width",
        },
        "reference": f"{NAME}-reference.json: per image file name: width, height, rows_kept, "
                     f"min_logit_gap_top31, detections = predict(conf=0.0, nms=False, rect=False, retina_masks=True)'s "
                     f"first {TOP} rows: class_id, score, box [x1, y1, x2, y2] image pixels, mask COCO RLE",
        "preprocess": PREPROCESS,
        "postprocess": POSTPROCESS,
    }
    (out / f"{NAME}.json").write_text(json.dumps(summary, indent=1) + "\n")  # last: the make target
    print(json.dumps(summary["files"], indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
