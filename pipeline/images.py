"""Images: bytes -> RGB pixels -> the network input, and RGB pixels -> JPEG bytes.

Decoding is Pillow on the host (EXIF orientation applied, as photo apps show it), for the
formats in ``ALLOWED_FORMATS`` only. An image far larger than the network input is reduced
before any float tensor exists: a JPEG is decoded at a reduced DCT scale (1/2, 1/4, 1/8), any
other format is box-averaged by an integer factor on its 8-bit pixels. The network sees at
most the letterbox's inner size anyway, and only the original size is needed afterwards
(boxes and masks are in original-image pixels). 16-bit and float images are scaled to 8 bits,
not clipped. Resizing is torch, so it runs on whichever device the network uses.

A network's ``Preprocess`` says how an image becomes its input, one code path for every
family (config.pbtxt ``parameters`` override the family's defaults, see ``heads``):

- ``letterbox`` (YOLO): scaled so its long side is the network's scale, padded with
  ``pad_value``; a network exported for any size (``stride`` given) gets the smallest
  rectangle of multiples of the stride that holds the image (640 x 384 for a 16:9 frame, as
  ultralytics' "rect" inference); a fixed-size network gets its square;
- ``stretch`` (DETR): resized to the network's square whatever its aspect, no padding;

both bilinear without antialiasing, then pixel values over 255, minus ``mean``, over ``std``
(per RGB channel: a network that wants 0..255 has std 1/255). Where the image lands is its
``Placement``.
"""

from __future__ import annotations

import io
import math
import threading
from dataclasses import dataclass

import numpy as np

from .errors import BadInputError

# Larger images are refused before decoding: 8K x 8K is plenty for a camera; more is
# almost always a mistake or a decompression bomb.
MAX_IMAGE_PIXELS = 8192 * 8192
# A request's images together (eight 4K frames fit; two 8K x 8K images do not): the decoding
# one request may ask of the server, whatever its batch size.
MAX_REQUEST_PIXELS = 8192 * 8192
# The formats a client may send (Pillow's names). Pillow opens some thirty more (PCX, PPM, ICO,
# EPS, PSD, ...): rarely sent on purpose, and each extra parser is attack surface. "JPEG"
# covers camera MPO files too (Pillow opens them through the JPEG plugin).
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
_UNDECODABLE = ("image bytes are not a decodable image in an accepted format "
                "(JPEG, PNG, WebP, BMP, TIFF or GIF)")
RESIZES = ("letterbox", "stretch")
JPEG_QUALITY = 85  # frames and overlays sent as JPEG: small, and masks stay legible
# EXIF orientations that swap width and height (transposed, rotated 90 or 270 degrees).
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
_ORIENTATIONS = (2, 3, 4, 5, 6, 7, 8)  # those that move pixels (1 is as stored)


@dataclass(frozen=True)
class Placement:
    """Where an original (height, width) image sits in the (input_h, input_w) network input.

    Input pixel coordinates = original * (gain_y, gain_x) + (top, left); ``inner`` is the
    resized image's (height, width) inside the input.
    """

    height: int
    width: int
    input_h: int
    input_w: int
    gain_y: float
    gain_x: float
    top: int
    left: int
    inner: tuple[int, int]


def letterbox_geometry(height: int, width: int, size: int, stride: int | None = None) -> Placement:
    """Where an image goes in the network input: scaled so its long side is ``size``, padded
    to ``size`` x ``size``, or (with ``stride``) to the next multiples of the stride."""
    gain = min(size / height, size / width)
    inner_h, inner_w = max(1, round(height * gain)), max(1, round(width * gain))
    if stride:
        input_h, input_w = (stride * math.ceil(v / stride) for v in (inner_h, inner_w))
    else:
        input_h = input_w = size
    left = round((input_w - inner_w) / 2 - 0.1)
    top = round((input_h - inner_h) / 2 - 0.1)
    return Placement(height, width, input_h, input_w, gain, gain, top, left, (inner_h, inner_w))


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a network's input (see the module's docstring).

    size: the network's scale (config.pbtxt's ``input_scale``). stride: a letterbox to
    multiples of it (any-size networks), else the square. mean, std: per RGB channel, on
    values in [0, 1]. pad_value: the letterbox's padding, in pixel values (0..255).
    """

    size: int
    stride: int | None = None
    resize: str = "letterbox"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    pad_value: float = 114.0

    def place(self, height: int, width: int) -> Placement:
        if self.resize == "stretch":
            s = self.size
            return Placement(height, width, s, s, s / height, s / width, 0, 0, (s, s))
        return letterbox_geometry(height, width, self.size, self.stride)

    def decode_side(self) -> int | None:
        """The long side an image may be decoded reduced to (``decode_image``): a letterbox
        needs its long side at the scale; a stretch may enlarge its short side, so it is
        decoded whole."""
        return self.size if self.resize == "letterbox" else None

    def describe(self) -> str:
        shape = f"any size, stride {self.stride}" if self.stride else f"{self.size} x {self.size}"
        normal = "" if self.mean == (0, 0, 0) and self.std == (1, 1, 1) else \
            f", mean {list(self.mean)}, std {list(self.std)}"
        pad = f", pad {self.pad_value:g}" if self.resize == "letterbox" else ""
        return f"{self.resize} to {self.size} ({shape}){normal}{pad}"

    def tensor(self, image: np.ndarray | Picture, device: object = "cpu",
               placement: Placement | None = None):
        """(3, input_h, input_w) float32 tensor on ``device``, and its Placement.

        image: (H, W, 3) uint8 RGB, or a Picture (its pixels may be a reduced decode; the
        placement is its full size's)."""
        import torch
        import torch.nn.functional as F

        picture = image if isinstance(image, Picture) else Picture(image, image.shape[:2])
        where = placement or self.place(*picture.size)
        rgb = picture.rgb  # torch wants writable, C-ordered memory: a message's view is neither
        rgb = rgb if rgb.flags.c_contiguous and rgb.flags.writeable else np.array(rgb, order="C")
        pixels = torch.from_numpy(rgb).to(device, non_blocking=True)
        chw = pixels.permute(2, 0, 1).unsqueeze(0).float().div_(255)
        if picture.rgb.shape[:2] != where.inner:
            chw = F.interpolate(chw, size=where.inner, mode="bilinear", align_corners=False)
        out = torch.full((3, where.input_h, where.input_w), self.pad_value / 255,
                         dtype=torch.float32, device=chw.device)
        ih, iw = where.inner
        out[:, where.top : where.top + ih, where.left : where.left + iw] = chw[0]
        if self.mean != (0, 0, 0) or self.std != (1, 1, 1):
            mean = torch.tensor(self.mean, dtype=torch.float32, device=out.device)[:, None, None]
            std = torch.tensor(self.std, dtype=torch.float32, device=out.device)[:, None, None]
            out.sub_(mean).div_(std)
        return out, where


@dataclass(frozen=True)
class Picture:
    """Decoded pixels and the size of the image they show.

    rgb: (h, w, 3) uint8, possibly a reduced decode; size: the full (height, width) as shown
    (EXIF orientation applied), which geometry and results use.
    """

    rgb: np.ndarray
    size: tuple[int, int]

    @property
    def nbytes(self) -> int:
        """What it holds in memory (the pixels), as an array's ``nbytes`` says."""
        return self.rgb.nbytes


def decode_image(data: bytes, long_side: int | None = None) -> Picture:
    """Decode encoded JPEG/PNG/... bytes; BadInputError if unusable.

    long_side: the caller will scale the image so its long side is this; an image at least
    twice that size is then decoded reduced (JPEG: DCT scale; others: an integer box
    average), never below that size. Without it, at full size.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise BadInputError("image is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as img:
            w, h = img.size
            check_image_size(h, w)
            orientation = img.getexif().get(0x0112, 1)
            size = (w, h) if orientation in _SWAPPING_ORIENTATIONS else (h, w)
            if long_side is not None and long_side < max(w, h):
                gain = long_side / max(w, h)
                img.draft("RGB", (math.ceil(w * gain), math.ceil(h * gain)))
            if orientation in _ORIENTATIONS:  # else exif_transpose still copies it, full size
                img = ImageOps.exif_transpose(img)
            img = _eight_bit(img)
            if img.mode not in ("L", "RGB"):
                # Palette, alpha, CMYK, 1-bit: to RGB first, as always (alpha dropped), since
                # averaging palette indices or premultiplied alpha would change the colours.
                img = img.convert("RGB")
            if long_side is not None:
                img = _reduced(img, size, long_side)
            return Picture(np.array(img.convert("RGB")), size)
    except BadInputError:
        raise
    except UnidentifiedImageError:
        raise BadInputError(_UNDECODABLE) from None
    except Image.DecompressionBombError as exc:
        raise BadInputError(f"image bytes are not a decodable image ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data
        raise BadInputError(f"image is corrupt or truncated ({exc})") from None


def _eight_bit(img):
    """16-bit and float images as 8-bit "L", scaled: ``convert("RGB")`` clips them (a 16-bit
    photo becomes black and white). 16-bit keeps its high byte; float is read as [0, 1].
    Other modes are returned as they are."""
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode == "I":
        values = np.asarray(img)
        if img.mode == "I" and values.max(initial=0) <= 255:  # 32-bit ints holding 8-bit values
            return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8))
        return Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8))
    if img.mode == "F":
        values = np.nan_to_num(np.asarray(img), nan=0.0, posinf=0.0, neginf=0.0)
        # [0, 1] (some overshoot allowed); values well past it are already 0..255
        scale = 255 if values.max(initial=0) <= 2 else 1
        return Image.fromarray(np.rint(np.clip(values * scale, 0, 255)).astype(np.uint8))
    return img


def _reduced(img, size: tuple[int, int], long_side: int):
    """img ("L" or "RGB") box-averaged by ``_reduction``'s factor. Unchanged when it is under
    twice the size needed, so ordinary photos decode exactly as they always did; a 196 KB
    8192 x 8192 PNG no longer becomes a 0.8 GB float tensor."""
    factor = _reduction((img.height, img.width), size, long_side)
    # Pillow rounds a reduced size up (the last box averages what is left), so the result is
    # at least (current / factor) >= the needed size: the letterbox still only shrinks it.
    return img.reduce(factor) if factor >= 2 else img


def reduced_size(size: tuple[int, int], long_side: int | None) -> tuple[int, int] | None:
    """(height, width) to decode an image of ``size`` at, for a network of scale
    ``long_side``: reduced by ``_reduction``'s factor (as Pillow's ``reduce`` rounds, up), or
    None where it is under twice the size needed and is decoded whole. For decoders that scale
    as they convert (a camera's frames, FFmpeg's scaler)."""
    if long_side is None:
        return None
    factor = _reduction(size, size, long_side)
    if factor < 2:
        return None
    return math.ceil(size[0] / factor), math.ceil(size[1] / factor)


def _reduction(pixels: tuple[int, int], size: tuple[int, int], long_side: int) -> int:
    """The largest integer factor that keeps ``pixels`` (height, width) at least the size
    the letterbox needs: the full ``size`` scaled so its long side is ``long_side``."""
    gain = min(1.0, long_side / max(size))
    need_h, need_w = max(1, math.ceil(size[0] * gain)), max(1, math.ceil(size[1] * gain))
    return min(pixels[0] // need_h, pixels[1] // need_w)


def probe(image: object) -> tuple[object, tuple[int, int]]:
    """(source, (height, width) as shown) without decoding pixels: a header read for encoded
    bytes (EXIF orientation applied), the shape of arrays. BadInputError if unusable.

    source: what ``as_picture`` decodes later (a path is read into its bytes here)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, str) or hasattr(image, "__fspath__"):
        with open(image, "rb") as f:
            image = f.read()
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data:
            raise BadInputError("image is empty (0 bytes)")
        try:
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as img:
                w, h = img.size
                check_image_size(h, w)  # on the header, before reading any further
                swapped = img.getexif().get(0x0112, 1) in _SWAPPING_ORIENTATIONS
        except BadInputError:
            raise
        except UnidentifiedImageError:
            raise BadInputError(_UNDECODABLE) from None
        except Image.DecompressionBombError as exc:
            raise BadInputError(f"image bytes are not a decodable image ({exc})") from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise BadInputError(f"image is corrupt or truncated ({exc})") from None
        return data, ((w, h) if swapped else (h, w))
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL image
        return image, (image.size[1], image.size[0])
    picture = as_picture(image)  # arrays: validated here, nothing to decode later
    return picture, picture.size


class PixelBudget:
    """The pixels one request's images may hold together (``MAX_REQUEST_PIXELS``), taken
    as each header is read (from several worker threads); BadInputError past it."""

    def __init__(self, limit: int = MAX_REQUEST_PIXELS):
        self.limit = limit
        self.taken = 0
        self._lock = threading.Lock()

    def take(self, height: int, width: int) -> None:
        with self._lock:
            self.taken += height * width
            over = self.taken > self.limit
        if over:
            raise BadInputError(f"the request's images hold more than {self.limit} pixels together "
                                "(the limit per request); send fewer or smaller images per request")


def check_image_size(height: int, width: int) -> None:
    if height <= 0 or width <= 0:
        raise BadInputError(f"image has no pixels ({width}x{height})")
    if height * width > MAX_IMAGE_PIXELS:
        raise BadInputError(
            f"image of {width}x{height} exceeds the {MAX_IMAGE_PIXELS}-pixel limit; resize it first"
        )


def as_rgb_array(image: object) -> np.ndarray:
    """Accept encoded bytes, a path-like, a PIL image or an (H, W, 3) uint8 array."""
    return as_picture(image).rgb


def as_picture(image: object, long_side: int | None = None) -> Picture:
    """Encoded bytes, a path-like, a PIL image, an (H, W, 3) uint8 array or a Picture, as a
    Picture. long_side: see ``decode_image``; raw pixels are reduced the same way, so a
    raw frame far larger than the network input never becomes a full-size float tensor.
    """
    if isinstance(image, Picture):
        return _reduced_picture(image, long_side)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image(bytes(image), long_side)
    if isinstance(image, str) or hasattr(image, "__fspath__"):
        with open(image, "rb") as f:
            return decode_image(f.read(), long_side)
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL image
        rgb = np.array(_eight_bit(image).convert("RGB"))
        return _reduced_picture(Picture(rgb, rgb.shape[:2]), long_side)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise BadInputError(
            f"raw images must be uint8 [H, W, 3] RGB, got {arr.dtype} {list(arr.shape)}"
        )
    check_image_size(arr.shape[0], arr.shape[1])
    return _reduced_picture(Picture(arr, arr.shape[:2]), long_side)


def _reduced_picture(picture: Picture, long_side: int | None) -> Picture:
    """``_reduced`` for pixels already in memory. Never a copy otherwise: a raw frame waits
    in the queue as a view of its message (``Preprocess.tensor`` copies what torch cannot take)."""
    from PIL import Image

    if long_side is not None and _reduction(picture.rgb.shape[:2], picture.size, long_side) >= 2:
        smaller = _reduced(Image.fromarray(picture.rgb), picture.size, long_side)
        return Picture(np.array(smaller), picture.size)
    return picture


def encode_jpeg(image, quality: int = JPEG_QUALITY) -> bytes:
    """An (H, W, 3) uint8 RGB array or a PIL image as JPEG bytes: the one encoder of the house
    (a camera's frame for a subscriber, an overlay for Roboflow's ``format=image``, the client
    CLI's frames, the benchmarks' workloads). CPU work: the server calls it from a worker
    thread."""
    from PIL import Image

    picture = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
