"""Pre-processing: image bytes -> RGB pixels -> letterboxed network input.

Decoding is Pillow on the host (EXIF orientation applied, as photo apps show it);
letterboxing is torch, so it runs on whichever device the network uses.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from .errors import BadInputError

# Larger images are refused before decoding: 8K x 8K is plenty for a camera; more is
# almost always a mistake or a decompression bomb.
MAX_IMAGE_PIXELS = 8192 * 8192
PAD_VALUE = 114 / 255  # YOLO's grey letterbox padding


def decode_image(data: bytes) -> np.ndarray:
    """(H, W, 3) uint8 RGB from encoded JPEG/PNG/... bytes; BadInputError if unusable."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise BadInputError("image is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            check_image_size(h, w)
            img = ImageOps.exif_transpose(img)
            return np.array(img.convert("RGB"))
    except BadInputError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise BadInputError(f"image bytes are not a decodable image ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data
        raise BadInputError(f"image is corrupt or truncated ({exc})") from None


def check_image_size(height: int, width: int) -> None:
    if height <= 0 or width <= 0:
        raise BadInputError(f"image has no pixels ({width}x{height})")
    if height * width > MAX_IMAGE_PIXELS:
        raise BadInputError(
            f"image of {width}x{height} exceeds the {MAX_IMAGE_PIXELS}-pixel limit; resize it first"
        )


def as_rgb_array(image: object) -> np.ndarray:
    """Accept encoded bytes, a path-like, a PIL image or an (H, W, 3) uint8 array."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image(bytes(image))
    if isinstance(image, str) or hasattr(image, "__fspath__"):
        with open(image, "rb") as f:
            return decode_image(f.read())
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL image
        return np.array(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise BadInputError(
            f"raw images must be uint8 [H, W, 3] RGB, got {arr.dtype} {list(arr.shape)}"
        )
    check_image_size(arr.shape[0], arr.shape[1])
    return arr if arr.flags.c_contiguous and arr.flags.writeable else np.array(arr)


@dataclass(frozen=True)
class Letterbox:
    """How an original (height, width) image sits inside the (input_h, input_w) network input.

    Input pixel coordinates = original * gain + (left, top); ``inner`` is the resized image's
    (height, width) inside the input.
    """

    height: int
    width: int
    input_h: int
    input_w: int
    gain: float
    top: int
    left: int
    inner: tuple[int, int]


def letterbox_geometry(height: int, width: int, size: int) -> Letterbox:
    gain = min(size / height, size / width)
    inner_w, inner_h = round(width * gain), round(height * gain)
    left = round((size - inner_w) / 2 - 0.1)
    top = round((size - inner_h) / 2 - 0.1)
    return Letterbox(height, width, size, size, gain, top, left, (inner_h, inner_w))


def letterbox(image: np.ndarray, size: int, device: object = "cpu"):
    """(3, size, size) float32 tensor in [0, 1] on ``device``, and its Letterbox."""
    import torch
    import torch.nn.functional as F

    h, w = image.shape[:2]
    geo = letterbox_geometry(h, w, size)
    pixels = torch.from_numpy(image).to(device, non_blocking=True)
    chw = pixels.permute(2, 0, 1).unsqueeze(0).float().div_(255)
    if (h, w) != geo.inner:
        chw = F.interpolate(chw, size=geo.inner, mode="bilinear", align_corners=False)
    out = torch.full((3, geo.input_h, geo.input_w), PAD_VALUE, dtype=torch.float32,
                     device=chw.device)
    ih, iw = geo.inner
    out[:, geo.top : geo.top + ih, geo.left : geo.left + iw] = chw[0]
    return out, geo
