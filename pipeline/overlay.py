"""Pictures of what the model found: decoded RLE masks blended over the image, with boxes and
labels, so a person can look rather than read counts strings."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np


def colour(i: int) -> tuple[int, int, int]:
    """The i-th of a sequence of well-separated, saturated colours (golden-ratio hues)."""
    return tuple(int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1, 0.85, 1.0))


def tracker_id(pred: dict) -> int | None:
    """The prediction's tracker id, if it is a confirmed tracked object."""
    found = pred.get("tracker_id")
    return found if found is not None and found >= 0 else None


def label(pred: dict) -> str:
    """'person 0.87', or '#7 person 0.87' for a tracked object."""
    tracked = tracker_id(pred)
    prefix = "" if tracked is None else f"#{tracked} "
    return f"{prefix}{pred['class']} {pred['confidence']:.2f}"


def draw(image: np.ndarray, predictions: Sequence[dict], alpha: float = 0.45):
    """A PIL image: ``image`` (H, W, 3) uint8 with each prediction's mask, box and label.

    predictions: the schema's dicts; masks come from ``rle`` (decoded here) or ``points``.
    A tracked object (``tracker_id`` >= 0) keeps one colour in every frame, and its label
    starts with its id.
    """
    from PIL import Image, ImageDraw

    from .rle import decode

    out = image.astype(np.float32)
    colours = [colour(i if tracker_id(p) is None else tracker_id(p)) for i, p in enumerate(predictions)]
    for pred, tint in zip(predictions, colours):
        if "rle" in pred:
            mask = decode(pred["rle"])[0].astype(bool)
        else:
            poly = Image.new("L", (image.shape[1], image.shape[0]), 0)
            points = [(p["x"], p["y"]) for p in pred.get("points", [])]
            if len(points) >= 2:
                ImageDraw.Draw(poly).polygon(points, fill=1, outline=1)
            mask = np.asarray(poly, dtype=bool)
        out[mask] = out[mask] * (1 - alpha) + np.array(tint, np.float32) * alpha
    picture = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    pen = ImageDraw.Draw(picture)
    for pred, tint in zip(predictions, colours):
        x1, y1 = pred["x"] - pred["width"] / 2, pred["y"] - pred["height"] / 2
        x2, y2 = pred["x"] + pred["width"] / 2, pred["y"] + pred["height"] / 2
        pen.rectangle([x1, y1, x2, y2], outline=tint, width=2)
        text = label(pred)
        left, top, right, bottom = pen.textbbox((x1, y1), text)
        pen.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=tint)
        dark = 0.299 * tint[0] + 0.587 * tint[1] + 0.114 * tint[2] < 140  # luma
        pen.text((x1, y1), text, fill=(255, 255, 255) if dark else (0, 0, 0))
    return picture
