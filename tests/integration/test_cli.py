"""``python -m pipeline predict``: JSON per image, and an overlay a person can look at (on the
fake network's scenes, ``tests/fakes.py``; the real model's detections are test_engine's)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

from ..conftest import ROOT
from ..fakes import png, scene


def predict(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "pipeline", "predict", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_predict_prints_json_and_draws_masks_only_where_they_are(tmp_path, fake_root):
    image = tmp_path / "scene.png"
    image.write_bytes(png(scene(480, 360, red=(20, 40, 140, 200), blue=(200, 260, 340, 460))))
    overlay = tmp_path / "out.png"
    run = predict(str(image), "--overlay", str(overlay), "--model-repository", str(fake_root))
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["image"] == {"width": 360, "height": 480}
    assert {p["class"] for p in doc["predictions"]} == {"red", "blue"}

    original = np.asarray(Image.open(image).convert("RGB")).astype(int)
    drawn = np.asarray(Image.open(overlay).convert("RGB")).astype(int)
    changed = np.abs(drawn - original).sum(axis=2) > 0
    H, W = original.shape[:2]
    near_any_box = np.zeros((H, W), bool)
    for p in doc["predictions"]:
        mask = coco_mask.decode({"size": [H, W], "counts": p["rle"]["counts"].encode()}).astype(bool)
        assert changed[mask].mean() > 0.95, p["class"]  # masks are painted
        x1, y1 = int(p["x"] - p["width"] / 2) - 3, int(p["y"] - p["height"] / 2) - 3
        x2, y2 = int(p["x"] + p["width"] / 2) + 4, int(p["y"] + p["height"] / 2) + 4
        near_any_box[max(y1, 0) : y2, max(x1, 0) : x2] = True
    assert not changed[~near_any_box].any()  # nothing drawn away from the detections


def test_polygon_format_and_options(tmp_path, fake_root):
    image = tmp_path / "scene.png"
    image.write_bytes(png(scene(240, 320, red=(20, 40, 100, 120), blue=(200, 100, 300, 200))))
    run = predict(str(image), "--model-repository", str(fake_root), "--mask-format", "polygon",
                  "--confidence", "0.8", "--max-detections", "1")
    assert run.returncode == 0, run.stderr
    (red,) = json.loads(run.stdout)["predictions"]
    assert red["class"] == "red" and red["confidence"] > 0.8 and red["mask_format"] == "polygon"
    xs, ys = [q["x"] for q in red["points"]], [q["y"] for q in red["points"]]
    assert (min(xs), min(ys), max(xs), max(ys)) == (20, 40, 99, 119)


def test_bad_files_are_reported_and_the_rest_still_run(tmp_path, fake_root):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    good = tmp_path / "scene.png"
    good.write_bytes(png(scene(red=(20, 40, 100, 120))))
    run = predict(str(bad), str(good), str(tmp_path / "missing.png"), "--model-repository", str(fake_root))
    assert run.returncode == 1
    assert "broken.jpg" in run.stderr and "missing.png" in run.stderr
    assert len(run.stdout.strip().splitlines()) == 1


def test_help_explains_the_options():
    run = predict("--help")
    assert run.returncode == 0
    for option in ("--model", "--mask-format", "--confidence", "--overlay"):
        assert option in run.stdout
