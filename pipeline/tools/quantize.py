"""``make model-int8``: the default network quantised to INT8 with OpenVINO's NNCF, served beside
the FP32 pipeline as ``instance_segmentation_int8`` (a client picks it by model name).

    python -m pipeline.tools.quantize [--repository model_repository]

Post-training quantisation of the OpenVINO FP32 form (``yolov5s_seg_openvino``), calibrated
on photos of the scikit-image wheel that the evaluation never sees, letterboxed as the server
letterboxes. What must stay FP32 stays so: the head's box decode (sigmoids, grids, the
anchors' arithmetic) is excluded from quantisation. Writes ``yolov5s_seg_int8`` (network)
and ``instance_segmentation_int8`` (the default pipeline's config, pointed at it), then
prints the INT8 pipeline's agreement with FP32 on the evaluation photos (``agreement``).
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from ..images import Preprocess
from ..repository import DEFAULT_MODEL
from .samples import NAMES, calibration_rgb, sample_bytes

LOG = logging.getLogger(__name__)
# NNCF leaves these out of quantisation: the decode after the convolutions (names from the
# ONNX export, kept by OpenVINO's conversion) and every sigmoid.
DECODE_PATTERNS = [".*decoder.*"]


def calibration_inputs(preprocess: Preprocess, batch: int | None = None) -> list[np.ndarray]:
    """(B, 3, h, w) float32 network inputs: each calibration photo, flipped and cropped,
    prepared by the serving code as the network wants (its ``Preprocess``). batch: a file's
    fixed batch size (each input repeats its photo), else 1."""
    inputs = []
    for rgb in calibration_rgb():
        h, w = rgb.shape[:2]
        for picture in (rgb, rgb[:, ::-1], rgb[h // 6 : h - h // 6, w // 6 : w - w // 6]):
            tensor, _ = preprocess.tensor(np.ascontiguousarray(picture), "cpu")
            inputs.append(tensor[None].expand(batch or 1, -1, -1, -1).numpy())
    return inputs


def quantize(repository: Path, network: str, pipeline: str, suffix: str = "_int8") -> tuple[str, str]:
    """Write the INT8 network and pipeline; returns their names."""
    import nncf
    import openvino as ov

    from ..repository import ModelRepository
    from ..runners import load_runner

    repo = ModelRepository.load(repository)
    source = repo.get(network)
    info = load_runner(source, "cpu").info
    inputs = calibration_inputs(info.preprocess, info.fixed_batch)
    started = time.perf_counter()
    model = ov.Core().read_model(str(source.model_file()))
    quantized = nncf.quantize(model, nncf.Dataset(inputs), preset=nncf.QuantizationPreset.MIXED,
                              subset_size=len(inputs),
                              ignored_scope=nncf.IgnoredScope(patterns=DECODE_PATTERNS, types=["Sigmoid"],
                                                              validate=False))
    int8_network = re.sub(r"_openvino$", "", network) + suffix
    folder = repository / int8_network
    (folder / "1").mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(folder / "1" / "model.xml"), compress_to_fp16=False)
    (folder / "config.pbtxt").write_text(int8_config(source.config_path.read_text(), network,
                                                     int8_network))
    for labels in source.path.glob("*.txt"):
        shutil.copy(labels, folder / labels.name)
    int8_pipeline = pipeline + suffix
    pipeline_config = repo.get(pipeline).config_path.read_text()
    pipeline_config = pipeline_config.replace(f'name: "{pipeline}"', f'name: "{int8_pipeline}"')
    pipeline_config = re.sub(r'(key: "network" value: \{ string_value: ")[^"]*(")',
                             rf"\g<1>{int8_network}\g<2>", pipeline_config)
    (repository / int8_pipeline).mkdir(exist_ok=True)
    (repository / int8_pipeline / "config.pbtxt").write_text(
        f"# {int8_pipeline}: {pipeline} on {int8_network} (INT8), written by "
        "`python -m pipeline.tools.quantize`.\n" + pipeline_config)
    LOG.info("wrote %s and %s in %.1f s (%d calibration inputs)", int8_network, int8_pipeline,
             time.perf_counter() - started, len(inputs))
    return int8_network, int8_pipeline


def int8_config(text: str, network: str, int8_network: str) -> str:
    """The INT8 network's config.pbtxt from its source's: its own name, OpenVINO's backend
    (the source may be an ONNX file), and the file at its default name, model.xml."""
    text = text.replace(f'"{network}"', f'"{int8_network}"')
    text = re.sub(r'default_model_filename:\s*"[^"]*"\n?', "", text)
    text = re.sub(r'(platform|backend):\s*"[^"]*"', 'backend: "openvino"', text)
    return (f"# {int8_network}: {network} quantised to INT8 by `python -m pipeline.tools.quantize`.\n"
            + text)


def evaluation_images() -> dict[str, np.ndarray]:
    """The photos INT8 is judged on (never calibrated on): the samples, and 16:9 frames of them."""
    from ..images import decode_image

    out = {}
    for name in NAMES:
        rgb = decode_image(sample_bytes(name)).rgb
        out[name] = rgb
        h, w = rgb.shape[:2]
        crop_h = min(h, w * 9 // 16)
        top = (h - crop_h) // 2
        out[f"{name} 16:9"] = np.ascontiguousarray(rgb[top : top + crop_h, : crop_h * 16 // 9])
    return out


def agreement(reference: list[dict], candidate: list[dict], min_confidence: float = 0.5,
              min_box_iou: float = 0.8) -> tuple[int, int, list[float]]:
    """How far two pipelines' documents agree, image by image (same order): (reference
    detections with confidence >= min_confidence, how many of them have a candidate
    detection of the same class with box IoU >= min_box_iou, the mask IoU of each such pair)."""
    from clients.masks import iou

    wanted = matched = 0
    mask_ious = []
    for ref_doc, doc in zip(reference, candidate):
        for p in ref_doc["predictions"]:
            if p["confidence"] < min_confidence:
                continue
            wanted += 1
            same = [q for q in doc["predictions"] if q["class"] == p["class"]]
            best = max(same, key=lambda q: box_iou(p, q), default=None)
            if best is not None and box_iou(p, best) >= min_box_iou:
                matched += 1
                mask_ious.append(iou(p["rle"], best["rle"]))
    return wanted, matched, mask_ious


def box_iou(a: dict, b: dict) -> float:
    """IoU of two predictions' boxes (centre and size, as the schema gives them)."""
    ax1, ay1 = a["x"] - a["width"] / 2, a["y"] - a["height"] / 2
    bx1, by1 = b["x"] - b["width"] / 2, b["y"] - b["height"] / 2
    inter = (max(0.0, min(ax1 + a["width"], bx1 + b["width"]) - max(ax1, bx1))
             * max(0.0, min(ay1 + a["height"], by1 + b["height"]) - max(ay1, by1)))
    union = a["width"] * a["height"] + b["width"] * b["height"] - inter
    return inter / union if union else 0.0


def report(repository: Path, fp32: str, int8: str) -> str:
    """The agreement and the network speed-up, measured now, as a few lines of text."""
    from ..engine import Pipeline
    from .runtimes import measure

    images = evaluation_images()
    pipes = {name: Pipeline.from_repository(repository, model=name, device="cpu") for name in (fp32, int8)}
    docs = {name: [pipe.infer([rgb])[0] for rgb in images.values()] for name, pipe in pipes.items()}
    wanted, matched, mask_ious = agreement(docs[fp32], docs[int8])
    networks = [pipes[name].network_entry.name for name in (fp32, int8)]
    del pipes
    times = measure(repository, networks)
    speed = {frame: times[networks[0]][frame, 1] / times[networks[1]][frame, 1]
             for frame in ("square", "16:9")}
    return (f"{int8} against {fp32} on {len(images)} images it was not calibrated on:\n"
            f"  FP32 detections (confidence >= 0.5) matched by class with box IoU >= 0.8: "
            f"{matched}/{wanted} ({100 * matched / max(wanted, 1):.1f}%)\n"
            f"  median mask IoU of the matched pairs: {statistics.median(mask_ious or [0]):.3f}\n"
            f"  network speed-up at batch 1: {speed['square']:.2f}x on a square photo, "
            f"{speed['16:9']:.2f}x on a 16:9 frame ({networks[0]} {times[networks[0]]['square', 1]:.1f} ms, "
            f"{networks[1]} {times[networks[1]]['square', 1]:.1f} ms on the square)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tools.quantize",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--network", default="yolov5s_seg_openvino",
                        help="the FP32 network, any family: an OpenVINO IR (or an ONNX file OpenVINO reads)")
    parser.add_argument("--pipeline", default=DEFAULT_MODEL, help="the FP32 pipeline")
    parser.add_argument("--no-report", action="store_true", help="skip measuring the agreement")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _, int8_pipeline = quantize(args.repository, args.network, args.pipeline)
    if not args.no_report:
        print(report(args.repository, args.pipeline, int8_pipeline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
