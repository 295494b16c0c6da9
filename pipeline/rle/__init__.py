"""COCO RLE codec: the public API other stages and outside code call.

``encode`` and ``encode_crops`` return pycocotools' ``counts`` byte for byte (as ASCII str);
``decode`` turns COCO RLE back into masks and refuses malformed or hostile input.

Where the work happens: run lengths are computed where the masks live (CuPy on a CUDA device,
a compiled numba kernel on the host; ``runs``, ``host_kernel``), reach the host in one copy
per batch, and are packed to ASCII on the CPU (``packing``). ``arrays`` moves NumPy / CuPy /
torch arrays between them without copies.
This module is the codec's public API: other stages and outside code import only from here.
It needs NumPy and pycocotools, never torch or CuPy (those are used when handed their
arrays); numba, where installed (the server's install), compiles the host encoder, else the
host encodes through the NumPy path (the same bytes, slower: ``compiled()`` says which).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .arrays import to_host, to_xp_array
from .packing import pack_counts, unpack_counts
from .runs import (
    NotBinaryError,
    RunLengths,
    Tiles,
    batch_run_lengths,
    check_mask_dtype,
    compiled,
    crop_stack_run_lengths,
    host_run_lengths,
    pad_crops,
    set_threads,
    threads,
)

__all__ = ["encode", "encode_crops", "decode", "parse", "dense", "run_lengths", "to_coco",
           "pack", "box_windows", "batch_run_lengths", "set_threads", "threads", "RunLengths", "Tiles",
           "NotBinaryError", "MAX_DECODE_PIXELS", "warm_up", "compiled"]

# decode() refuses to allocate more than this many mask pixels in one call (2 GiB of uint8),
# so a hostile "size" cannot exhaust memory.
MAX_DECODE_PIXELS = 1 << 31


def warm_up() -> None:
    """Make the host encoder ready: its kernel is compiled on first use (about 2 s, then
    loaded from numba's on-disk cache in about 0.3 s). Servers call this while loading, so no
    request pays for it. Raises RuntimeError if the compiled kernel is wrong on this CPU."""
    if not compiled():
        raise RuntimeError("the compiled host encoder needs numba: pip install 'rle-serving[server]'")
    from .host_kernel import warm_up as compile_and_check

    compile_and_check()


def pack(runs: RunLengths) -> list[str]:
    """The COCO ASCII ``counts`` of every mask in ``runs``, byte-identical to pycocotools."""
    return pack_counts(runs.counts, runs.offsets, runs.size)


def to_coco(runs: RunLengths) -> list[dict]:
    """``[{"size": [H, W], "counts": str}, ...]`` from host run lengths."""
    h, w = int(runs.size[0]), int(runs.size[1])
    return [{"size": [h, w], "counts": c} for c in pack(runs)]


def box_windows(boxes: Any, size: tuple[int, int]) -> np.ndarray:
    """Integer windows (top, left, bottom, right) covering xyxy boxes, clipped to the frame.

    boxes: (N, 4) x1, y1, x2, y2 in pixels (floats allowed). A pixel belongs to the window if
    any part of it is inside the box: floor for the start, ceil for the end.
    """
    H, W = size
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not np.isfinite(b).all():
        raise ValueError("boxes must be finite numbers (x1, y1, x2, y2)")
    left = np.clip(np.floor(b[:, 0]), 0, W)
    top = np.clip(np.floor(b[:, 1]), 0, H)
    right = np.clip(np.ceil(b[:, 2]), left, W)
    bottom = np.clip(np.ceil(b[:, 3]), top, H)
    return np.stack([top, left, bottom, right], axis=1).astype(np.int64)


def _as_stack(xp: Any, masks: Any) -> Any:
    if masks.ndim == 2:
        return masks[None]
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W) or (H, W), got shape {tuple(masks.shape)}")
    return masks


def run_lengths(masks: Any, boxes: Any = None) -> RunLengths:
    """Phase 1 only: column-major run lengths of (N, H, W) or (H, W) masks, on their device.

    With ``boxes`` ((N, 4) xyxy pixels) only the pixels inside each box are read and
    everything outside is taken as 0: the result equals pycocotools on the mask with the
    outside of its box cleared.
    """
    xp, arr = to_xp_array(masks)
    stack = _as_stack(xp, arr)
    check_mask_dtype(stack.dtype)
    n, H, W = (int(d) for d in stack.shape)
    if boxes is None:
        origins = np.zeros((n, 2), np.int64)
        if xp is np:
            return host_run_lengths(stack, origins, (H, W))
        return crop_stack_run_lengths(xp, stack, origins, (H, W))
    windows = box_windows(to_host(boxes), (H, W))
    if len(windows) != n:
        raise ValueError(f"got {len(windows)} boxes for {n} masks")
    crops = [stack[i, t:b, l:r] for i, (t, l, b, r) in enumerate(windows)]
    return _crops_run_lengths(xp, crops, windows[:, :2], (H, W))


def _crops_run_lengths(
    xp: Any, crops: Sequence[Any], origins: np.ndarray, size: tuple[int, int]
) -> RunLengths:
    if xp is np:
        return host_run_lengths(crops, origins, size)
    stack, tile_origins = pad_crops(xp, crops, origins, size)
    return crop_stack_run_lengths(xp, stack, tile_origins, size)


def encode(masks: Any, boxes: Any = None) -> list[dict]:
    """COCO RLE of each mask: ``[{"size": [H, W], "counts": str}]``, pycocotools-exact.

    masks: (N, H, W) or (H, W), bool or uint8 0/1, NumPy / CuPy / torch (CPU or CUDA).
    boxes: optional (N, 4) xyxy pixels; pixels outside a mask's box are not read and count
    as 0. Raises ValueError for other dtypes, other shapes, or uint8 values besides 0 and 1.
    """
    return to_coco(run_lengths(masks, boxes))


def encode_crops(crops: Any, origins: Any, size: Sequence[int]) -> list[dict]:
    """COCO RLE of instances given as crops of an H x W frame (all else 0): reads crops only.

    crops: a sequence of (h_i, w_i) arrays, or one (N, h, w) stack, bool or uint8 0/1, on the
    host or one CUDA device. origins: (N, 2) ints, each crop's (top, left) in the frame.
    size: (H, W). Every crop must lie inside the frame. Equals pycocotools on the full mask.
    """
    H, W = _parse_size(size)
    origins = np.asarray(to_host(origins), np.int64).reshape(-1, 2)
    if isinstance(crops, (list, tuple)):
        converted = [to_xp_array(c) for c in crops]
        modules = {xp.__name__ for xp, _ in converted}
        if len(modules) > 1:
            raise ValueError("crops must all live on the host or all on one CUDA device")
        xp = converted[0][0] if converted else np
        arrays = [a for _, a in converted]
        stack = None
    else:
        xp, stack = to_xp_array(crops)
        if stack.ndim != 3:
            raise ValueError(f"a crop stack must be (N, h, w), got shape {tuple(stack.shape)}")
        arrays = [stack[i] for i in range(stack.shape[0])]
    if len(arrays) != len(origins):
        raise ValueError(f"got {len(arrays)} crops but {len(origins)} origins")
    for i, (crop, (top, left)) in enumerate(zip(arrays, origins)):
        shape = tuple(int(d) for d in crop.shape)
        if len(shape) != 2:
            raise ValueError(f"crop {i} must be 2-D, got shape {shape}")
        if top < 0 or left < 0 or top + shape[0] > H or left + shape[1] > W:
            raise ValueError(
                f"crop {i} of shape {shape} at (top={top}, left={left}) "
                f"does not fit in the {H}x{W} frame"
            )
    if stack is not None and xp is not np:
        return to_coco(crop_stack_run_lengths(xp, stack, origins, (H, W)))
    return to_coco(_crops_run_lengths(xp, arrays, origins, (H, W)))


def _parse_size(size: Any) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
        raise ValueError(f"RLE size must be [height, width], got {size!r}") from None
    if h < 0 or w < 0:
        raise ValueError(f"RLE size must be non-negative, got {[h, w]}")
    return h, w


def parse(rle: Mapping, i: int = 0) -> tuple[tuple[int, int], np.ndarray]:
    """((H, W), runs int64) of one COCO RLE, compressed or not; ValueError if malformed.

    i: the RLE's position in a list, for the error message.
    """
    if not isinstance(rle, Mapping) or "size" not in rle or "counts" not in rle:
        raise ValueError(f"RLE {i} must be a mapping with 'size' and 'counts'")
    size = _parse_size(rle["size"])
    counts = rle["counts"]
    if isinstance(counts, (str, bytes, bytearray)):
        runs = unpack_counts(counts)
    else:
        try:
            runs = np.asarray(counts, dtype=np.int64).reshape(-1)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"RLE {i}: counts must be a string or a list of integers") from None
        if np.asarray(counts).dtype.kind == "f" and not np.array_equal(runs, np.asarray(counts)):
            raise ValueError(f"RLE {i}: counts must be integers")
    if runs.size and int(runs.min()) < 0:
        raise ValueError(f"RLE {i}: counts hold a negative run length")
    total = int(runs.sum()) if runs.size else 0
    if total != size[0] * size[1]:
        raise ValueError(
            f"RLE {i}: runs add up to {total} pixels but size {list(size)} has "
            f"{size[0] * size[1]}"
        )
    return size, runs


def decode(rles: Any, max_pixels: int = MAX_DECODE_PIXELS) -> np.ndarray:
    """Masks (N, H, W) uint8 0/1 from COCO RLE dicts (one dict or a list of them).

    ``counts`` may be the compressed str/bytes or uncompressed integer runs. All RLEs must
    share one size. Raises ValueError on anything malformed: bad characters, truncation,
    negative runs, runs that do not sum to H*W, or more than ``max_pixels`` pixels in all.
    """
    if isinstance(rles, Mapping):
        rles = [rles]
    if not isinstance(rles, (list, tuple)):
        raise ValueError(f"RLEs must be a mapping or a list of mappings, got {type(rles).__name__}")
    parsed = [parse(r, i) for i, r in enumerate(rles)]
    if not parsed:
        return np.zeros((0, 0, 0), np.uint8)
    sizes = {size for size, _ in parsed}
    if len(sizes) > 1:
        raise ValueError(f"RLEs of different sizes cannot form one stack: {sorted(sizes)}")
    (H, W), = sizes
    if len(parsed) * math.prod((H, W)) > max_pixels:
        raise ValueError(
            f"decoding {len(parsed)} masks of {H}x{W} exceeds the limit of {max_pixels} pixels"
        )
    out = np.empty((len(parsed), H, W), np.uint8)
    for i, (_, runs) in enumerate(parsed):
        out[i] = dense(runs, (H, W))
    return out


def dense(runs: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 0/1 view of column-major runs that sum to H*W (not validated here)."""
    H, W = size
    values = (np.arange(len(runs)) & 1).astype(np.uint8)
    return np.repeat(values, runs).reshape(W, H).T
