"""Export an RF-DETR-Seg-Nano with seeded random weights (rfdetr's own model: no weights, no
download) to ONNX and OpenVINO IR, and write rfdetr's own ``predict()`` on the same weights as
the reference the DETR head's tests compare our server with.

    .venv-rfdetr/bin/python tests/export_rfdetr.py OUT_FOLDER

Reads OUT_FOLDER/reference-images/ (written by ``python -m tests.reference_images``). Writes
OUT_FOLDER/rfdetr-seg-nano.onnx (dynamic batch), rfdetr-seg-nano-b1.onnx (batch 1),
rfdetr-seg-nano_openvino/model.xml (``openvino.convert_model`` of the dynamic ONNX, as a user
runs it), rfdetr-seg-nano-reference.json (per image: its size and predict()'s top 30) and,
last, rfdetr-seg-nano.json (resolution, inputs, outputs, class-id convention, and what
predict() does before and after the network, read from rfdetr's source)."""

import json
import os
import sys
from importlib.metadata import version
from pathlib import Path

# No hub at run time: rfdetr builds the backbone from its own config (patch size 12, so no
# DINOv2 weights are asked for) and pretrain_weights=None skips its weight download; these
# switches make any other transformers/hub look-up fail instead of fetching.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnxruntime  # noqa: E402
import openvino  # noqa: E402
import pycocotools.mask  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from rfdetr import RFDETRSegNano  # noqa: E402

SEED = 0
TOP = 30
NAME = "rfdetr-seg-nano"
# Random init leaves the heads degenerate for a comparison: class_embed's bias is one constant
# (focal-loss prior 0.01, every logit ~ -4.6, weights std 0.036), so scores sit in 0.05-0.07 with
# neighbours 3e-6 apart, and bbox_embed's last layer is zero, so every box is its two-stage
# proposal (5% of the image each way). A seeded re-draw of those two layers (nothing else)
# spreads them: over the top 30, scores 0.98-1.0, 7-11 classes, boxes 5-80% of the image, and
# neighbours 1e-4 to 3e-3 apart in logit at the closest (ONNX Runtime gives the scores to 2e-7).
REINIT = {
    "seed": 1,
    "class_embed.weight": "normal(0, 0.2)",
    "class_embed.bias": "normal(-3, 1)",
    "bbox_embed.layers[-1].weight": "normal(0, 0.2)",
    "bbox_embed.layers[-1].bias": "[0, 0, 1.5, 1.5] (cx, cy, w, h logit offsets: larger boxes)",
}


def build() -> RFDETRSegNano:
    torch.manual_seed(SEED)
    model = RFDETRSegNano(pretrain_weights=None)
    net = model.model.model
    generator = torch.Generator().manual_seed(REINIT["seed"])
    with torch.no_grad():
        net.class_embed.weight.normal_(0.0, 0.2, generator=generator)
        net.class_embed.bias.normal_(-3.0, 1.0, generator=generator)
        box_out = net.bbox_embed.layers[-1]  # shared with the decoder's box refinement
        box_out.weight.normal_(0.0, 0.2, generator=generator)
        box_out.bias.copy_(torch.tensor([0.0, 0.0, 1.5, 1.5]))
    return model


def dims(value_info) -> list:
    """An ONNX input/output's declared shape: ints, or the symbolic names rfdetr's exporter left."""
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def describe(path: Path, batch: int, resolution: int) -> dict:
    """Inputs and outputs as declared in the file, and the shapes a run at ``batch`` gives."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probe = np.zeros((batch, 3, resolution, resolution), np.float32)
    ran = session.run(None, {graph.input[0].name: probe})
    return {
        "inputs": [{"name": i.name, "declared_shape": dims(i)} for i in graph.input],
        "outputs": [{"name": o.name, "declared_shape": dims(o), f"shape_at_batch_{batch}": list(r.shape)}
                    for o, r in zip(graph.output, ran)],
    }


def rle(mask: np.ndarray) -> dict:
    """COCO RLE of a full-image (H, W) bool mask, counts as str (pycocotools' own encoder)."""
    encoded = pycocotools.mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def reference(model: RFDETRSegNano, images: Path) -> dict:
    out = {}
    for path in sorted(p for p in images.iterdir() if p.suffix in (".jpg", ".png")):
        rgb = np.asarray(Image.open(path).convert("RGB"))  # what predict() does with a path
        found = model.predict(rgb, threshold=0.0, include_source_image=False)
        # predict() keeps top-k order (descending score); the first TOP rows are the top TOP.
        scores = found.confidence.astype(np.float64)
        logits = np.log(scores / (1.0 - scores))
        out[path.name] = {
            "width": int(rgb.shape[1]),
            "height": int(rgb.shape[0]),
            # How close the ranking is to a tie: decoders must agree on order within this.
            "min_logit_gap_top31": float(np.min(logits[:TOP] - logits[1 : TOP + 1])),
            "detections": [
                {"class_id": int(found.class_id[i]), "score": float(found.confidence[i]),
                 "box": [float(v) for v in found.xyxy[i]], "mask": rle(found.mask[i])}
                for i in range(min(TOP, len(found)))
            ],
        }
    return out


PREPROCESS = {
    "source": "rfdetr 1.11.2, detr.py RFDETR.predict() (and export/_runtime/preprocess.py, which copies it)",
    "colour": "RGB (PIL images converted to RGB)",
    "order": "uint8 HWC -> float32 CHW / 255 -> resize -> normalise (the resize runs on float [0, 1], "
             "not on uint8: no rounding between resize and normalisation)",
    "resize": "torchvision.transforms.functional.resize(t, [S, S], antialias=False): a bilinear stretch to "
              "S x S (aspect ratio not kept, no padding, no letterbox), half-pixel centres "
              "(= F.interpolate(mode='bilinear', align_corners=False)), no antialias even when shrinking",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "layout": "NCHW float32; images of one predict() call stacked into one batch",
}
POSTPROCESS = {
    "source": "rfdetr 1.11.2, models/postprocess.py PostProcess.forward",
    "scores": "sigmoid(labels) over [B, Q, C] (no softmax, no background removal); flattened to Q*C per "
              "image; torch.argsort(descending=True, stable=True) (ties: lower flat index first); the "
              "first num_select (100 for Seg-Nano = Q) kept; query = index // C, class_id = index % C",
    "boxes": "dets are normalised (cx, cy, w, h) in [0, 1] of the stretched input; xyxy = (cx - w/2, "
             "cy - h/2, cx + w/2, cy + h/2) times (W, H, W, H) of the ORIGINAL image, then clamped to "
             "[0, W] and [0, H]",
    "masks": "masks[query] (S/4 x S/4 logits, 78 x 78 at S=312) resized straight to the ORIGINAL image "
             "H x W with F.interpolate(mode='bilinear', align_corners=False) (no antialias, no crop to "
             "the box), then > 0.0: full-image masks",
    "threshold": "score > threshold (strict), applied after top-k; default 0.5; the reference uses 0.0",
}


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model = build()
    resolution = model.model.resolution
    dynamic = Path(model.export(output_dir=str(out), dynamic_batch=True, output_name=NAME, verbose=False))
    fixed = Path(model.export(output_dir=str(out), output_name=f"{NAME}-b1", verbose=False))
    # As an OpenVINO user converts a file (ovc / convert_model): no metadata of ours. FP32 weights
    # (save_model compresses to FP16 by default) so the IR can be held to predict() too.
    ir = out / f"{NAME}_openvino" / "model.xml"
    ir.parent.mkdir(exist_ok=True)
    openvino.save_model(openvino.convert_model(str(dynamic)), str(ir), compress_to_fp16=False)

    references = reference(model, out / "reference-images")
    (out / f"{NAME}-reference.json").write_text(json.dumps(references, indent=1) + "\n")
    ir_model = openvino.Core().read_model(str(ir))
    summary = {
        "model": "RF-DETR-Seg-Nano, rfdetr's own RFDETRSegNano(pretrain_weights=None)",
        "versions": {name: version(name) for name in ("rfdetr", "torch", "torchvision", "onnx", "openvino")},
        "seed": SEED,
        "reinit": REINIT,
        "resolution": resolution,
        "num_queries": model.model_config.num_queries,
        "num_select": model.model_config.num_select,
        "class_slots": int(model.model.model.class_embed.out_features),
        "class_ids": "predict()'s class_id is the raw slot index of the labels output (index % C), 0..C-1 "
                     "with C = num_classes + 1 = 91: no shift. Only for its class NAMES does predict() read "
                     "that id as a sparse 1-based COCO category id (1 = person, 80 names for 91 slots).",
        "files": {
            f"{NAME}.onnx": describe(dynamic, 2, resolution),
            f"{NAME}-b1.onnx": describe(fixed, 1, resolution),
            f"{NAME}_openvino/model.xml": {
                # The converter gives the input a second name (a Cast's output) beside "input".
                "inputs": [{"names": sorted(p.get_names()), "shape": str(p.get_partial_shape())}
                           for p in ir_model.inputs],
                "outputs": [{"names": sorted(p.get_names()), "shape": str(p.get_partial_shape())}
                            for p in ir_model.outputs],
                "weights": "FP32 (compress_to_fp16=False)",
                "note": "compile with INFERENCE_PRECISION_HINT f32: on a CPU with AVX512-BF16 OpenVINO "
                        "defaults to bf16, and then top-k picks other queries than predict()",
            },
        },
        "reference": f"{NAME}-reference.json: per image file name: width, height, min_logit_gap_top31, "
                     f"detections = predict(threshold=0.0)'s top {TOP}: class_id, score, box [x1, y1, x2, "
                     "y2] image pixels, mask COCO RLE of the full-image mask",
        "preprocess": PREPROCESS,
        "postprocess": POSTPROCESS,
    }
    (out / f"{NAME}.json").write_text(json.dumps(summary, indent=1) + "\n")  # last: the make target
    print(json.dumps(summary["files"], indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
