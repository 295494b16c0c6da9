"""Phase 1 of COCO RLE: column-major run lengths of a batch of masks, on the array's device.

Vocabulary (shared by every function here):

- A *frame* is H x W. COCO flattens a mask column-major: pixel (y, x) has index k = x*H + y.
- An *instance* is given as a *crop*: an (h, w) window of the frame whose top-left pixel is
  (top, left); every pixel of the frame outside the window is 0. A full mask is the crop
  (0, 0, H, W), so full masks and box-aware crops go through one algorithm.
- A *transition* is an index k in [0, H*W) where pixel k differs from pixel k-1 (pixel -1 is 0,
  because COCO runs always start with a zero-run). Runs are the gaps between transitions:
  counts = diff([0, *transitions, H*W]).

Finding transitions without the column-major copy pycocotools needs: walk a crop column top to
bottom with a zero row above and below it (the frame outside the crop is 0). A change between
crop rows r-1 and r (r in 0..h; rows -1 and h are the zero pads) is a transition at
k = (left + c)*H + top + r. These row-to-row changes are found reading the crop in its natural
C order. Two cases make the rule exact:

- k == H*W (the frame's last pixel is set): the final run just ends there, so it is dropped.
- a full-height crop (top == 0, h == H): column c's bottom pad and column c+1's top pad land on
  the same index k; two changes at one index cancel (1 -> 0 -> 1 is no change), so neither stays.

Putting the transitions in column-major order (ascending k) and taking differences gives
the counts.

``batch_run_lengths`` is the one algorithm, with two implementations:

- ``_device_batch``: plain array operations, array-module agnostic: one change map and one
  ``nonzero`` per stack, then one sort of every key. A batch may mix frames (images of
  different sizes): instance i's keys are ``i * slot + k`` with slot >= every frame's H*W, so
  the one sort orders every instance's transitions at once. This is the CUDA path through
  CuPy; ``crop_stack_run_lengths`` runs it on NumPy too, so the CPU checks the GPU's logic.
- ``_host_batch``: the host's, through the compiled kernel in ``host_kernel``. It reads each
  crop once, in place, eight pixels per load, and orders its changes with a counting sort by
  column; the many array passes of the device path are what a 2-core host cannot afford.
  The kernel needs numba (the server installs it; a light client may not): without it the
  host runs ``_device_batch`` on NumPy, the same bytes several times slower
  (``compiled()`` says which).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from .arrays import to_xp_array

if TYPE_CHECKING:  # imported where used: numba's import (~0.3 s) is for encoding, not decoding
    from . import host_kernel

# Above this many pixels in all, a host batch is split across the host threads.
_PARALLEL_MIN_PIXELS = 1 << 22


@dataclass(frozen=True)
class RunLengths:
    """Column-major run lengths of N masks that share one frame size, on the host.

    counts: (M,) int64, every mask's runs back to back; each mask starts with its zero-run
        and its runs sum to H*W.
    offsets: (N + 1,) int64; mask i's runs are ``counts[offsets[i]:offsets[i + 1]]``.
    size: (H, W) of the frame.
    """

    counts: np.ndarray
    offsets: np.ndarray
    size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def runs(self, i: int) -> np.ndarray:
        return self.counts[self.offsets[i] : self.offsets[i + 1]]


class NotBinaryError(ValueError):
    """A mask holds a value other than 0 or 1 (pycocotools would silently encode garbage)."""


@functools.cache
def compiled() -> bool:
    """Whether the host encodes through the compiled kernel: numba is installed."""
    return importlib.util.find_spec("numba") is not None


def check_mask_dtype(dtype: Any) -> None:
    if dtype != np.bool_ and dtype != np.uint8:
        raise ValueError(f"masks must be bool or uint8 holding 0/1, got dtype {dtype}")


def _not_binary(value: int, instance: int | None = None) -> NotBinaryError:
    which = "a mask" if instance is None else f"mask {instance}"
    return NotBinaryError(
        f"{which} holds the value {value}; masks must hold only 0 and 1 "
        "(binarise first, e.g. masks > 0)"
    )


def _cancel_coincident(xp: ModuleType, keys: Any) -> Any:
    """Drop both members of every pair of equal sorted keys: two changes at one index.

    Only a full-height crop produces equal keys (see the module docstring); for any other
    crop every key is unique, so this is safe to apply to all of them.
    """
    if keys.size < 2:
        return keys
    same = keys[1:] == keys[:-1]
    drop = xp.zeros(keys.size, dtype=bool)
    drop[1:] |= same
    drop[:-1] |= same
    return keys[~drop]


def _changes_on_device(xp: ModuleType, stack: Any) -> tuple[Any, Any, Any]:
    """(instance, row, col) of every padded-row change of an (n, h, w) stack, in C order.

    Plain array operations, so it runs on CuPy and NumPy alike: one (n, h + 1, w) change map
    and one ``nonzero`` for the whole batch.
    """
    n, h, w = stack.shape
    changes = xp.empty((n, h + 1, w), dtype=bool)
    changes[:, 0] = stack[:, 0]
    changes[:, 1:h] = stack[:, 1:] != stack[:, :-1]
    changes[:, h] = stack[:, h - 1]
    return xp.nonzero(changes)


@dataclass(frozen=True)
class Tiles:
    """Same-shape crops of some instances of a batch, all on one device.

    stack: (n, h, w) bool or uint8 0/1 (NumPy, CuPy or torch). origins: (n, 2) host int64, each
    crop's (top, left) in its instance's frame; the crop must lie inside that frame.
    ids: (n,) host int64, the instances (0..N-1 of the batch) these crops belong to.
    """

    stack: Any
    origins: np.ndarray
    ids: np.ndarray


def transition_keys(
    xp: ModuleType, stack: Any, origins: Any, ids: Any, heights: Any, areas: Any, slot: int,
) -> Any:
    """Unsorted transition keys ``id * slot + k`` of an (n, h, w) stack of crops.

    origins: (n, 2) (top, left) of each crop, ids: (n,) instance numbers; heights and areas:
    (N,) each instance's frame H and H*W; slot: at least the largest area. All int64 arrays
    on the stack's device.
    """
    inst, row, col = _changes_on_device(xp, stack)
    # Per-crop constants first, so each change needs one gather per term.
    tops, lefts = origins[:, 0].copy(), origins[:, 1].copy()
    frame_heights, frame_areas = heights[ids], areas[ids]
    k = (lefts[inst] + col) * frame_heights[inst] + tops[inst] + row
    instance = ids[inst]
    keep = k < frame_areas[inst]  # a set last pixel of the frame: its run just ends at H*W
    return instance[keep] * slot + k[keep]


def _run_lengths_from_keys(
    xp: ModuleType, keys: Any, areas: Any, slot: int, largest: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Cancel coincident pairs of sorted keys, take differences; ONE device-to-host copy.

    keys: ascending int64. areas: (N,) int64 on the device, each instance's H*W (its runs
    close there). largest: optional device scalar, the maximum of uint8 input, checked once
    it is home. Returns host (counts, offsets) for the N instances.
    """
    n = int(areas.shape[0])
    keys = _cancel_coincident(xp, keys)
    instance = keys // slot
    per_instance = xp.bincount(instance, minlength=n) if keys.size else xp.zeros(n, xp.int64)
    offsets = xp.zeros(n + 1, xp.int64)
    offsets[1:] = xp.cumsum(per_instance + 1)
    # Run ends: each transition k, then H*W closing every mask; counts are their differences.
    ends = xp.empty(int(keys.size) + n, xp.int64)
    ends[xp.arange(keys.size, dtype=xp.int64) + instance] = keys - instance * slot
    ends[offsets[1:] - 1] = areas
    starts = xp.empty_like(ends)
    starts[1:] = ends[:-1]
    starts[offsets[:-1]] = 0
    parts = [offsets, ends - starts]
    if largest is not None:
        parts.insert(0, largest.astype(xp.int64).reshape(1))
    flat = xp.concatenate(parts)
    host = flat if xp is np else xp.asnumpy(flat)  # the batch's one device-to-host copy
    if largest is not None:
        if host[0] > 1:
            raise _not_binary(int(host[0]))
        host = host[1:]
    return host[n + 1 :], host[: n + 1]


def batch_run_lengths(
    tiles: Sequence[Tiles], frames: Sequence[tuple[int, int]], frame_of: np.ndarray,
    portable: bool = False,
) -> list[RunLengths]:
    """Run lengths of every instance of a batch, whatever frame each lives in: ONE call.

    tiles: the instances' crops as same-shape stacks (any number of stacks, one device).
    frames: (H, W) of each frame (image) of the batch. frame_of: (N,) host ints, the frame
    of each instance, non-decreasing (instances are numbered frame by frame). Every instance
    without a crop is empty. Returns one RunLengths per frame, its instances in id order.
    On a device the stacks' transitions are found one stack at a time with no host copy,
    then sorted together; the whole batch's runs come home in one copy. portable: use the
    device's change finder on NumPy too (how the tests check the GPU's logic on a CPU).
    """
    frame_of = np.asarray(frame_of, np.int64).reshape(-1)
    sizes = np.asarray(frames, np.int64).reshape(-1, 2)
    n = len(frame_of)
    if n and (np.any(np.diff(frame_of) < 0) or frame_of[0] < 0 or frame_of[-1] >= len(sizes)):
        raise ValueError("frame_of must be non-decreasing frame indices")
    heights_host, areas_host = sizes[frame_of, 0], sizes[frame_of, 0] * sizes[frame_of, 1]
    stacks = [(to_xp_array(t.stack), t) for t in tiles]
    live = [(xp, stack, t) for (xp, stack), t in stacks if stack.size]
    if len({xp.__name__ for xp, _, _ in live}) > 1:
        raise ValueError("a batch's crops must all live on the host or all on one CUDA device")
    xp = live[0][0] if live else np
    for _, stack, _ in live:
        check_mask_dtype(stack.dtype)
    if xp is np and not portable and compiled():
        from . import host_kernel

        windows = [host_kernel.Windows.of(list(stack), t.origins, t.ids) for _, stack, t in live]
        counts, offsets = _host_batch(windows, heights_host, areas_host)
    else:
        counts, offsets = _device_batch(xp, [(stack, t) for _, stack, t in live], heights_host,
                                        areas_host)
    bounds = np.searchsorted(frame_of, np.arange(len(sizes) + 1))
    out = []
    for f, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        first, last = offsets[start], offsets[stop]
        out.append(RunLengths(counts[first:last], offsets[start : stop + 1] - first,
                              (int(sizes[f, 0]), int(sizes[f, 1]))))
    return out


def _device_batch(xp: ModuleType, stacks: Sequence[tuple[Any, Tiles]], heights_host: np.ndarray,
                  areas_host: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Host (counts, offsets) of every instance through array operations on ``xp``: each
    stack's keys found with no host copy, one sort of them all, one copy home."""
    slot = max(int(areas_host.max()) if areas_host.size else 0, 1)
    heights, areas = xp.asarray(heights_host), xp.asarray(areas_host)
    largest = None
    for stack, _ in stacks:
        if stack.dtype == xp.uint8:  # checked once the batch is home: no sync here
            top = stack.max()
            largest = top if largest is None else xp.maximum(largest, top)
    keys = [
        transition_keys(xp, stack, xp.asarray(np.asarray(t.origins, np.int64).reshape(-1, 2)),
                        xp.asarray(np.asarray(t.ids, np.int64).reshape(-1)), heights, areas, slot)
        for stack, t in stacks
    ]
    all_keys = xp.sort(xp.concatenate(keys)) if keys else xp.empty(0, xp.int64)
    return _run_lengths_from_keys(xp, all_keys, areas, slot, largest)


def crop_stack_run_lengths(
    xp: ModuleType, stack: Any, origins: Any, size: tuple[int, int]
) -> RunLengths:
    """Run lengths of N same-shape crops of one frame, on whichever device holds ``stack``.

    stack: (N, h, w) bool or uint8 0/1 (NumPy or CuPy). origins: (N, 2) ints (top, left),
    each crop inside the frame. size: (H, W). The batched, array-module agnostic path:
    the CUDA path, and on NumPy the CPU's check of the GPU's logic.
    """
    n = int(stack.shape[0])
    check_mask_dtype(stack.dtype)
    origins = np.asarray(origins if xp is np else xp.asnumpy(xp.asarray(origins)), np.int64)
    tiles = [Tiles(stack, origins.reshape(n, 2), np.arange(n))]
    return batch_run_lengths(tiles, [size], np.zeros(n, np.int64), portable=True)[0]


def pad_crops(
    xp: ModuleType, crops: Sequence[Any], origins: np.ndarray, size: tuple[int, int]
) -> tuple[Any, np.ndarray]:
    """One zero-padded (N, h, w) tile stack for ragged crops, and each tile's origin.

    A tile is shifted up/left where needed to stay inside the frame; the crop keeps its place
    in the frame, and the tile's extra pixels are zeros, as the frame is there. On a device
    this is one copy kernel per crop and no sync.
    """
    H, W = size
    n = len(crops)
    h = min(max([1] + [int(c.shape[0]) for c in crops]), max(H, 1))
    w = min(max([1] + [int(c.shape[1]) for c in crops]), max(W, 1))
    tiles = np.stack([np.minimum(origins[:, 0], H - h), np.minimum(origins[:, 1], W - w)], 1)
    dtype = crops[0].dtype if n else xp.bool_
    stack = xp.zeros((n, h, w), dtype=dtype)
    for i, crop in enumerate(crops):
        dy, dx = (int(v) for v in origins[i] - tiles[i])
        stack[i, dy : dy + crop.shape[0], dx : dx + crop.shape[1]] = crop
    return stack, tiles.astype(np.int64)


# ----------------------------------------------------------------------------- host path

def _host_batch(windows: Sequence[host_kernel.Windows], heights: np.ndarray,
                areas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Host (counts, offsets) of every instance through the compiled kernel.

    A large batch is cut into pieces of whole crops, about one per host thread (the kernel
    releases the GIL); each piece's runs are then copied to its instances' places.
    heights, areas: (N,) each instance's frame H and H*W.
    """
    from . import host_kernel

    n = len(heights)

    def runs_of(piece: host_kernel.Windows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        counts, offsets, bits = host_kernel.run_lengths(piece, heights[piece.ids],
                                                        areas[piece.ids])
        if bits & int(host_kernel.NOT_BINARY_BITS):
            _refuse_not_binary(piece)
        return counts, offsets, piece.ids

    pieces = _pieces(windows)
    workers, _ = _host_pool()
    parallel = workers is not None and len(pieces) > 1
    found = list(workers.map(runs_of, pieces) if parallel else map(runs_of, pieces))
    if len(found) == 1 and np.array_equal(found[0][2], np.arange(n)):
        return found[0][0], found[0][1]
    lengths = np.ones(n, np.int64)  # an instance without a crop is one zero-run
    for _, offsets, ids in found:
        lengths[ids] = np.diff(offsets)
    offsets_all = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=offsets_all[1:])
    counts_all = np.empty(int(offsets_all[-1]), np.int64)
    counts_all[offsets_all[:-1]] = areas
    for counts, offsets, ids in found:
        shift = np.repeat(offsets_all[ids] - offsets[:-1], np.diff(offsets))
        counts_all[shift + np.arange(counts.size)] = counts
    return counts_all, offsets_all


def _pieces(windows: Sequence[host_kernel.Windows]) -> list[host_kernel.Windows]:
    """The windows cut into runs of whole crops holding similar pixel counts, about one per
    host thread (left as they are when the batch is small or one thread is allowed)."""
    _, threads = _host_pool()
    live = [w for w in windows if len(w)]
    total = sum(w.pixels for w in live)
    if threads < 2 or total < _PARALLEL_MIN_PIXELS:
        return live
    pieces = []
    for w in live:
        done = np.cumsum(np.prod(w.shapes, axis=1))
        parts = min(len(w), max(1, round(threads * int(done[-1]) / total)))
        cuts = np.searchsorted(done, np.arange(1, parts) * (done[-1] / parts)) + 1
        bounds = np.unique(np.clip(np.concatenate([[0], cuts, [len(w)]]), 0, len(w)))
        pieces += [w.take(a, b) for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())]
    return pieces


def _refuse_not_binary(windows: host_kernel.Windows) -> None:
    """Raise NotBinaryError naming the first instance whose crop holds a value above 1."""
    for i in range(len(windows)):
        largest = int(windows.crops[i].view(np.uint8).max(initial=0))  # (a bool's bytes too)
        if largest > 1:
            raise _not_binary(largest, int(windows.ids[i]))


_POOL: ThreadPoolExecutor | None = None
_THREADS: int | None = None  # None: one per core, at most 4


def set_threads(count: int | None) -> None:
    """How many threads the host path may use for large masks (None: one per core, <= 4).
    Servers set it from their thread budget so the codec never oversubscribes the cores."""
    global _POOL, _THREADS
    if count is not None and count < 1:
        raise ValueError(f"thread count must be >= 1, got {count}")
    _THREADS, pool, _POOL = count, _POOL, None
    if pool is not None:
        pool.shutdown(wait=False)


def threads() -> int:
    """How many threads the host path may use for large masks now."""
    return _host_pool()[1]


def _host_pool() -> tuple[ThreadPoolExecutor | None, int]:
    """The shared pool for large host batches and its size; None when one thread is allowed."""
    global _POOL
    if _THREADS is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        count = min(cores or 1, 4)
    else:
        count = _THREADS
    if count < 2:
        return None, 1
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=count, thread_name_prefix="rle-host")
    return _POOL, count


def host_run_lengths(crops: Any, origins: Any, size: tuple[int, int]) -> RunLengths:
    """Run lengths on the host of an (N, h, w) stack or a sequence of (h_i, w_i) crops.

    crops: bool or uint8 0/1 NumPy arrays; origins: (N, 2) (top, left) of each in the frame.
    Every crop is read where it lies (a mask's box window in its mask), all in one kernel
    call unless the batch is large enough to share among the host threads.
    """
    n = len(crops)
    origins = np.asarray(origins, dtype=np.int64).reshape(n, 2)
    for crop in crops:
        check_mask_dtype(crop.dtype)
    if not compiled():
        stack, tile_origins = pad_crops(np, list(crops), origins, size)
        return crop_stack_run_lengths(np, stack, tile_origins, size)
    from . import host_kernel

    windows = host_kernel.Windows.of(list(crops), origins, np.arange(n))
    H, W = size
    heights, areas = np.full(n, H, np.int64), np.full(n, H * W, np.int64)
    counts, offsets = _host_batch([windows], heights, areas)
    return RunLengths(counts, offsets, (int(H), int(W)))
